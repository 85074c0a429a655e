"""Throughput of muzero_nce.py's parts on this machine; README quotes these figures.

    python benchmarks/throughput.py search     # pUCT and Gumbel search (and mctx's, if installed) on a
                                               # lookup-table model, then pUCT on the real network
    python benchmarks/throughput.py qsearch    # q_learning.py's Q search beside pUCT search, same table model
    python benchmarks/throughput.py actor      # actor env steps/s: ms_pacman, 64 envs, default network, 50 sims
    python benchmarks/throughput.py learner    # trainer updates/s: default network and batch (200 x 5 unroll steps)
    python benchmarks/throughput.py update     # one training update and one actor step at the defaults, split by
                                               # part, with their roots, network rows and syncs; a 100k run projected
    python benchmarks/throughput.py compare    # the update of this muzero_nce.py against an older one (--against),
                                               # reduced network (--network default: the full one), each version
                                               # in its own processes, in turns; a third row: the old one with
                                               # this version's keep_freed_memory
    python benchmarks/throughput.py busy       # the search and the actor, quiet and beside a busy-loop process
    python benchmarks/throughput.py layout     # env steps/s: the single process vs the process layout
    add --device cuda to run on the GPU (layout: --devices cuda:0,cuda:0,cuda:0 shares one GPU)

Every run prints the hardware it ran on. Timings are medians over --repeats after a warm-up.
The search against DeepMind's mctx and LightZero's C++ tree is ../shared/bench/search_vs_mctx.py.
"""
import argparse
import collections
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import muzero_nce  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads OpenMP)

import numpy as np  # noqa: E402
import torch  # noqa: E402

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


def medians_in_turns(runs, repeats, sync):
    """{name: median seconds} of the functions `runs` {name: fn}, after one warm-up call each,
    timed in turns so that a busy machine slows them alike (their ratio is the figure to keep)."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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


def table_model(device, S=4096, A=9):
    """A random lookup-table model of S states and A actions: the rng that drew it, the
    next-state, reward, value and logits tables (q_search reads the logits table as the Q head),
    and `search`'s recurrent_fn over them."""
    rng = np.random.default_rng(0)
    nxt = torch.as_tensor(rng.integers(0, S, (S, A)), device=device)
    rew, val, logit = (torch.as_tensor(rng.normal(0, 1, shape).astype(np.float32), device=device)
                       for shape in ((S, A), S, (S, A)))

    def recurrent_fn(emb, action):
        n = nxt[emb, action]
        return rew[emb, action], val[n], logit[n], n
    return rng, nxt, rew, val, logit, recurrent_fn


