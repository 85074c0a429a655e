"""What the CPU test suite cannot check: that the CUDA path computes what the CPU path does.

    python benchmarks/cuda_checks.py          # on a machine with a GPU; exits 1 if a check fails

Each check runs the same function on the CPU and on cuda:0 (or, for the compiled search, eagerly
and compiled on cuda:0) from the same inputs and compares:
  - pUCT search, lookup-table model: CUDA compiled == CUDA eager (trees), CUDA eager == CPU eager
    (visit counts, root values);
  - pUCT search through the default network (run_search): compiled == eager on CUDA;
  - q_learning.q_search on the table model: CUDA == CPU;
  - two training steps (default network, small batch, NCE on, augmentation off so both devices
    see the same pixels): the second step's losses and priorities and the weights after it,
    CUDA == CPU up to float32 rounding (TF32 off for the comparison);
  - the same step with augmentation on CUDA: finite losses.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import muzero_nce as M  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import q_learning as Q  # noqa: E402

import torch  # noqa: E402

from throughput import default_args, filled_buffer, hardware, table_model  # noqa: E402

CPU, GPU = torch.device("cpu"), torch.device("cuda:0")
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
    cpu, gpu = (one_train_step(device, ["--no-augment"], state) for device in (CPU, GPU))
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
    check("train step with augmentation on CUDA: finite losses", bool(torch.isfinite(losses).all()),
          ", ".join(f"{k}={float(v):.3f}" for k, v in metrics.items() if k.startswith("losses/")))


def main():
    if not torch.cuda.is_available():
        sys.exit("cuda_checks.py: error: no CUDA device visible (these checks compare the CUDA path with the CPU's)")
    print(f"# cuda checks: {hardware(GPU)}", flush=True)
    for run in (check_table_search, check_network_search, check_q_search, check_train_step):
        try:
            run()
        except Exception as error:  # one broken check should not hide the others
            check(run.__name__, False, f"{type(error).__name__}: {error}")
    print(f"{len(failures)} failed: {', '.join(failures)}" if failures else "all passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
