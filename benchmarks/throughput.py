"""Throughput of muzero_nce.py's parts on this machine; README quotes these figures.

    python benchmarks/throughput.py search     # pUCT and Gumbel search (and mctx's, if installed) on a
                                               # lookup-table model, then pUCT on the real network
    python benchmarks/throughput.py actor      # actor env steps/s: ms_pacman, 64 envs, default network, 50 sims
    python benchmarks/throughput.py learner    # trainer updates/s: default network and batch (200 x 5 unroll steps)
    python benchmarks/throughput.py layout     # env steps/s: the single process vs the process layout
    add --device cuda to run on the GPU (layout: --devices cuda:0,cuda:0,cuda:0 shares one GPU)

Every run prints the hardware it ran on. Timings are medians over --repeats after a warm-up.
The search against DeepMind's mctx and LightZero's C++ tree is ../shared/bench/search_vs_mctx.py.
"""
import argparse
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import muzero_nce  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hardware(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def median_time(fn, repeats, sync):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def default_args(*flags):
    return muzero_nce.parse_args(["--device", "cpu", *flags])


def mctx_timer(tables, roots, sims, gumbel):
    """mctx's muzero_policy (no root noise) or gumbel_muzero_policy, jit-compiled, on the same
    table model and roots, on JAX's default device; None when mctx is not installed."""
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except ImportError:
        return None
    nxt, rew, val, logit, roots = (jnp.asarray(x.cpu().numpy()) for x in (*tables, roots))

    def recurrent_fn(params, key, action, emb):
        n = nxt[emb, action]
        return mctx.RecurrentFnOutput(reward=rew[emb, action], discount=jnp.full(emb.shape, 0.997),
                                      prior_logits=logit[n], value=val[n]), n

    root = mctx.RootFnOutput(prior_logits=logit[roots], value=val[roots], embedding=roots)
    if gumbel:
        policy = jax.jit(lambda key: mctx.gumbel_muzero_policy(None, key, root, recurrent_fn, sims).action_weights)
    else:
        policy = jax.jit(lambda key: mctx.muzero_policy(None, key, root, recurrent_fn, sims,
                                                        dirichlet_fraction=0.0).action_weights)
    key = jax.random.PRNGKey(0)
    return lambda: policy(key).block_until_ready()


def bench_search(device, repeats, sync):
    """Simulations per second of muzero_nce's pUCT `search` and `gumbel_search` on a lookup-table
    model (the searches' own cost; with mctx installed, mctx's muzero_policy and
    gumbel_muzero_policy on the same work beside them), then of pUCT on the default network
    (B trees of ms_pacman-sized latents)."""
    S, A = 4096, 9
    rng = np.random.default_rng(0)
    nxt = torch.as_tensor(rng.integers(0, S, (S, A)), device=device)
    rew, val, logit = (torch.as_tensor(rng.normal(0, 1, shape).astype(np.float32), device=device)
                       for shape in ((S, A), S, (S, A)))
    generator = muzero_nce.make_generator(device, 0)

    def table(emb, action):
        n = nxt[emb, action]
        return rew[emb, action], val[n], logit[n], n

    print(f"{'model':>8} {'B':>5} {'sims':>5} {'pUCT sims/s':>12} {'Gumbel sims/s':>14} "
          f"{'mctx pUCT':>10} {'mctx Gumbel':>12}")
    for B in (16, 64, 256):
        for sims in (16, 50):
            roots = torch.as_tensor(rng.integers(0, S, B), device=device)
            puct = lambda: muzero_nce.search(logit[roots], val[roots], roots, table, sims, dirichlet_fraction=0.0)
            gumbel = lambda: muzero_nce.gumbel_search(logit[roots], val[roots], roots, table, sims, generator=generator)
            rates = [B * sims / median_time(run, repeats, sync) for run in (puct, gumbel)]
            for is_gumbel in (False, True):
                run = mctx_timer((nxt, rew, val, logit), roots, sims, is_gumbel)
                rates.append(math.nan if run is None else B * sims / median_time(run, repeats, lambda: None))
            print(f"{'table':>8} {B:>5} {sims:>5} {rates[0]:>12,.0f} {rates[1]:>14,.0f} {rates[2]:>10,.0f} "
                  f"{rates[3]:>12,.0f}")
    args = default_args()
    net = muzero_nce.MuZeroNet((3, 96, 96), 4, 9, args).to(device).eval()
    for B in (64, 256):
        obs = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8, device=device)
        run = lambda: muzero_nce.run_search(net, obs, args, 50)
        with torch.no_grad():
            seconds = median_time(run, max(1, repeats // 3), sync)
        print(f"{'network':>8} {B:>5} {50:>5} {B * 50 / seconds:>12,.0f}")


def bench_actor(device, repeats, sync, num_envs=64, sims=50):
    """Env steps per second of the actor (search + ALE stepping + buffer writes)."""
    args = default_args("--num-envs", str(num_envs), "--num-simulations", str(sims))
    envs = muzero_nce.make_atari_env_fn(args)(num_envs)
    frame_shape, stack, num_actions = muzero_nce.env_spec(envs)
    net = muzero_nce.MuZeroNet(frame_shape, stack, num_actions, args).to(device).eval()
    buffer = muzero_nce.ReplayBuffer(args.buffer_size, num_envs, frame_shape, num_actions, stack, args.jumps,
                                     args.td_steps)
    actor = muzero_nce.Actor(envs, buffer, args, device, muzero_nce.make_generator(device, 0), 0)
    seconds = median_time(lambda: actor.step(net, 1.0), repeats, sync)
    print(f"actor: {num_envs} envs, {sims} simulations: {num_envs / seconds:,.0f} env steps/s, "
          f"{num_envs * sims / seconds:,.0f} sims/s ({seconds * 1000:.0f} ms per step)")


def bench_learner(device, repeats, sync):
    """Updates per second of Learner.train_step at the default batch, unroll and network."""
    args = default_args("--num-envs", "64")
    frame_shape, stack, num_actions = (3, 96, 96), 4, 9
    net = muzero_nce.MuZeroNet(frame_shape, stack, num_actions, args).to(device)
    learner = muzero_nce.Learner(net, args, device)
    buffer = muzero_nce.ReplayBuffer(64 * 64, 64, frame_shape, num_actions, stack, args.jumps, args.td_steps)
    for t in range(64):  # synthetic data: the cost of an update does not depend on its content
        buffer.add(torch.randint(0, 256, (64, *frame_shape), dtype=torch.uint8), torch.rand(64),
                   torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool), torch.full((64,), t),
                   torch.randint(0, num_actions, (64,)), torch.full((64, num_actions), 1 / num_actions),
                   torch.rand(64), torch.rand(64))
    sampler = muzero_nce.make_generator("cpu", 0)

    def update():
        time_, env, weights = buffer.sample(args.batch_size_per_worker, 0.4, sampler)
        seq = muzero_nce.Sequences(*(x.to(device) for x in buffer.window(time_, env)))
        learner.train_step(seq, time_, env, weights.to(device))

    seconds = median_time(update, repeats, sync)
    print(f"learner: batch {args.batch_size_per_worker} x {args.jumps} unroll steps, default network: "
          f"{1 / seconds:,.2f} updates/s ({seconds * 1000:,.0f} ms per update)")


def bench_layout(device, repeats, sync, devices=None):
    """Env steps per second of a whole run: the single process against the process layout at the
    same settings (env steps/s averaged over the progress lines after the first)."""
    common = ["--num-envs", "8", "--channels", "16", "--proj-hidden", "64", "--proj-dim", "64", "--pred-hidden", "32",
              "--support-size", "50", "--num-simulations", "8", "--batch-size-per-worker", "32", "--buffer-size", "8000",
              "--learning-starts", "400", "--total-env-steps", "2400", "--log-interval", "400", "--eval-interval", "0",
              "--eval-episodes", "1", "--eval-simulations", "1", "--max-episode-frames", "2000",
              "--reanalyze-fraction", "0.25", "--train-steps-per-env-step", "0.25", "--run-dir", "/tmp/bench_layout"]
    devices = devices or ",".join(["cuda:0" if device.type == "cuda" else "cpu"] * 3)
    for name, flags in (("single process", ["--num-trainers", "0", "--device", str(device)]),
                        (f"layout ({devices})", ["--devices", devices])):
        out = subprocess.run([sys.executable, "muzero_nce.py", *common, *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=1800)
        if out.returncode:
            sys.exit(out.stderr)
        rates = [float(r.replace(",", "")) for r in re.findall(r"\| ([\d,.]+) env/s", out.stdout)][1:-1]
        updates = [float(r.replace(",", "")) for r in re.findall(r"\| ([\d,.]+) upd/s", out.stdout)][1:-1]
        print(f"{name:>32}: {statistics.mean(rates):,.1f} env steps/s, {statistics.mean(updates):,.2f} updates/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["search", "actor", "learner", "layout"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", default=None, help="layout: the --devices list of the layout run")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"# {args.part} on {device}: {hardware(device)}")
    if args.part == "layout":
        bench_layout(device, args.repeats, sync, args.devices)
    else:
        {"search": bench_search, "actor": bench_actor, "learner": bench_learner}[args.part](device, args.repeats, sync)


if __name__ == "__main__":
    main()