def bench_search(device, repeats, sync):
    """Simulations per second of muzero_nce's pUCT `search` and `gumbel_search` (each eager and
    compiled) on a lookup-table model (the searches' own cost; with mctx installed,
    mctx's muzero_policy and gumbel_muzero_policy on the same work beside them), then of pUCT
    on the default network (B trees of ms_pacman-sized latents), eager and compiled. The
    warm-up call pays each shape's compile."""
    S = 4096
    rng, nxt, rew, val, logit, table = table_model(device, S)
    print(f"{'model':>8} {'B':>5} {'sims':>5} {'pUCT eager':>11} {'pUCT compiled':>14} {'Gumbel eager':>13} "
          f"{'Gumbel compiled':>16} {'mctx pUCT':>10} {'mctx Gumbel':>12}")
    for B in (16, 64, 256):
        for sims in (16, 50):
            roots = torch.as_tensor(rng.integers(0, S, B), device=device)
            puct = [lambda compile=compile: muzero_nce.search(logit[roots], val[roots], roots, table, sims,
                                                              dirichlet_fraction=0.0, compile=compile)
                    for compile in (False, True)]
            # the same Gumbel draw each call: eager and compiled grow the same trees
            gumbel = [lambda compile=compile: muzero_nce.gumbel_search(
                logit[roots], val[roots], roots, table, sims, generator=muzero_nce.make_generator(device, 0),
                compile=compile) for compile in (False, True)]
            rates = [B * sims / median_time(run, repeats, sync) for run in (*puct, *gumbel)]
            for is_gumbel in (False, True):
                run = mctx_timer((nxt, rew, val, logit), roots, sims, is_gumbel)
                rates.append(math.nan if run is None else B * sims / median_time(run, repeats, lambda: None))
            print(f"{'table':>8} {B:>5} {sims:>5} {rates[0]:>11,.0f} {rates[1]:>14,.0f} {rates[2]:>13,.0f} "
                  f"{rates[3]:>16,.0f} {rates[4]:>10,.0f} {rates[5]:>12,.0f}")
    net = muzero_nce.MuZeroNet((3, 96, 96), 4, 9, default_args()).to(device).eval()
    for B in (64, 256):
        obs = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8, device=device)
        rates = []
        for flag in ("--no-compile", "--compile"):
            args = default_args(flag)
            with torch.no_grad():
                rates.append(B * 50 / median_time(lambda: muzero_nce.run_search(net, obs, args, 50),
                                                  max(1, repeats // 3), sync))
        print(f"{'network':>8} {B:>5} {50:>5} {rates[0]:>11,.0f} {rates[1]:>14,.0f}")


def make_actor(device, num_envs=64, sims=50):
    """The actor at the defaults on ms_pacman: its envs, network and buffer."""
    args = default_args("--num-envs", str(num_envs), "--num-simulations", str(sims))
    envs = muzero_nce.make_atari_env_fn(args)(num_envs)
    frame_shape, stack, num_actions = muzero_nce.env_spec(envs)
    net = muzero_nce.MuZeroNet(frame_shape, stack, num_actions, args).to(device).eval()
    buffer = muzero_nce.ReplayBuffer(args.buffer_size, num_envs, frame_shape, num_actions, stack, args.jumps,
                                     args.td_steps)
    return muzero_nce.Actor(envs, buffer, args, device, muzero_nce.make_generator(device, 0), 0), net


def bench_qsearch(device, repeats, sync):
    """Simulations per second of q_learning.q_search (UCB1 over Q-vector nodes) beside
    muzero_nce.search (pUCT) on the same lookup-table model, whose logits table serves as the Q
    head. The two are timed in turns, so a busy machine slows both alike; the ratio is the
    figure to compare across machines. Both run eagerly (q_search has no compiled path)."""
    import q_learning  # here, not at the top: a compare child must import no version but its own
    S = 4096
    rng, nxt, rew, val, logit, table = table_model(device, S)

    def q_table(emb, action):
        n = nxt[emb, action]
        return rew[emb, action], logit[n], n

    print(f"{'B':>5} {'sims':>5} {'search sims/s':>14} {'q_search sims/s':>16} {'ratio':>6}")
    for B in (16, 64, 256):
        for sims in (16, 50):
            roots = torch.as_tensor(rng.integers(0, S, B), device=device)
            runs = {"search": lambda: muzero_nce.search(logit[roots], val[roots], roots, table, sims,
                                                        dirichlet_fraction=0.0, compile=False),
                    "q_search": lambda: q_learning.q_search(logit[roots], roots, q_table, sims)}
            rate = {name: B * sims / t for name, t in medians_in_turns(runs, repeats, sync).items()}
            print(f"{B:>5} {sims:>5} {rate['search']:>14,.0f} {rate['q_search']:>16,.0f} "
                  f"{rate['q_search'] / rate['search']:>6.2f}")


def bench_actor(device, repeats, sync, num_envs=64, sims=50):
    """Env steps per second of the actor (search + ALE stepping + buffer writes)."""
    actor, net = make_actor(device, num_envs, sims)
    seconds = median_time(lambda: actor.step(net, 1.0), repeats, sync)
    print(f"actor: {num_envs} envs, {sims} simulations: {num_envs / seconds:,.0f} env steps/s, "
          f"{num_envs * sims / seconds:,.0f} sims/s ({seconds * 1000:.0f} ms per step)")


def filled_buffer(args, frame_shape=(3, 96, 96), num_actions=9, stack=4, E=64, T=64, M=muzero_nce, device=None):
    """Synthetic data: the cost of an update does not depend on its content."""
    where = {} if device is None else {"device": device}
    buffer = M.ReplayBuffer(E * T, E, frame_shape, num_actions, stack, args.jumps, args.td_steps, **where)
    for t in range(T):
        buffer.add(torch.randint(0, 256, (E, *frame_shape), dtype=torch.uint8), torch.rand(E),
                   torch.zeros(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool), torch.full((E,), t),
                   torch.randint(0, num_actions, (E,)), torch.full((E, num_actions), 1 / num_actions),
                   torch.rand(E), torch.rand(E))
    return buffer


def bench_learner(device, repeats, sync):
    """Updates per second of Learner.train_step at the default batch, unroll and network."""
    args = default_args("--num-envs", "64")
    learner = muzero_nce.Learner(muzero_nce.MuZeroNet((3, 96, 96), 4, 9, args).to(device), args, device)
    buffer, sampler = filled_buffer(args), muzero_nce.make_generator("cpu", 0)

    def update():
        time_, env, weights, td_steps = muzero_nce.sample_batch(buffer, args, 0, sampler)
        seq = muzero_nce.Sequences(*(x.to(device) for x in buffer.window(time_, env)))
        learner.train_step(seq, time_, env, weights.to(device), td_steps)

    seconds = median_time(update, repeats, sync)
    print(f"learner: batch {args.batch_size_per_worker} x {args.jumps} unroll steps, default network: "
          f"{1 / seconds:,.2f} updates/s ({seconds * 1000:,.0f} ms per update)")


class Clock:
    """Wall time per part of a run, each part its own: a part entered inside another (the network
    inside the search) pauses the outer one. Parts are functions wrapped by `patch`, unwrapped by
    `restore`."""

    def __init__(self, sync):
        self.sync, self.seconds, self.parts, self.patched = sync, collections.Counter(), ["other"], []
        self.mark = time.perf_counter()

    def switch(self, enter=None):
        """Credit the time since the last switch to the current part, then enter a part or, with
        enter=None, go back to the one outside it."""
        self.sync()
        now = time.perf_counter()
        self.seconds[self.parts[-1]] += now - self.mark
        self.mark = now
        self.parts.append(enter) if enter else self.parts.pop()

    def patch(self, owner, name, part):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            # Tensor.to counts as a copy only when it names a device; .cpu() always does
            moving = part != "host-device copies" or name == "cpu" or "device" in kwargs \
                or any(isinstance(a, (str, torch.device)) for a in args)
            self.switch(enter=part if moving else self.parts[-1])
            try:
                return real(*args, **kwargs)
            finally:
                self.switch()
        self.patched.append((owner, name, real))
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, real in reversed(self.patched):
            setattr(owner, name, real)

    def report(self, title, total):
        print(f"{title}: {total:,.3f} s")
        for part, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {part:<34} {seconds:>9.3f} s  {100 * seconds / total:5.1f}%")


class Counts:
    """What one update or actor step asks of the hardware: the roots searched, the network rows
    (observations through the representation, latents through the dynamics), each counted as
    forward only (search, reanalyze, bootstrap values) or forward and backward (the learner),
    and the host-device syncs. Syncs are counted on CUDA only, by torch.cuda.set_sync_debug_mode's
    warnings: every call that makes the host wait for the GPU (.item(), .cpu(), bool() of a
    device tensor, ...). On a CPU nothing waits, so they print as '-'."""

    def __init__(self, M, device, *nets):
        self.M, self.device, self.values, self.hooks = M, device, collections.Counter(), []
        self.real_run_search = M.run_search

        def run_search(net, obs, *args, **kwargs):
            self.values["roots searched"] += len(obs)
            return self.real_run_search(net, obs, *args, **kwargs)
        M.run_search = run_search
        for net in nets:  # the rows through each net's representation and dynamics
            for part in ("representation", "dynamics"):
                def hook(module, inputs, output, part=part):
                    kind = "forward and backward" if torch.is_grad_enabled() else "forward"
                    self.values[f"{part} rows, {kind}"] += len(inputs[0])
                self.hooks.append(getattr(net, part).register_forward_hook(hook))

    def run(self, fn):
        """fn(), its syncs counted on CUDA."""
        if self.device.type != "cuda":
            return fn()
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self.values["host-device syncs"] += sum("synchroniz" in str(w.message) for w in caught)

    def restore(self):
        self.M.run_search = self.real_run_search
        for hook in self.hooks:
            hook.remove()


def single_process_update(M, args, device, frame_shape=(3, 96, 96), num_actions=9):
    """train()'s update, built from `M`'s parts (M: muzero_nce, or a version of it before the
    buffer could live on the device): sample a batch, reanalyze its first --reanalyze-fraction
    with the target network (the older version searched with the acting copy, which costs the
    same), train, write the priorities. Returns update() and the learner."""
    net = M.MuZeroNet(frame_shape, 4, num_actions, args).to(device)
    learner = M.Learner(net, args, device)
    on_device = "device" in inspect.signature(M.ReplayBuffer).parameters  # this version: where train() puts it
    where = M.buffer_device(args, device, frame_shape, num_actions) if on_device else torch.device("cpu")
    buffer = filled_buffer(args, frame_shape, num_actions, M=M, device=where if on_device else None)
    sampler, noise = M.make_generator(where, 0), M.make_generator(device, 1)
    refresh = round(args.reanalyze_fraction * args.batch_size_per_worker)

    def update():
        time_, env, weights, td_steps = M.sample_batch(buffer, args, 0, sampler)
        M.reanalyze(learner.target, buffer, time_[:refresh], env[:refresh], args, device, noise)
        seq = M.Sequences(*(x.to(device) for x in buffer.window(time_, env)))
        _, priorities = learner.train_step(seq, time_, env, weights.to(device), td_steps)
        buffer.update_priorities(time_, env, priorities.to(where))
    return update, learner


def bench_update(device, repeats, sync, gpus=4):
    """One training update at the defaults, as the single process runs it: 200 sequences sampled,
    reanalyze with the target network (by default a search at the K+1 = 6 policy rows of each,
    50 simulations, and the bootstrap values of the n = 5 rows after in one plain pass; with
    --search-value-targets, a search at all 11), then the learner's step; and one actor step
    (64 envs, 50 simulations). Each is split into tree ops, network calls, learner, buffer,
    copies and env, with its roots searched, network rows and syncs (Counts). Then the
    wall-clock of a 100k-step run projected from the parts, on one GPU and on `gpus`."""
    M = muzero_nce
    args = default_args("--num-envs", "64")
    update, learner = single_process_update(M, args, device)
    actor, actor_net = make_actor(device)
    step = lambda: actor.step(actor_net, 1.0)
    update(), step()  # warm-up: allocator, caches, compiled graphs
    sync()
    totals, counts = {}, {}
    for name, fn in (("update", update), ("actor step", step)):
        clock, count = Clock(sync), Counts(M, device, learner.net, learner.target, actor_net)
        for owner, method, part in ((M.MuZeroNet, "initial_inference", "network calls"),
                                    (M.MuZeroNet, "recurrent_inference", "network calls"),
                                    (M, "search", "tree ops (search minus network)"),
                                    (M.Learner, "train_step", "learner forward/backward/step"),
                                    (M, "stack_observations", "buffer: sample, window, stack"),
                                    (M.ReplayBuffer, "sample", "buffer: sample, window, stack"),
                                    (M.ReplayBuffer, "window", "buffer: sample, window, stack"),
                                    (M.ReplayBuffer, "add", "buffer: writes"),
                                    (M.ReplayBuffer, "write_targets", "buffer: writes"),
                                    (M.ReplayBuffer, "update_priorities", "buffer: writes"),
                                    (actor.envs, "step", "env step (ALE)")):
            clock.patch(owner, method, part)
        clock.patch(torch.Tensor, "to", "host-device copies")
        clock.patch(torch.Tensor, "cpu", "host-device copies")
        start = clock.mark = time.perf_counter()
        for _ in range(repeats):
            count.run(fn)
        clock.switch(enter="other")  # credit the tail to the part it ran in
        clock.restore()
        count.restore()
        totals[name] = (time.perf_counter() - start) / repeats
        counts[name] = {k: v / repeats for k, v in count.values.items()}
        clock.seconds = collections.Counter({k: v / repeats for k, v in clock.seconds.items()})
        clock.report(f"{name} (mean of {repeats})", totals[name])
        totals[name + " parts"] = clock.seconds
    print("per update / per actor step:")
    for key in sorted(set(counts["update"]) | set(counts["actor step"])):
        shown = lambda c: f"{c[key]:,.0f}" if key in c else "0"
        print(f"  {key:<42} {shown(counts['update']):>10} {shown(counts['actor step']):>10}")
    if device.type != "cuda":
        print(f"  {'host-device syncs':<42} {'-':>10} {'-':>10}   (counted on CUDA only)")
    project(args, totals, gpus)


def project(args, totals, gpus):
    """The wall-clock of a --total-env-steps run at the defaults, from the measured parts: per
    update, reanalyze R (its network calls and tree ops, and writes), the learner L (its step,
    the buffer's sample and window) and the actor A per env step (a step of 64 envs / 64, one
    env step per update at the replay ratio of 1). On one device everything takes turns:
    R + L + A per update. On N GPUs (the actor on GPU 0, trainers on 1..N-1, a reanalyze
    worker on each), if the work spreads as the workers pull it: the larger of (R + L + A) / N,
    L / (N - 1) and A per update. DDP's all-reduce and the processes' handovers are not in it."""
    parts = totals["update parts"]
    L = parts.get("learner forward/backward/step", 0) + parts.get("buffer: sample, window, stack", 0)
    R = totals["update"] - L
    A = totals["actor step"] / args.num_envs
    updates = muzero_nce.updates_allowed(args.total_env_steps, args.learning_starts, 0, args)
    steps = args.total_env_steps
    one = updates * (R + L) + steps * A
    per_update = max((R + L + A) / gpus, L / (gpus - 1), A)
    many = updates * per_update + args.learning_starts * A
    print(f"projected {steps:,}-step run: reanalyze {R:.3f} s + learner {L:.3f} s per update, actor {A * 1000:.1f} "
          f"ms per env step; {updates:,} updates")
    print(f"  one device, everything in turn:  {one / 3600:,.1f} h")
    print(f"  {gpus} GPUs (actor on 0, trainers on 1..{gpus - 1}, reanalyze on all): {many / 3600:,.1f} h "
          f"({one / many:.1f}x the updates/s of one)")


COMPARE_FLAGS = {"reduced": ["--num-envs", "64", "--channels", "16", "--reduced-channels", "8", "--proj-hidden",
                                "64", "--proj-dim", "64", "--pred-hidden", "32", "--support-size", "50"],
                 "default": ["--num-envs", "64"]}

# A compare child: loads one version of muzero_nce.py under that name (so this file's own `import
# muzero_nce` finds it, and only its import-time settings apply), then times its update. With
# `keep` set, this version is imported first under another name, for its keep_freed_memory().
COMPARE_CHILD = """
import importlib.util, json, sys, time
path, device, network, timed, here, keep = sys.argv[1:7]
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
if keep == "1":
    load("muzero_nce_now", here + "/../muzero_nce.py")
M = load("muzero_nce", path)
sys.path.insert(0, here)
import throughput, torch
device = torch.device(device)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
args = M.parse_args(["--device", str(device), *throughput.COMPARE_FLAGS[network]])
update = throughput.single_process_update(M, args, device)[0]
update()  # warm-up
times = []
for _ in range(int(timed)):
    sync()
    start = time.perf_counter()
    update()
    sync()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def bench_compare(device, repeats, sync, against, network="reduced", timed=2):
    """The single process's update at the defaults of this muzero_nce.py and of the one at git
    revision `against`, on a reduced network (16 channels, small NCE heads and supports; the
    batch, unroll, simulations and reanalyze fraction at their defaults) or on the default one,
    each with its own defaults, by the same code (single_process_update). Each version runs in
    its own process, as `python muzero_nce.py` would run it, so that what its import sets for
    the process (this version's keep_freed_memory) applies to it alone: `repeats` rounds, each
    starting one process of each version in turn, which times `timed` updates after a warm-up.
    A third row runs the old version in a process where this version's keep_freed_memory() ran:
    the allocator's share of the speed-up, apart from the code's."""
    old_path = os.path.join(tempfile.mkdtemp(prefix="muzero_old_"), "muzero_nce.py")
    with open(old_path, "w") as f:
        f.write(subprocess.run(["git", "show", f"{against}:muzero_nce.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout)
    versions = {f"{against} (before)": (old_path, "0"), f"{against} + keep_freed_memory": (old_path, "1"),
                "this version": (os.path.join(ROOT, "muzero_nce.py"), "0")}
    times = {name: [] for name in versions}
    for _ in range(repeats):
        for name, (path, keep) in versions.items():
            out = subprocess.run([sys.executable, "-c", COMPARE_CHILD, path, str(device), network, str(timed),
                                  os.path.dirname(os.path.abspath(__file__)), keep], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            times[name] += json.loads(out.stdout.splitlines()[-1])
    print(f"one update at the defaults, {network} network ({' '.join(COMPARE_FLAGS[network])}), "
          f"median of {repeats} processes x {timed} updates each:")
    for name, seconds in times.items():
        print(f"  {name:<34} {statistics.median(seconds):7.3f} s   (all: {' '.join(f'{t:.2f}' for t in seconds)})")
    before, kept, now = (statistics.median(t) for t in times.values())
    print(f"  speed-up: {before / now:.2f}x ({before / kept:.2f}x from keep_freed_memory alone, then {kept / now:.2f}x "
          f"from the code)")


def bench_busy(device, repeats, sync):
    """The single process on a machine where another process holds a core: simulations per second
    of the search (lookup-table model, B = 64, 50 simulations) and of the actor (default network,
    64 envs, 50 simulations), quiet and beside one busy-loop process, in turn, at torch's default
    thread settings. Kept = busy / quiet. Run it on an otherwise idle machine."""
    S, B = 4096, 64
    rng, nxt, rew, val, logit, table = table_model(device, S)
    roots = torch.as_tensor(rng.integers(0, S, B), device=device)
    actor, net = make_actor(device)
    cases = (("search (compiled), table model, B = 64 x 50",
              lambda: muzero_nce.search(logit[roots], val[roots], roots, table, 50, dirichlet_fraction=0.0)),
             ("actor step, default network, 64 x 50", lambda: actor.step(net, 1.0)))
    print(f"{torch.get_num_threads()} intra-op threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{'':<46} {'quiet sims/s':>13} {'busy sims/s':>12} {'kept':>6}")
    for name, fn in cases:
        fn()  # warm-up
        quiet, busy = [], []
        for _ in range(repeats):
            quiet.append(median_time(fn, 1, sync))
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)  # let it take its core
                busy.append(median_time(fn, 1, sync))
            finally:
                spinner.kill()
                spinner.wait()
        q, b = 64 * 50 / statistics.median(quiet), 64 * 50 / statistics.median(busy)
        print(f"{name:<46} {q:>13,.0f} {b:>12,.0f} {b / q:>6.2f}")


def bench_layout(device, repeats, sync, devices=None):
    """Env steps per second of a whole run: the single process against the process layout at the
    same settings (env steps/s averaged over the progress lines after the first)."""
    run_dir = tempfile.mkdtemp(prefix="bench_layout_")  # the runs' events and checkpoints, removed after
    common = ["--num-envs", "8", "--channels", "16", "--proj-hidden", "64", "--proj-dim", "64", "--pred-hidden", "32",
              "--support-size", "50", "--num-simulations", "8", "--batch-size-per-worker", "32", "--buffer-size", "8000",
              "--learning-starts", "400", "--total-env-steps", "2400", "--log-interval", "400", "--eval-interval", "0",
              "--eval-episodes", "1", "--eval-simulations", "1", "--max-episode-frames", "2000",
              "--reanalyze-fraction", "0.25", "--train-steps-per-env-step", "0.25", "--run-dir", run_dir]
    devices = devices or ",".join(["cuda:0" if device.type == "cuda" else "cpu"] * 3)
    try:
        for name, flags in (("single process", ["--num-trainers", "0", "--device", str(device)]),
                            (f"layout ({devices})", ["--devices", devices])):
            out = subprocess.run([sys.executable, "muzero_nce.py", *common, *flags], cwd=ROOT, capture_output=True,
                                 text=True, timeout=1800)
            if out.returncode:
                sys.exit(out.stderr)
            rates = [float(r.replace(",", "")) for r in re.findall(r"\| ([\d,.]+) env/s", out.stdout)][1:-1]
            updates = [float(r.replace(",", "")) for r in re.findall(r"\| ([\d,.]+) upd/s", out.stdout)][1:-1]
            print(f"{name:>32}: {statistics.mean(rates):,.1f} env steps/s, {statistics.mean(updates):,.2f} updates/s")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["search", "qsearch", "actor", "learner", "update", "compare", "busy",
                                         "layout"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", default=None, help="layout: the --devices list of the layout run")
    parser.add_argument("--gpus", type=int, default=4, help="update: the GPU count to project a run on")
    parser.add_argument("--against", default="4718e40", help="compare: the git revision to time against")
    parser.add_argument("--network", choices=["reduced", "default"], default="reduced",
                        help="compare: the reduced network (16 channels) or the default one")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"# {args.part} on {device}: {hardware(device)}")
    if args.part == "layout":
        bench_layout(device, args.repeats, sync, args.devices)
    elif args.part == "update":
        bench_update(device, args.repeats, sync, args.gpus)
    elif args.part == "compare":
        bench_compare(device, args.repeats, sync, args.against, args.network)
    else:
        {"search": bench_search, "qsearch": bench_qsearch, "actor": bench_actor, "learner": bench_learner,
         "update": bench_update, "busy": bench_busy}[args.part](device, args.repeats, sync)


if __name__ == "__main__":
    main()
