"""What the CPU test suite cannot check: that the CUDA path computes what the CPU path does.

    python benchmarks/cuda_checks.py          # on a machine with a GPU; exits 1 if a check fails

Each check runs the same function on the CPU and on cuda:0 (or, for the compiled search, eagerly
and compiled on cuda:0) from the same inputs and compares:
  - pUCT and Gumbel search, lookup-table model: CUDA compiled == CUDA eager (trees), CUDA eager
    == CPU eager (visit counts, root values);
  - pUCT search through the default network (run_search): compiled == eager on CUDA;
  - q_learning.q_search on the table model: CUDA == CPU;
  - two training steps (default network, small batch, NCE on, augmentation off so both devices
    see the same pixels, --precision fp32): the second step's losses and priorities and the
    weights after it, CUDA == CPU up to float32 rounding (TF32 off for the comparison);
  - the same step with augmentation and bf16 (the CUDA default) on CUDA: finite losses, within
    the tolerances of test_bf16_runs_the_networks_and_keeps_the_rest_in_fp32 of the fp32 ones;
  - the replay buffer on the GPU (the single process's) and the layout's mirror of the frames on
    the GPU give the same windows as a buffer in host memory, across the ring's wrap-around;
  - the host-device syncs of one single-process update at the defaults and of one actor step
    (torch.cuda.set_sync_debug_mode), printed.
CUDA_CHECKS_DEVICE=cpu runs every check with the CPU on both sides (a dry run of this script).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import muzero_nce as M  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import q_learning as Q  # noqa: E402

import torch  # noqa: E402

from throughput import default_args, filled_buffer, hardware, table_model  # noqa: E402

CPU, GPU = torch.device("cpu"), torch.device(os.environ.get("CUDA_CHECKS_DEVICE", "cuda:0"))
failures = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def close(a, b, rtol, atol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return torch.allclose(a, b, rtol=rtol, atol=atol), f"max |diff| {float((a - b).abs().max()):.2e}"


def table_search(device, B, sims, compile):
    rng, nxt, rew, val, logit, recurrent_fn = table_model(device)
    roots = torch.as_tensor(rng.integers(0, nxt.shape[0], B), device=device)
    return M.search(logit[roots], val[roots], roots, recurrent_fn, sims, dirichlet_fraction=0.0, compile=compile)


def check_table_search(B=64, sims=50):
    eager, compiled = table_search(GPU, B, sims, False), table_search(GPU, B, sims, True)
    cpu = table_search(CPU, B, sims, False)
    check(f"pUCT {B}x{sims}, CUDA compiled == CUDA eager (children, visits)",
          torch.equal(compiled.tree.children, eager.tree.children)
          and torch.equal(compiled.visit_counts, eager.visit_counts))
    check(f"pUCT {B}x{sims}, CUDA compiled == CUDA eager (values)", *close(compiled.root_value, eager.root_value,
                                                                           1e-5, 1e-5))
    same = (cpu.visit_counts == eager.visit_counts.cpu()).all(1)
    check(f"pUCT {B}x{sims}, CUDA eager == CPU eager (visits)", bool(same.all()), f"{int(same.sum())}/{B} rows equal")
    check(f"pUCT {B}x{sims}, CUDA eager == CPU eager (root values)", *close(cpu.root_value, eager.root_value,
                                                                            1e-5, 1e-5))


def table_gumbel(device, B, sims, compile):
    rng, nxt, rew, val, logit, recurrent_fn = table_model(device)
    roots = torch.as_tensor(rng.integers(0, nxt.shape[0], B), device=device)
    return M.gumbel_search(logit[roots], val[roots], roots, recurrent_fn, sims, compile=compile,
                           generator=M.make_generator(device, 0))


def check_table_gumbel(B=64, sims=50):
    eager, compiled = table_gumbel(GPU, B, sims, False), table_gumbel(GPU, B, sims, True)
    check(f"Gumbel {B}x{sims}, CUDA compiled == CUDA eager (children, visits, action)",
          torch.equal(compiled.tree.children, eager.tree.children)
          and torch.equal(compiled.visit_counts, eager.visit_counts) and torch.equal(compiled.action, eager.action))
    check(f"Gumbel {B}x{sims}, CUDA compiled == CUDA eager (policy)", *close(compiled.policy, eager.policy, 1e-5, 1e-6))


def check_network_search(B=16, sims=20):
    net = M.MuZeroNet((3, 96, 96), 4, 9, default_args()).to(GPU).eval()
    obs = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8, device=GPU)
    with torch.no_grad():
        eager = M.run_search(net, obs, default_args("--no-compile"), sims)[0]
        compiled = M.run_search(net, obs, default_args("--compile"), sims)[0]
    check(f"run_search {B}x{sims}, default network, CUDA compiled == eager (visits)",
          torch.equal(compiled.visit_counts, eager.visit_counts))


def check_q_search(B=64, sims=50):
    outs = []
    for device in (CPU, GPU):
        rng, nxt, rew, val, logit, _ = table_model(device)
        roots = torch.as_tensor(rng.integers(0, nxt.shape[0], B), device=device)
        q_table = lambda emb, action: (rew[emb, action], logit[nxt[emb, action]], nxt[emb, action])
        outs.append(Q.q_search(logit[roots], roots, q_table, sims))
    same = (outs[0].visit_counts == outs[1].visit_counts.cpu()).all(1)
    check(f"q_search {B}x{sims}, CUDA == CPU (visits)", bool(same.all()), f"{int(same.sum())}/{B} rows equal")


def one_train_step(device, flags, state):
    """Two training steps from `state`; the second's metrics and priorities, and the weights after
    it. The second step is the one compared: at the first, the value and reward heads (last layer
    zero-initialised) predict the uniform distribution, whose loss does not depend on the targets."""
    args = default_args("--batch-size-per-worker", "16", "--lr-warmup-steps", "0", *flags)  # full-size steps
    args.device = str(device)
    torch.manual_seed(0)
    buffer = filled_buffer(args)  # the same synthetic data on both devices (seeded)
    net = M.MuZeroNet((3, 96, 96), 4, 9, args)
    net.load_state_dict(state)
    net = net.to(device)
    learner, sampler = M.Learner(net, args, device), M.make_generator("cpu", 0)
    for _ in range(2):
        time_, env, weights, td_steps = M.sample_batch(buffer, args, 0, sampler)
        seq = M.Sequences(*(x.to(device) for x in buffer.window(time_, env)))
        metrics, priorities = learner.train_step(seq, time_, env, weights.to(device), td_steps)
    return metrics, priorities, {k: v.detach().cpu() for k, v in net.state_dict().items()}


def check_train_step():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    state = M.MuZeroNet((3, 96, 96), 4, 9, default_args()).state_dict()
    cpu, gpu = (one_train_step(device, ["--no-augment", "--precision", "fp32"], state) for device in (CPU, GPU))
    for name in cpu[0]:
        if name.startswith("losses/"):
            check(f"train step {name}, CUDA == CPU", *close(torch.as_tensor(gpu[0][name]),
                                                           torch.as_tensor(cpu[0][name]), 1e-5, 1e-6))
    check("train step priorities, CUDA == CPU", *close(gpu[1], cpu[1], 1e-5, 1e-6))
    diff = max(float((gpu[2][k].double() - cpu[2][k].double()).abs().max()) for k in cpu[2]
               if cpu[2][k].is_floating_point())
    moved = max(float((cpu[2][k].double() - state[k].double()).abs().max()) for k in cpu[2]
                if cpu[2][k].is_floating_point())
    check("train step updated weights, CUDA == CPU", diff < 1e-4 * moved, f"max |diff| {diff:.2e}, largest change {moved:.2e}")
    metrics, _, _ = one_train_step(GPU, ["--augment"], state)
    losses = torch.as_tensor([float(v) for k, v in metrics.items() if k.startswith("losses/")])
    check("train step with augmentation and bf16 on CUDA: finite losses", bool(torch.isfinite(losses).all()),
          ", ".join(f"{k}={float(v):.3f}" for k, v in metrics.items() if k.startswith("losses/")))
    bf16, _, _ = one_train_step(GPU, ["--no-augment", "--precision", "bf16"], state)
    for name in ("value", "policy", "reward", "nce", "total"):
        check(f"train step losses/{name}, CUDA bf16 within 1% of CPU fp32",
              *close(torch.as_tensor(bf16[f"losses/{name}"]), torch.as_tensor(cpu[0][f"losses/{name}"]), 0.01, 0))


def check_buffer_on_device(E=4, T=16):
    """Windows from a buffer on the GPU and through a GPU mirror of a host buffer's frames equal
    those of a host buffer, after the ring has wrapped around (3 T steps written)."""
    args = default_args("--num-envs", str(E))
    buffers = [M.ReplayBuffer(E * T, E, (3, 8, 8), 5, 4, args.jumps, args.td_steps, device=d) for d in (CPU, GPU)]
    g = torch.Generator().manual_seed(0)
    for t in range(3 * T):
        step = (torch.randint(0, 256, (E, 3, 8, 8), dtype=torch.uint8, generator=g), torch.rand(E, generator=g),
                torch.rand(E, generator=g) < 0.1, torch.zeros(E, dtype=torch.bool), torch.full((E,), t),
                torch.randint(0, 5, (E,), generator=g), torch.softmax(torch.randn(E, 5, generator=g), -1),
                torch.randn(E, generator=g), torch.randn(E, generator=g))
        for buffer in buffers:
            buffer.add(*step)
        if t == 2 * T:
            buffers[0].mirror_frames(GPU)  # a mirror that starts late and catches up
    time_ = 2 * T + 3 + torch.arange(T) % 3  # rows holding times 2T..3T-1: windows t-3 .. t+10 inside them
    env = torch.arange(T) % E
    host, device = buffers[0].window(time_, env), buffers[1].window(time_.to(GPU), env.to(GPU))
    mirrored = buffers[0].window(time_, env, device=GPU)
    check("replay window: GPU buffer == host buffer", all(torch.equal(a, b.cpu()) for a, b in zip(host, device)))
    check("replay window: host buffer through a GPU mirror == host buffer",
          all(torch.equal(a, b.cpu()) for a, b in zip(host, mirrored)))


def check_syncs():
    """The host-device syncs of one single-process update at the defaults and of one actor step,
    as throughput.py update counts them."""
    from throughput import Counts, make_actor, single_process_update
    if GPU.type != "cuda":
        return print("syncs: counted on CUDA only")
    args = default_args("--num-envs", "64")
    update, learner = single_process_update(M, args, GPU)
    actor, actor_net = make_actor(GPU)
    for name, fn in (("update", update), ("actor step", lambda: actor.step(actor_net, 1.0))):
        fn()
        counts = Counts(M, GPU)
        counts.run(fn)
        counts.restore()
        print(f"syncs of one {name} at the defaults: {counts.values['host-device syncs']}", flush=True)


def main():
    if GPU.type == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_checks.py: error: no CUDA device visible (these checks compare the CUDA path with the CPU's)")
    print(f"# cuda checks: {hardware(GPU)}", flush=True)
    for run in (check_table_search, check_table_gumbel, check_network_search, check_q_search, check_train_step,
                check_buffer_on_device, check_syncs):
        try:
            run()
        except Exception as error:  # one broken check should not hide the others
            check(run.__name__, False, f"{type(error).__name__}: {error}")
    print(f"{len(failures)} failed: {', '.join(failures)}" if failures else "all passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
