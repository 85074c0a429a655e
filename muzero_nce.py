"""MuZero with a contrastive (InfoNCE) world-model loss, for Atari, in one file.

    python muzero_nce.py --game ms_pacman                    # train (GPU if there is one)
    python muzero_nce.py --game ms_pacman --num-gpus 4       # search on GPU 0, DDP on GPUs 1-3
    python muzero_nce.py --resume runs/<run>/checkpoint.pt   # continue a run
    python muzero_nce.py --evaluate runs/<run>/checkpoint.pt --capture-video   # score and watch it
    python -m pytest -q test_smoke.py                        # tests

Data flow (Schrittwieser et al. 2020, MuZero; Ye et al. 2021, EfficientZero; Oord et al. 2018, InfoNCE):

    envs --obs--> actor: initial_inference + batched MCTS (search) --action--> envs
                    |  frame, reward, search policy, root value
                    v
    replay buffer (tensors) <--fresh policies and values-- reanalyze (search with recent weights)
                    |  sequences of --jumps steps (+ n-step horizon), prioritised
                    v
    trainer: unroll dynamics K steps; policy + value + reward cross-entropy + InfoNCE
                    |  weights, every --publish-interval updates
                    v
    actor and reanalyze

`--num-trainers 0` runs acting, reanalyze and training in turn in one process (the reading
path, deterministic under --seed on CPU); otherwise each part is a process (section 9).
"""
import argparse
import copy
import ctypes
import datetime
import difflib
import gc
import json
import math
import os
import pickle
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

# OpenMP's threads spin while they wait for work. The search runs thousands of tiny ops, and when
# another process holds a core (a second run, any busy job) a spinning thread keeps its partner
# waiting a whole scheduler slice: the search ran 20-50x slower. Passive threads sleep instead.
# Set before torch loads OpenMP; OMP_WAIT_POLICY in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory():
    """glibc's malloc hands every freed block over 32 MB straight back to the OS, so each update's
    batch-sized tensors are fresh pages that the kernel faults in and zeroes again: on a CPU that was
    a third of an update (README, Speed). Keep freed memory for reuse instead (what
    PyTorch's tuning guide gets from jemalloc or tcmalloc, without a dependency). Every process
    that imports the script does this; elsewhere than glibc it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) & libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


keep_freed_memory()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402


# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------
PROG = os.path.basename(__file__)  # the script's name, as its one-line errors give it


def fail(message):
    """Bad input ends the run with one line naming the value and what would be valid."""
    sys.exit(f"{PROG}: error: {message}")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad value; a user wants the one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser():
    p = OneLineParser(prog="muzero_nce.py", description="MuZero + InfoNCE on Atari (defaults: EfficientZero's Atari-100k).")
    g = p.add_argument_group("environment")
    g.add_argument("--game", default="ms_pacman", help="ALE ROM id in snake_case, e.g. ms_pacman, breakout")
    g.add_argument("--grayscale", action="store_true", help="one channel per frame instead of RGB")
    g.add_argument("--frame-size", type=positive_int, default=96, help="frames are resized to this many pixels square")
    g.add_argument("--num-envs", type=positive_int, default=64, help="parallel training envs, searched as one batch")
    g.add_argument("--sticky-actions", type=fraction, default=0.0,
                   help="probability of repeating the previous action (0: the Atari-100k protocol)")
    g.add_argument("--noop-max", type=non_negative_int, default=30, help="up to this many no-ops at reset")
    g.add_argument("--max-episode-frames", type=positive_int, default=108_000,
                   help="evaluation episode cap in frames (30 min: whole games)")
    g.add_argument("--train-episode-frames", type=positive_int, default=12_000,
                   help="training episode cap in frames (EfficientZero: 12,000); a cut episode still bootstraps")
    g.add_argument("--episodic-life", action=argparse.BooleanOptionalAction, default=True,
                   help="a lost life ends the training episode for the value targets; the game goes on "
                        "(EfficientZero; evaluation always plays whole games)")
    g.add_argument("--clip-rewards", action=argparse.BooleanOptionalAction, default=True,
                   help="train on the sign of each reward (EfficientZero); returns are reported unclipped")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1, help="seeds torch, the envs and every sampler")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="the networks' forward passes (acting, reanalyze, the learner's) in bf16 autocast or in fp32; "
                        "losses, h, the supports and the search trees stay in fp32 (default: bf16 on CUDA, fp32 on "
                        "a CPU)")
    g.add_argument("--total-env-steps", type=positive_int, default=100_000,
                   help="agent steps (x4 frames) over all envs; 100k is the Atari-100k budget")
    g.add_argument("--learning-starts", type=non_negative_int, default=2_000,
                   help="env steps collected before training")
    g.add_argument("--train-steps-per-env-step", type=non_negative_float, default=1.0,
                   help="replay ratio: updates (batches of --batch-size-per-worker sequences) per env step, held "
                        "fixed whatever the hardware; W DDP trainers make one optimiser step of W batches per W updates")
    g.add_argument("--eval-interval", type=non_negative_int, default=20_000,
                   help="env steps between evaluations (0: only at the end)")
    g.add_argument("--eval-episodes", type=positive_int, default=32, help="episodes per evaluation, played in parallel")
    g.add_argument("--log-interval", type=positive_int, default=5_000, help="env steps between progress lines")
    g.add_argument("--checkpoint-interval", type=positive_int, default=20_000, help="env steps between checkpoints")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep each periodic checkpoint as checkpoint_<env steps>.pt")
    g.add_argument("--run-dir", default=None,
                   help="where tensorboard events and checkpoints go (default runs/<game>__<seed>__<time>)")
    checkpoint = g.add_mutually_exclusive_group()
    checkpoint.add_argument("--resume", default=None, metavar="PATH",
                            help="continue from a checkpoint; flags given again on the command line override the "
                                 "saved ones")
    checkpoint.add_argument("--evaluate", default=None, metavar="PATH",
                            help="score a checkpoint's final weights with its own evaluation settings (flags given "
                                 "again override them, e.g. --eval-episodes, --device): prints the mean, std, min and "
                                 "max return and writes them to <checkpoint>_eval.json beside it")
    g.add_argument("--capture-video", action=argparse.BooleanOptionalAction, default=False,
                   help="record the first episode of each evaluation as the agent sees it (the newest frame of each "
                        "stack, at 15 steps/s: real time) to <run dir>/videos/eval_<env steps>.mp4 (with "
                        "--evaluate: <checkpoint dir>/evaluate/videos/) and, as an animated GIF, to tensorboard "
                        "(eval/video); needs imageio and imageio-ffmpeg")
    g.add_argument("--save-buffer", action="store_true",
                   help="also store the replay buffer, env and RNG states in checkpoints, so a resumed CPU run repeats exactly")
    g = p.add_argument_group("search")
    g.add_argument("--num-simulations", type=non_negative_int, default=50,
                   help="simulations per move when acting and reanalysing (0: act from the policy head)")
    g.add_argument("--eval-simulations", type=non_negative_int, default=50, help="simulations per move when evaluating")
    g.add_argument("--search", choices=["puct", "gumbel"], default="puct",
                   help="puct: MuZero's pUCT with Dirichlet noise, visit counts as the policy target; gumbel: Gumbel "
                        "MuZero (Sequential Halving over Gumbel-sampled root actions, the improved policy as the "
                        "target), which keeps improving the policy with a few simulations")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the search's tree steps (pUCT or Gumbel) through torch.compile (faster tree ops, 2-4x "
                        "for pUCT; compiling takes seconds once per process and batch shape). Default: on with CUDA, "
                        "off on a CPU, where the network's calls are nearly all of a run")
    g.add_argument("--c1", type=non_negative_float, default=1.25, help="pUCT exploration constant")
    g.add_argument("--c2", type=positive_float, default=19652.0, help="pUCT visit-count scale (MuZero's c2)")
    g.add_argument("--discount", type=fraction, default=0.997 ** 4,
                   help="discount per agent step (EfficientZero: 0.997 per frame, so 0.997^4 for 4 frames)")
    g.add_argument("--min-q-span", type=non_negative_float, default=0.01,
                   help="floor on the span of pUCT's whole-tree min-max Q normalisation (EfficientZero's "
                        "value_delta_max): tiny differences between Q values are not blown up to [0, 1]")
    g.add_argument("--dirichlet-alpha", type=positive_float, default=0.3,
                   help="pUCT's root noise concentration when acting")
    g.add_argument("--dirichlet-fraction", type=fraction, default=0.25, help="pUCT's root noise weight when acting")
    g.add_argument("--max-num-considered-actions", type=positive_int, default=16,
                   help="gumbel: root actions sampled for Sequential Halving (all of them if there are fewer)")
    g.add_argument("--c-visit", type=non_negative_float, default=50.0,
                   help="gumbel: sigma(q) = (c_visit + max visit count) * c_scale * q, q min-max normalised")
    g.add_argument("--c-scale", type=positive_float, default=0.1, help="gumbel: see --c-visit")
    g = p.add_argument_group("replay and targets")
    g.add_argument("--buffer-size", type=positive_int, default=100_000, help="env steps kept (each frame stored once)")
    g.add_argument("--jumps", type=non_negative_int, default=5, help="unroll steps K of the dynamics in training")
    g.add_argument("--td-steps", type=positive_int, default=5, help="n of the n-step value target")
    g.add_argument("--auto-td-steps-ratio", type=non_negative_float, default=0.3,
                   help="off-policy correction (EfficientZero): n shrinks by 1 for every ratio x --total-env-steps "
                        "env steps of a sample's age, down to 1 (0: off)")
    g.add_argument("--priority-alpha", type=non_negative_float, default=0.6, help="prioritised replay exponent")
    g.add_argument("--priority-beta", type=fraction, default=0.4, help="importance-weight exponent, annealed to 1")
    g.add_argument("--search-value-targets", action=argparse.BooleanOptionalAction, default=False,
                   help="bootstrap value targets from the root values of a search at every bootstrap row (the "
                        "original's; reanalyze then searches K+n+1 rows per sequence, not K+1). Default "
                        "(--no-search-value-targets, EfficientZero's): from the target network's value, which "
                        "reanalyze stores with no search")
    g.add_argument("--local-target-net", action="store_true",
                   help="with --no-search-value-targets: each trainer computes bootstrap values with its own target "
                        "network instead of using the values that acting and reanalyze stored")
    g.add_argument("--target-update-interval", type=positive_int, default=200,
                   help="updates between target-network refreshes; reanalyze searches with the target network")
    g.add_argument("--reanalyze-fraction", type=fraction, default=1.0,
                   help="fraction of trained sequences whose policy and value targets are refreshed by reanalyze")
    g = p.add_argument_group("losses and optimiser")
    g.add_argument("--batch-size-per-worker", type=positive_int, default=200,
                   help="sequences per update; each trainer samples its own batch and DDP averages the W batches' "
                        "gradients in one step, which counts as W updates")
    g.add_argument("--policy-loss-weight", type=non_negative_float, default=1.0,
                   help="weight of the policy cross-entropy")
    g.add_argument("--value-loss-weight", type=non_negative_float, default=0.25,
                   help="weight of the value cross-entropy")
    g.add_argument("--reward-loss-weight", type=non_negative_float, default=1.0,
                   help="weight of the reward cross-entropy")
    g.add_argument("--nce", action=argparse.BooleanOptionalAction, default=True,
                   help="InfoNCE world-model loss (--no-nce: off)")
    g.add_argument("--nce-weight", type=non_negative_float, default=1.0, help="weight of the InfoNCE loss")
    g.add_argument("--nce-temperature", type=positive_float, default=0.1, help="temperature of the InfoNCE logits")
    g.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd with momentum (EfficientZero) or adamw (the original)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: 0.2 with sgd, as EfficientZero; 3e-4 with adam, as the original)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random shift (up to 4 pixels) and intensity augmentation of the observations the "
                        "learner sees, NCE targets included (EfficientZero)")
    g.add_argument("--lr-warmup-steps", type=non_negative_int, default=1_000, help="linear warm-up updates")
    g.add_argument("--lr-decay-steps", type=positive_int, default=100_000,
                   help="updates per step decay of the learning rate")
    g.add_argument("--lr-decay-rate", type=fraction, default=0.1, help="factor of each learning-rate decay")
    g.add_argument("--adam-eps", type=positive_float, default=1e-8, help="Adam's epsilon (torch's default)")
    g.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="L2 weight decay")
    g.add_argument("--max-grad-norm", type=positive_float, default=5.0, help="gradient clipping norm")
    g = p.add_argument_group("network")
    g.add_argument("--channels", type=positive_int, default=64, help="channels of the latent state")
    g.add_argument("--blocks", type=positive_int, default=1,
                   help="residual blocks in each of representation, dynamics, prediction")
    g.add_argument("--reduced-channels", type=positive_int, default=16, help="1x1-conv channels before each head's MLP")
    g.add_argument("--head-hidden", type=positive_int, default=32,
                   help="hidden units of the value, reward and policy MLPs")
    g.add_argument("--support-size", type=positive_int, default=300,
                   help="value and reward are categorical on [-n, n] in h-space")
    g.add_argument("--proj-hidden", type=positive_int, default=1024, help="hidden units of the NCE projection")
    g.add_argument("--proj-dim", type=positive_int, default=1024, help="output size of the NCE projection")
    g.add_argument("--pred-hidden", type=positive_int, default=512,
                   help="hidden units of the NCE prediction head (online side)")
    g = p.add_argument_group("processes (section 9)")
    g.add_argument("--num-gpus", type=non_negative_int, default=None, help="GPUs to use (default: all visible)")
    g.add_argument("--num-trainers", type=non_negative_int, default=None,
                   help="trainer processes in one DDP group (0: act, reanalyze and train in one process; "
                        "default: one per GPU after GPU 0, one with a single GPU, 0 without GPUs)")
    g.add_argument("--gpu-0-train", dest="gpu_0_train", action="store_true", help="also put a trainer on GPU 0")
    g.add_argument("--no-gpu-0-train", dest="gpu_0_train", action="store_false",
                   help="GPU 0 only acts, searches and reanalyses (the default with more than one GPU)")
    g.add_argument("--reanalyze-workers", type=non_negative_int, default=None,
                   help="reanalyze processes, spread over the run's GPUs (default: one on each GPU of the run, so "
                        "that reanalyze grows with the GPUs; with --devices, 1)")
    g.add_argument("--publish-interval", type=positive_int, default=100,
                   help="updates between weights sent to actor and reanalyze")
    g.add_argument("--devices", default=None,
                   help="comma list overriding placement: actor, reanalyze workers, trainers in order (e.g. "
                        "cpu,cpu,cpu,cpu)")
    g.add_argument("--fault-after", type=int, default=None,
                   help=argparse.SUPPRESS)  # tests: a trainer raises after N updates
    p.set_defaults(gpu_0_train=None)
    return p


# What a checkpoint's tensors are shaped by: these flags cannot change when a run resumes.
FIXED_ON_RESUME = ("game", "grayscale", "frame_size", "channels", "blocks", "reduced_channels", "head_hidden",
                   "support_size", "proj_hidden", "proj_dim", "pred_hidden", "nce", "optimizer")
FIXED_WITH_BUFFER = ("num_envs", "buffer_size")  # also fixed when the checkpoint holds the buffer


def parse_args(argv=None):
    """Parse flags; with --resume or --evaluate the checkpoint's flags come back, overridden by
    those given now (flags added since the checkpoint was written take their defaults).
    args.command keeps the command line, so that a run's tensorboard and checkpoint say how
    it was started."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    path = args.resume or args.evaluate
    if path:
        flag = "--resume" if args.resume else "--evaluate"
        state = load_checkpoint(path, flag)
        parser = build_parser()
        for action in parser._actions:  # parse again, keeping only the flags actually given
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
        fixed = FIXED_ON_RESUME + (FIXED_WITH_BUFFER if args.resume and "buffer" in state else ())
        for name in fixed:
            if name in given and given[name] != state["args"].get(name):
                name_flag = "--" + name.replace("_", "-")
                fail(f"{flag} {path}: saved with {name_flag}={state['args'].get(name)}, which cannot change "
                     f"{'on resume' if args.resume else 'to evaluate it'} (given {name_flag}={given[name]}); these "
                     f"are fixed: " + ", ".join("--" + n.replace("_", "-") for n in fixed))
        # a checkpoint of a resumed run saved that run's --resume: it is not this command's
        args = argparse.Namespace(**{**vars(args), **state["args"], "resume": None, **given})
    args.command = shlex.join(["python", PROG, *argv])
    if args.lr is None:  # SGD's 0.2 would blow Adam up
        args.lr = 0.2 if args.optimizer == "sgd" else 3e-4
    check_args(args)
    return args


def check_args(args):
    if args.local_target_net and args.search_value_targets:
        fail("--local-target-net computes bootstrap values on the trainer; it needs --no-search-value-targets")
    if args.batch_size_per_worker > args.buffer_size:
        fail(f"--batch-size-per-worker {args.batch_size_per_worker} is larger than --buffer-size {args.buffer_size}")
    rows = args.buffer_size // args.num_envs
    needed = args.jumps + args.td_steps + 4
    if rows <= needed:
        fail(f"--buffer-size {args.buffer_size} holds {rows} steps per env; sequences need more than {needed} "
             f"(--jumps + --td-steps + 4 stacked frames): raise --buffer-size or lower --num-envs")
    if args.learning_starts // args.num_envs <= needed:
        fail(f"--learning-starts {args.learning_starts} gives {args.learning_starts // args.num_envs} steps per env; "
             f"sampling whole sequences needs more than {needed}")
    if args.capture_video:
        video_library()  # a missing library fails now, not at the first evaluation


# ---------------------------------------------------------------------------------------------
# 2. Utilities
# ---------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} but torch sees no CUDA device (use cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name} but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def uses_bf16(args, device):
    """--precision for work on `device`: by default bf16 on CUDA, where tensor cores run it at twice
    the rate of fp32 and it halves the activations' memory, fp32 on a CPU."""
    return args.precision == "bf16" if args.precision else torch.device(device).type == "cuda"


def autocast(args, device):
    """The context of the networks' forward passes: bf16 autocast where uses_bf16 says so. Only the
    networks run in it; whatever reads their outputs (losses, h, the supports, the search's
    trees) takes .float() of them, so that sums over 601 atoms and the trees' statistics keep
    fp32's precision."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(args, device))


def check_precision(args, devices):
    """bf16 on a GPU without bf16 arithmetic (before Ampere) is a one-line error, before any start."""
    for name in dict.fromkeys(devices):
        device = torch.device(name)
        if device.type == "cuda" and uses_bf16(args, device) and torch.cuda.get_device_capability(device) < (8, 0):
            fail(f"--precision bf16 but {device} ({torch.cuda.get_device_name(device)}) has no bf16 arithmetic; "
                 f"use --precision fp32")


H_EPS = 0.001  # MuZero's h keeps a small linear term so that h is invertible everywhere


def h(x):
    """MuZero's value transform h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps x: squashes returns of
    very different scales into a range a fixed categorical support can cover."""
    return torch.sign(x) * (torch.sqrt(torch.abs(x) + 1) - 1) + H_EPS * x


def h_inverse(y):
    """Exact inverse of h (solve the quadratic in sqrt(|x| + 1))."""
    root = (torch.sqrt(1 + 4 * H_EPS * (torch.abs(y) + 1 + H_EPS)) - 1) / (2 * H_EPS)
    return torch.sign(y) * (root ** 2 - 1)


def scalar_to_support(x, support_size):
    """Scalars [...] -> two-hot distributions [..., 2n+1] over the integers -n..n of h(x)."""
    finite = torch.isfinite(x)
    y = h(torch.where(finite, x, 0.0)).clamp(-support_size, support_size)
    low = y.floor()
    upper_weight = y - low
    probs = x.new_zeros(x.shape + (2 * support_size + 1,))
    index = (low + support_size).long()
    probs.scatter_(-1, index[..., None], (1 - upper_weight)[..., None])
    # y = n lands on the last atom with upper_weight 0; clamp keeps its (zero) neighbour in range
    probs.scatter_add_(-1, (index + 1).clamp(max=2 * support_size)[..., None], upper_weight[..., None])
    # a NaN or infinite target becomes a NaN distribution, so the loss check names it
    return torch.where(finite[..., None], probs, math.nan)


def support_to_scalar(logits, support_size):
    """Categorical logits [..., 2n+1] -> scalars [...]: the expectation in h-space, then h^-1.
    Both in float64: in float32 the sum over 601 atoms and the cancellation inside h^-1 each
    leave errors of ~1e-5, enough to give a value near 0 the wrong sign."""
    atoms = torch.arange(-support_size, support_size + 1, device=logits.device, dtype=torch.float64)
    return h_inverse((torch.softmax(logits.float(), -1).double() * atoms).sum(-1)).float()


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-write leaves the last good one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("args", "net", "target", "optimizer", "updates", "acting", "counters")


def load_checkpoint(path, flag="--resume"):
    """The checkpoint dict at `path`, or a one-line error saying what is wrong with the file
    (naming the `flag` that gave it)."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, or not a torch file at all
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"{flag} {path}: cannot read the checkpoint (truncated or not a checkpoint: {reason})")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        fail(f"{flag} {path}: not a checkpoint of this script (no {', '.join(missing)})")
    return state


def learning_rate(args, update):
    """EfficientZero's schedule: linear warm-up, then a step decay every --lr-decay-steps."""
    if update < args.lr_warmup_steps:
        return args.lr * (update + 1) / args.lr_warmup_steps
    return args.lr * args.lr_decay_rate ** (update // args.lr_decay_steps)


def visit_temperature(progress):
    """EfficientZero's acting temperature over the share of training done."""
    return 1.0 if progress < 0.5 else 0.5 if progress < 0.75 else 0.25


# ---------------------------------------------------------------------------------------------
# 3. Environment
# ---------------------------------------------------------------------------------------------
# The env contract, met by ALE's C++ AtariVectorEnv and by any gymnasium vector env a test
# passes as env_fn(num_envs): reset(seed=s) seeds env i with s + i; observations uint8
# [E, stack, H, W] or [E, stack, H, W, C] (oldest frame first, frames before the episode start
# all zero); Discrete actions; and
# NEXT_STEP autoreset: the step after a terminal or truncated observation resets that env and
# returns its first observation with reward 0.

def check_game(game):
    from ale_py import roms
    games = roms.get_all_rom_ids()
    if game not in games:
        close = difflib.get_close_matches(game.lower().replace("-", "_"), games, n=4, cutoff=0.5)
        hint = (f"closest: {', '.join(close)}" if close
                else f"valid names are snake_case ROM ids such as {', '.join(games[:4])}")
        fail(f"unknown game '{game}'; {hint}")


def make_atari_env_fn(args, evaluation=False):
    """Square frames of --frame-size pixels, 4 stacked, frameskip 4 with max-pool, up to --noop-max
    no-ops, raw rewards (the actor clips what it stores, so returns stay real). Training episodes are capped at
    --train-episode-frames, evaluation plays whole games (--max-episode-frames). The env never
    ends an episode at a lost life: with --episodic-life the actor marks it from info["lives"],
    while the game goes on (ALE's own episodic_life would restart the whole game)."""
    check_game(args.game)
    cap = args.max_episode_frames if evaluation else args.train_episode_frames

    def env_fn(num_envs):
        from ale_py.vector_env import AtariVectorEnv
        return AtariVectorEnv(
            args.game, num_envs, img_height=args.frame_size, img_width=args.frame_size, grayscale=args.grayscale,
            stack_num=4, frameskip=4, maxpool=True, noop_max=args.noop_max,
            repeat_action_probability=args.sticky_actions, max_num_frames_per_episode=cap, reward_clipping=False,
            episodic_life=False, use_fire_reset=False, autoreset_mode="NextStep",
            num_threads=min(num_envs, os.cpu_count() or 1))
    return env_fn


def observation_tensor(obs):
    """Env observations [E, S, H, W(, C)] -> network input [E, S*C, H, W], still uint8."""
    obs = torch.from_numpy(np.ascontiguousarray(obs))
    if obs.dim() == 5:
        obs = obs.permute(0, 1, 4, 2, 3)
    return obs.reshape(obs.shape[0], -1, obs.shape[-2], obs.shape[-1])


def probe_env_spec(env_fn):
    """env_spec of one env made by env_fn, for those who need the shapes before their envs."""
    envs = env_fn(1)
    spec = env_spec(envs)
    envs.close()
    return spec


def env_spec(envs):
    """Frame shape [C, H, W], stack depth and action count of a vector env (the contract above)."""
    space, actions = envs.single_observation_space, envs.single_action_space
    if space.dtype != np.uint8 or len(space.shape) not in (3, 4) or not hasattr(actions, "n"):
        fail(f"the env gives {space.dtype} observations of shape {space.shape} and "
                 f"{type(actions).__name__} actions; it needs uint8 [stack, H, W] or [stack, H, W, C] and Discrete")
    shape = space.shape
    stack, (height, width), colours = shape[0], shape[1:3], (shape[3] if len(shape) == 4 else 1)
    return (colours, height, width), stack, int(actions.n)


# ---------------------------------------------------------------------------------------------
# 4. Networks (EfficientZero's Atari sizes by default)
# ---------------------------------------------------------------------------------------------
def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class ResidualBlock(nn.Module):
    def __init__(self, c_in, c_out=None, stride=1):
        super().__init__()
        c_out = c_out or c_in
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.skip = conv3x3(c_in, c_out, stride) if (stride, c_in) != (1, c_out) else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


def scale_hidden(x):
    """Min-max normalise each latent to [0, 1] (MuZero Atari): keeps the dynamics' inputs on
    the scale of the representation's however many steps it is unrolled."""
    flat = x.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-5)).view_as(x)


def mlp(sizes, zero_last=False, batch_norm=True):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b), nn.ReLU()] if batch_norm else [nn.ReLU()]
    if zero_last:  # EfficientZero's init_zero: values and rewards start at 0, the prior uniform
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class Head(nn.Module):
    """1x1 conv to a few channels, then an MLP: latent [B, C, h, w] -> [B, out]."""

    def __init__(self, channels, reduced, latent_hw, hidden, out, zero_last=False):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduced, 1), nn.BatchNorm2d(reduced), nn.ReLU())
        self.mlp = mlp([reduced * latent_hw[0] * latent_hw[1], hidden, out], zero_last)

    def forward(self, x):
        return self.mlp(self.reduce(x).flatten(1))


def pixels(obs):
    """Stacked frames [B, S*C, H, W] uint8 -> float32 in [0, 1], in one copy (never the input),
    laid out channels-last (NHWC). The network's weights are made channels-last too (__init__), the
    layout oneDNN's (CPU) and cuDNN's bf16 convolutions run fastest in. Shapes and values are the
    same either way, but for floating-point rounding."""
    return obs.to(torch.float32, memory_format=torch.channels_last, copy=True).mul_(1 / 255)


class Representation(nn.Module):
    """Stacked frames [B, S*C, H, W] uint8 -> latent [B, channels, h, w] in [0, 1]. Atari-size
    frames pass MuZero's downsampling tower (96 -> 48 -> 24 -> 12 -> 6); small ones keep their size."""

    def __init__(self, in_channels, channels, blocks, downsample):
        super().__init__()
        if downsample:
            half = channels // 2
            layers = [conv3x3(in_channels, half, 2), nn.BatchNorm2d(half), nn.ReLU(), ResidualBlock(half),
                      ResidualBlock(half, channels, 2), ResidualBlock(channels), nn.AvgPool2d(3, 2, 1),
                      ResidualBlock(channels), nn.AvgPool2d(3, 2, 1)]
        else:
            layers = [conv3x3(in_channels, channels), nn.BatchNorm2d(channels), nn.ReLU()]
        self.net = nn.Sequential(*layers, *[ResidualBlock(channels) for _ in range(blocks)])

    def forward(self, obs):
        return scale_hidden(self.net(pixels(obs)))


class Dynamics(nn.Module):
    """(latent, action) -> (next latent, reward logits); the action enters as one-hot planes."""

    def __init__(self, channels, num_actions, blocks, reduced, hidden, support, latent_hw):
        super().__init__()
        self.num_actions = num_actions
        self.conv, self.bn = conv3x3(channels + num_actions, channels), nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.reward = Head(channels, reduced, latent_hw, hidden, 2 * support + 1, zero_last=True)

    def forward(self, latent, action):
        B, _, height, width = latent.shape
        planes = F.one_hot(action, self.num_actions).to(latent.dtype)[:, :, None, None].expand(B, -1, height, width)
        x = F.relu(self.bn(self.conv(torch.cat([latent, planes], 1))) + latent)
        x = self.blocks(x)
        return scale_hidden(x), self.reward(x)


class Prediction(nn.Module):
    """latent -> (policy logits [B, A], value logits [B, 2n+1])."""

    def __init__(self, channels, num_actions, blocks, reduced, hidden, support, latent_hw):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.policy = Head(channels, reduced, latent_hw, hidden, num_actions, zero_last=True)
        self.value = Head(channels, reduced, latent_hw, hidden, 2 * support + 1, zero_last=True)

    def forward(self, latent):
        x = self.blocks(latent)
        return self.policy(x), self.value(x)


def scale_gradient(x, scale):
    """Identity forward; multiplies the gradient by `scale` backward (MuZero's 1/2 on the
    latent entering the dynamics, so the recurrent gradient does not grow with K)."""
    return x * scale + x.detach() * (1 - scale)


class MuZeroNet(nn.Module):
    def __init__(self, frame_shape, stack, num_actions, args):
        super().__init__()
        colours, height, width = frame_shape
        downsample = height >= 64 and width >= 64
        latent_hw = (math.ceil(height / 16), math.ceil(width / 16)) if downsample else (height, width)
        c, blocks, sup = args.channels, args.blocks, args.support_size
        red, hid = args.reduced_channels, args.head_hidden
        self.num_actions, self.support_size, self.stack = num_actions, sup, stack
        self.representation = Representation(stack * colours, c, blocks, downsample)
        self.dynamics = Dynamics(c, num_actions, blocks, red, hid, sup, latent_hw)
        self.prediction = Prediction(c, num_actions, blocks, red, hid, sup, latent_hw)
        latent_size = c * latent_hw[0] * latent_hw[1]
        # NCE heads (EfficientZero's SimSiam sizes): both sides project; only the online side predicts.
        self.projection = nn.Sequential(
            nn.Linear(latent_size, args.proj_hidden), nn.BatchNorm1d(args.proj_hidden), nn.ReLU(),
            nn.Linear(args.proj_hidden, args.proj_hidden), nn.BatchNorm1d(args.proj_hidden), nn.ReLU(),
            nn.Linear(args.proj_hidden, args.proj_dim), nn.BatchNorm1d(args.proj_dim))
        self.projection_head = mlp([args.proj_dim, args.pred_hidden, args.proj_dim])
        if not args.nce:  # no unused parameters (DDP would refuse them)
            self.projection = self.projection_head = None
        self.to(memory_format=torch.channels_last)  # see pixels()

    def initial_inference(self, obs):
        """obs [B, S*C, H, W] uint8 -> latent, policy logits [B, A], value logits [B, 2n+1]."""
        latent = self.representation(obs)
        return (latent, *self.prediction(latent))

    def recurrent_inference(self, latent, action):
        """latent [B, C, h, w], action [B] -> next latent, reward, policy and value logits."""
        next_latent, reward = self.dynamics(latent, action)
        return (next_latent, reward, *self.prediction(next_latent))

    def project(self, latent, online=True):
        z = self.projection(latent.flatten(1))
        return self.projection_head(z) if online else z

    def forward(self, obs, actions, nce=True):
        """The training unroll: obs [B, S*C, H, W] at step 0, actions [B, K]. Returns policy
        logits [B, K+1, A], value logits [B, K+1, 2n+1], reward logits [B, K, 2n+1] and the
        online NCE predictions [B, K, D] (None without NCE). One forward() for DDP."""
        B, K = actions.shape
        latent = self.representation(obs)
        latents, rewards = [latent], []
        for k in range(K):
            latent, reward = self.dynamics(scale_gradient(latent, 0.5), actions[:, k])
            latents.append(latent), rewards.append(reward)
        # One prediction call on all K+1 latents: its BatchNorm then normalises every step with
        # the same statistics, whose running averages are what acting and evaluation use. (One
        # call per step would leave eval-mode statistics far from those of the root.)
        policy, value = self.prediction(torch.cat(latents))
        policies, values = (x.view(K + 1, B, -1).transpose(0, 1) for x in (policy, value))
        rewards = torch.stack(rewards, 1) if K else value.new_zeros(B, 0, value.shape[-1])
        predictions = None
        if nce and K > 0:
            predictions = self.project(torch.cat(latents[1:])).view(K, B, -1).transpose(0, 1)
        return policies, values, rewards, predictions


def make_recurrent_fn(net, args):
    """Adapts the network to search's model interface: (embedding, action) -> (reward, value,
    policy logits, next embedding), scalars decoded from their supports in fp32 (the network
    itself runs under --precision)."""
    def recurrent_fn(latent, action):
        with autocast(args, latent.device):
            next_latent, reward, policy, value = net.recurrent_inference(latent, action)
        return (support_to_scalar(reward, net.support_size), support_to_scalar(value, net.support_size),
                policy, next_latent)
    return recurrent_fn


# ---------------------------------------------------------------------------------------------
# 5. Search: B trees as tensors, searched together (the layout of DeepMind's mctx)
# ---------------------------------------------------------------------------------------------
# Node 0 of every tree is the root; node i is made at simulation i, so N = simulations + 1.
# Each simulation walks down all B trees by pUCT (select; gumbel_search, after search, walks
# them by Gumbel MuZero's rules on the same trees), makes one batched recurrent_fn call
# for the B new leaves (expand), and adds the leaf values back up the paths (backup). The model
# enters only through recurrent_fn, so search works with any model and any embedding tensor.
# Conventions: MuZero's pUCT with c1, c2; Q min-max normalised by the bounds seen in each
# whole tree (MuZero's scheme, not mctx's parent-and-siblings), the span floored at min_q_span
# (EfficientZero); an unvisited action's Q is its parent's mean value; the root's own
# evaluation counts as its first visit, so a node's visit count is 1 + the sum of its children's.

class SearchOutput(NamedTuple):
    visit_counts: Tensor  # [B, A] visits of the root's children
    policy: Tensor        # [B, A] the policy target: visit counts normalised (pUCT), the improved policy (Gumbel)
    root_value: Tensor    # [B]    mean of all values backed up through the root
    action: Tensor        # [B]    the action to play
    tree: "Tree" = None   # the searched trees, read-only (inference-mode tensors); None with 0 simulations


# The statistics of an edge (action a at a node) are those of the child it leads to. They are
# packed along one axis so that one gather fetches all of a node's children at once.
PRIOR, VISITS, VALUE_SUM, REWARD = range(4)


@dataclass
class Tree:
    """B trees of N nodes. Nodes are addressed by flat row b * N + i, so one index reaches
    a node of any tree in every [B, N, ...] tensor viewed as [B * N, ...]."""
    nodes: Tensor       # [B, N, 4]    each node's own statistics (those of the edge into it)
    edges: Tensor       # [B, N, 4, A] the same statistics for each action's child
    children: Tensor    # [B, N, A]    the child's flat row, -1 while the action is unexpanded
    embedding: Tensor   # [B, N, ...]  the model's latent at each node
    bounds: Tensor      # [B, 2]       min and max Q seen in each tree
    values: Tensor      # [B, N]       the model's own value at each node (Gumbel's mixed value reads it)


def init_tree(prior, value, embedding, num_nodes):
    B, A = prior.shape
    nodes = prior.new_zeros(B, num_nodes, 4)
    nodes[:, 0, VISITS] = 1
    nodes[:, 0, VALUE_SUM] = value
    edges = prior.new_zeros(B, num_nodes, 4, A)
    edges[:, 0, PRIOR] = prior
    children = torch.full((B, num_nodes, A), -1, dtype=torch.long, device=prior.device)
    embeddings = embedding.new_zeros((B, num_nodes) + tuple(embedding.shape[1:]))
    embeddings[:, 0] = embedding
    bounds = torch.tensor([math.inf, -math.inf], device=prior.device).repeat(B, 1)
    values = prior.new_zeros(B, num_nodes)
    values[:, 0] = value
    return Tree(nodes, edges, children, embeddings, bounds, values)


def q_normaliser(bounds, min_span):
    """Scale and shift [B, 1] mapping each tree's [min, max] of Q onto [0, 1]. Until a tree has
    seen two different Q values, every Q maps to 0 and the prior alone decides: no division
    by zero when all values are equal, and no blow-up when they are huge. The span is floored
    at `min_span` (EfficientZero's value_delta_max): Q values that differ by a rounding error
    are not stretched into the whole [0, 1] and allowed to outweigh the prior."""
    span = bounds[:, 1:] - bounds[:, :1]
    seen = span > 0
    scale = torch.where(seen, 1 / torch.where(seen, span.clamp(min=min_span), 1.0), 0.0)
    return scale, torch.where(seen, -bounds[:, :1] * scale, 0.0)


def exploration_table(num_nodes, c1, c2, device):
    """MuZero's exploration factor (c1 + log((N + c2 + 1) / c2)) sqrt(N) for every visit
    count N a node can reach in this search, looked up instead of recomputed at each level."""
    n = torch.arange(num_nodes + 1, device=device, dtype=torch.float32)
    return (c1 + torch.log((n + c2 + 1) / c2)) * n.sqrt()


def puct_scores(tree, rows, discount, explore, scale, shift):
    """MuZero's pUCT score [B, A] of every action at the nodes `rows` [B]:
    normalised Q + exploration factor(N_parent) * prior / (1 + N_child)."""
    B, N, _, A = tree.edges.shape
    prior, n, value_sum, reward = tree.edges.view(B * N, 4, A).index_select(0, rows).unbind(1)  # [B, A] each
    parent = tree.nodes.view(B * N, 4).index_select(0, rows)                                   # [B, 4]
    # An unvisited action borrows its parent's mean value (EfficientZero, mctx); MuZero's
    # pseudocode uses 0, which ranks every unexplored action below all explored ones.
    parent_value = (parent[:, VALUE_SUM] / parent[:, VISITS])[:, None]
    q = torch.where(n > 0, torch.addcdiv(reward, value_sum, n.clamp(min=1), value=discount), parent_value)
    c = explore.index_select(0, parent[:, VISITS].long())[:, None]                             # [B, 1]
    return torch.addcdiv(torch.addcmul(shift, q, scale).clamp_(0, 1), c * prior, n + 1)


def select(tree, roots, discount, explore, min_span):
    """Walk down all trees from their roots [B] by pUCT (see descend)."""
    scale, shift = q_normaliser(tree.bounds, min_span)
    return descend(tree, roots, lambda rows, level: puct_scores(tree, rows, discount, explore, scale, shift).argmax(1))


def descend(tree, roots, choose):
    """Walk down all trees from their roots [B], taking the actions choose(rows, level) [B] at
    the nodes `rows` [B] of each level (ties: the lowest index), until the chosen action is
    unexpanded. Returns the path [B, D] (node rows; past a tree's depth, its last node repeats),
    the actions taken along it [B, D] (past the depth, the leaf's action repeats), and the depth [B]."""
    children = tree.children.view(-1)
    A = tree.children.shape[-1]
    rows, active, path, actions, descended = roots, None, [], [], []
    while True:  # one host sync per level, to stop at the deepest path of this simulation
        action = choose(rows, len(path))
        path.append(rows)
        actions.append(action)
        child = children.index_select(0, rows * A + action)
        active = child >= 0 if active is None else active & (child >= 0)
        if not active.any():
            depth = torch.stack(descended, 1).sum(1) if descended else torch.zeros_like(rows)
            return torch.stack(path, 1), torch.stack(actions, 1), depth
        descended.append(active)
        rows = torch.where(active, child, rows)


def put(tensor, index, values, accumulate=False):
    """tensor[index] = values, or += with repeated indices summed (accumulate). Ints in the
    index become tensors: the compiled path writes in place through tensor indices, where a
    write through a view (an int index, a reshape) would copy the whole tree each time."""
    index = tuple(i if torch.is_tensor(i) else torch.full((), i, device=tensor.device) for i in index)
    tensor.index_put_(index, values, accumulate=accumulate)


def expand(tree, sim, leaf, action, reward, value, logits, embedding):
    """Make node `sim` (an int, or a 0-d tensor) of every tree the child of the node rows
    `leaf` [B] through `action` [B]."""
    B, N, _, A = tree.edges.shape
    b = torch.arange(B, device=leaf.device)
    node = leaf % N                                                              # [B] the leaf's index in its tree
    put(tree.children, (b, node, action), b * N + sim)
    put(tree.edges, (b, node, REWARD, action), reward)
    put(tree.edges, (b, sim, PRIOR), torch.softmax(logits.float(), -1))
    put(tree.embedding, (b, sim), embedding)
    put(tree.values, (b, sim), value)
    put(tree.nodes, (b, sim, REWARD), reward)
    # read after the writes to the edges: read before them, the compiled step keeps the old edges
    # alive, a copy of the whole tree's edges per simulation
    put(tree.nodes, (b, sim, PRIOR), tree.edges[b, node, PRIOR, action])


def discount_matrix(size, discount, device):
    """M[d, m] = discount^(m-d-1) for m > d, else 0, so that returns = rewards @ M.T."""
    d = torch.arange(size, device=device)
    power = (d[None, :] - d[:, None] - 1).float()
    return torch.where(power >= 0, discount ** power.clamp(min=0), 0.0)


def backup(tree, path, actions, depth, new_rows, value, discount, discounts):
    """Add the value of the new leaves `new_rows` [B], discounted back through the rewards, to
    every node on their paths and to the edges between them; widen each tree's Q bounds."""
    B, N, _, A = tree.edges.shape
    D = path.shape[1]
    position = torch.arange(D + 1, device=path.device)
    leaf_depth = depth[:, None] + 1                                              # [B, 1]
    on_path = position <= leaf_depth                                             # [B, D+1]
    rows = torch.cat([path, path[:, :1]], 1)
    rows = torch.where(position == leaf_depth, new_rows[:, None], torch.where(on_path, rows, rows[:, :1]))
    b, node = torch.arange(B, device=path.device)[:, None], rows % N             # [B, 1], [B, D+1]
    rewards = tree.nodes[b, node, REWARD] * on_path
    # the return seen from depth d: sum_{m>d} discount^(m-d-1) r_m + discount^(L-d) v, all d at once
    # (a product-sum rather than a matmul, which the compiled path fuses instead of calling BLAS)
    returns = (rewards[:, None, :] * discounts[:D + 1, :D + 1]).sum(-1)
    returns = returns + discount ** (leaf_depth - position).clamp(min=0) * value[:, None]            # [B, D+1]
    returns, visits = returns * on_path, on_path.to(returns.dtype)
    zeros = torch.zeros_like(returns)
    # accumulate: past the depth, a path repeats its root, which gets 0 each time
    put(tree.nodes, (b, node), torch.stack([zeros, visits, returns, zeros], -1), accumulate=True)
    stat = torch.arange(VISITS, VALUE_SUM + 1, device=path.device)[:, None, None]  # [2, 1, 1]: VISITS, VALUE_SUM
    edge = (b, path % N, stat, actions)                                          # the edges from depth d to d+1
    put(tree.edges, edge, torch.stack([visits[:, 1:], returns[:, 1:]]), accumulate=True)
    stats = tree.nodes[b, node]                                                  # [B, D+1, 4]
    q = stats[..., REWARD] + discount * stats[..., VALUE_SUM] / stats[..., VISITS].clamp(min=1)
    is_edge = on_path & (position > 0)                                           # the root has no edge into it
    low = torch.where(is_edge, q, math.inf).amin(1)
    high = torch.where(is_edge, q, -math.inf).amax(1)
    tree.bounds.copy_(torch.stack([torch.minimum(tree.bounds[:, 0], low), torch.maximum(tree.bounds[:, 1], high)], 1))


def select_action(weights, temperature, generator=None):
    """argmax (temperature 0; ties to the lowest index) or a sample from weights^(1/T)."""
    if temperature == 0:
        return weights.argmax(-1)
    logits = torch.log(weights.float()) / temperature
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def dirichlet_noise(prior, alpha, fraction, generator=None):
    # Dirichlet(alpha) as normalised Gamma(alpha) draws: torch's Dirichlet sampler takes no
    # generator, the gamma op beneath it does.
    gamma = torch._standard_gamma(torch.full_like(prior, alpha), generator=generator)
    return (1 - fraction) * prior + fraction * gamma / gamma.sum(-1, keepdim=True)


def simulate(prior, root_value, root_embedding, recurrent_fn, num_simulations, discount, walk):
    """Grow B trees by num_simulations simulations from their roots: prior [B, A] (noised
    already), root_value [B], root_embedding [B, ...]. walk(tree, roots, sim) is the selection
    (pUCT's select, or Gumbel MuZero's) and returns what select returns. Returns the Tree."""
    B, A = prior.shape
    N = num_simulations + 1
    tree = init_tree(prior, root_value, root_embedding, N)
    discounts = discount_matrix(N + 1, discount, prior.device)
    roots = torch.arange(B, device=prior.device) * N                             # node rows of the roots
    embeddings = tree.embedding.view((B * N,) + tree.embedding.shape[2:])
    for sim in range(1, N):
        path, actions, depth = walk(tree, roots, sim)
        leaf, action = path[:, -1], actions[:, -1]                               # [B] each
        reward, value, logits, embedding = recurrent_fn(embeddings.index_select(0, leaf), action)
        expand(tree, sim, leaf, action, reward.float(), value.float(), logits, embedding)
        backup(tree, path, actions, depth, roots + sim, value.float(), discount, discounts)
    return tree


@torch.no_grad()
def search(root_logits, root_value, root_embedding, recurrent_fn, num_simulations, *, discount=0.997,
           c1=1.25, c2=19652.0, min_q_span=0.01, dirichlet_alpha=0.3, dirichlet_fraction=0.25, temperature=0.0,
           generator=None, compile=True):
    """Batched MCTS. root_logits [B, A], root_value [B], root_embedding [B, ...];
    recurrent_fn(embedding, action) -> (reward [B], value [B], logits [B, A], next embedding).
    With 0 simulations the policy is the (noised) prior itself. With dirichlet_fraction=0 the
    result is deterministic. temperature=0 plays the most visited action. compile=False takes
    the eager path (simulate); compile=True the compiled one, which grows the same trees."""
    prior = torch.softmax(root_logits.float(), -1)
    if dirichlet_fraction > 0:
        prior = dirichlet_noise(prior, dirichlet_alpha, dirichlet_fraction, generator)
    root_value = root_value.float()
    if num_simulations == 0:
        return SearchOutput(torch.zeros_like(prior), prior, root_value, select_action(prior, temperature, generator))
    # Inference mode drops the autograd bookkeeping that no_grad still does on every op (version
    # counters, view tracking): a fifth of the search's time at B = 64, where small ops dominate.
    with torch.inference_mode():
        explore = exploration_table(num_simulations + 1, c1, c2, prior.device)
        if compile:
            tree = compiled_simulate(prior, root_value, root_embedding, recurrent_fn, num_simulations, discount,
                                     COMPILED_WALK, COMPILED_END, lambda sim: (explore, min_q_span))
        else:
            walk = lambda tree, roots, sim: select(tree, roots, discount, explore, min_q_span)
            tree = simulate(prior, root_value, root_embedding, recurrent_fn, num_simulations, discount, walk)
        visit_counts = tree.edges[:, 0, VISITS]
        root_value = tree.nodes[:, 0, VALUE_SUM] / tree.nodes[:, 0, VISITS]
    # cloned outside inference mode they are normal tensors, fit to be training targets
    visit_counts, root_value = visit_counts.clone(), root_value.clone()
    return SearchOutput(visit_counts, visit_counts / visit_counts.sum(-1, keepdim=True), root_value,
                        select_action(visit_counts, temperature, generator), tree)

# The compiled path. Eagerly, a simulation makes about 30 small tensor ops per level of the
# descent and about 100 for expand and backup. Each op pays the dispatcher on a CPU and a kernel
# launch on a GPU, and at small batches that overhead, not the arithmetic, is the search.
# torch.compile fuses each step into a few kernels (C++ built by gcc on a CPU, Triton on a GPU).
# The steps are the functions above; what changes is how they are called, so that one graph
# serves every simulation of a search:
# - `walk_levels` takes DESCEND_LEVELS levels of select's walk per call without looking (a
#   tree that reached its leaf stays put), so one host sync, "is any tree still going down?",
#   usually covers a simulation's whole walk. Paths come padded to a multiple of DESCEND_LEVELS,
#   which backup allows (past the depth, a path repeats its leaf).
# - the node index (and Gumbel's Sequential Halving step) goes in as a 0-d tensor, not an int,
#   which the graph would specialise on;
# - the end of a simulation (expand and backup) and the first levels of the next walk are one call.
# Gumbel MuZero's search (below) takes the same path with its own walk, gumbel_walk_levels.
# The eager path above stays the reference; the tests check that both grow the same trees.
DESCEND_LEVELS = 4


def descend_levels(tree, rows, active, choose, levels):
    """`levels` levels of descend's walk without looking, from the node rows [B] of the trees
    still `active` [B], taking the actions choose(rows) [B]; a tree whose action is unexpanded
    stays put. Returns the rows visited and the actions taken there [B, levels], the levels each
    tree went down [B], the rows and active flags reached [B], and whether any tree is still active."""
    children, A = tree.children.view(-1), tree.children.shape[-1]
    path, actions, went = [], [], []
    for _ in range(levels):
        action = choose(rows)
        child = children.index_select(0, rows * A + action)
        active = active & (child >= 0)
        path.append(rows), actions.append(action), went.append(active)
        rows = torch.where(active, child, rows)
    return torch.stack(path, 1), torch.stack(actions, 1), torch.stack(went, 1).sum(1), rows, active, active.any()


def walk_levels(tree, rows, active, discount, explore, min_span, levels):
    """`levels` levels of select's walk (see descend_levels)."""
    scale, shift = q_normaliser(tree.bounds, min_span)
    choose = lambda rows: puct_scores(tree, rows, discount, explore, scale, shift).argmax(1)  # ties: lowest index
    return descend_levels(tree, rows, active, choose, levels)


def end_simulation(tree, sim, path, actions, depth, reward, value, logits, embedding, roots, discount, discounts,
                   walk, *rule):
    """Expand and back up simulation `sim`'s new leaves, then walk the next simulation's first
    levels by `walk` (walk_levels or gumbel_walk_levels) with its selection rule's arguments."""
    expand(tree, sim, path[:, -1], actions[:, -1], reward, value, logits, embedding)
    backup(tree, path, actions, depth, roots + sim, value, discount, discounts)
    return walk(tree, roots, torch.ones_like(roots, dtype=torch.bool), discount, *rule, DESCEND_LEVELS)


class Compiled:
    """A step through torch.compile with static shapes: one graph per shape of the trees (and of
    the path), built at its first call, which says how long that took. If compiling fails (no C++
    compiler, an inductor bug), one warning line, and from then on every search runs the step
    eagerly: slower, the same trees."""
    failure = None  # the first error, process-wide

    def __init__(self, step):
        self.step, self.compiled, self.shapes = step, None, set()

    def __call__(self, tree, *args):
        if Compiled.failure is not None:
            return self.step(tree, *args)
        try:
            if self.compiled is None:
                # one thread: the steps' kernels work on a few hundred numbers, far too few to split
                self.compiled = torch.compile(self.step, dynamic=False, options={"cpp.threads": 1})
                # a run has a few shapes (acting, evaluating, reanalysing); a benchmark has more
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            shape = (*tree.edges.shape, *tree.embedding.shape[2:], args[1].shape[-1])
            if shape in self.shapes:
                return self.compiled(tree, *args)
            start = time.perf_counter()
            out = self.compiled(tree, *args)
            self.shapes.add(shape)
            print(f"search: compiled {self.step.__name__} for trees {tuple(tree.edges.shape[:2])} in "
                  f"{time.perf_counter() - start:.1f} s (once per shape and process)", flush=True)
            return out
        except Exception as error:  # compile errors surface at the first call, before any write
            Compiled.failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            print(f"warning: torch.compile failed, the search runs eagerly ({Compiled.failure})", file=sys.stderr,
                  flush=True)
            return self.step(tree, *args)


COMPILED_WALK, COMPILED_END = Compiled(walk_levels), Compiled(end_simulation)  # and Gumbel's, below


def compiled_simulate(prior, root_value, root_embedding, recurrent_fn, num_simulations, discount, walk, end, rule):
    """simulate through compiled steps: `walk` (walk_levels or gumbel_walk_levels, Compiled) and
    `end` (end_simulation, Compiled, walking by walk's step). rule(sim) is the tuple of the walk's
    arguments after the discount in simulation sim (Gumbel's Sequential Halving step changes with
    it). Returns the Tree."""
    B, A = prior.shape
    N = num_simulations + 1
    tree = init_tree(prior, root_value, root_embedding, N)
    discounts = discount_matrix(N + DESCEND_LEVELS, discount, prior.device)   # paths padded by up to DESCEND_LEVELS
    roots = torch.arange(B, device=prior.device) * N                           # node rows of the roots
    node = torch.arange(N, device=prior.device)                                # node i as a 0-d tensor: node[i]
    embeddings = tree.embedding.view((B * N,) + tree.embedding.shape[2:])
    walked = walk(tree, roots, torch.ones_like(roots, dtype=torch.bool), discount, *rule(1), DESCEND_LEVELS)
    for sim in range(1, N):
        path, actions, depth, rows, active, deeper = walked
        while deeper:  # one host sync per DESCEND_LEVELS levels
            more_path, more_actions, more_depth, rows, active, deeper = walk(tree, rows, active, discount, *rule(sim),
                                                                             DESCEND_LEVELS)
            path, actions = torch.cat([path, more_path], 1), torch.cat([actions, more_actions], 1)
            depth = depth + more_depth
        reward, value, logits, embedding = recurrent_fn(embeddings.index_select(0, path[:, -1]), actions[:, -1])
        # graphs for paths of one and two walks; a deeper one (rare in pUCT, less so in Gumbel's narrower trees)
        # ends eagerly
        step = end if path.shape[1] <= 2 * DESCEND_LEVELS else end.step
        walked = step(tree, node[sim], path, actions, depth, reward.float(), value.float(), logits, embedding, roots,
                      discount, discounts, walk.step, *rule(sim + 1))
    return tree


# Gumbel MuZero (Danihelka et al. 2022, "Policy improvement by planning with Gumbel") on the
# same trees, following DeepMind mctx's gumbel_muzero_policy where the paper leaves a choice.
# At the root, Gumbel-top-k samples the actions to consider (without replacement: the m
# largest of gumbel + logits) and Sequential Halving spends the simulations on them, halving
# them phase by phase. Below the root, a deterministic rule makes the visit counts follow the
# improved policy. Both read sigma(completed Q): an unvisited action's Q is the node's mixed
# value; the completed Q are min-max normalised over that node's own actions (mctx's per-node
# scheme, not the whole-tree bounds pUCT uses), then scaled by sigma. The policy target is
# the improved policy softmax(logits + sigma(completed Q)), not the visit counts, and the
# action played is the Sequential Halving winner.

def considered_visits(num_considered, num_simulations):
    """Sequential Halving's schedule (mctx's get_sequence_of_considered_visits): entry s is the
    visit count that an action must have for the root's simulation s (from 0) to pick it.
    A phase with k actions gives each of them max(1, n // (ceil(log2 m) k)) more visits, one
    round of k simulations at a time; the next phase keeps k // 2 of them (at least 2), until
    the n simulations are spent. With a single action, that action takes every simulation."""
    if num_considered <= 1:
        return list(range(num_simulations))
    phases = math.ceil(math.log2(num_considered))
    schedule, visits, k = [], 0, num_considered
    while len(schedule) < num_simulations:
        rounds = max(1, num_simulations // (phases * k))
        for extra in range(rounds):
            schedule += [visits + extra] * k
        visits += rounds
        k = max(2, k // 2)
    return schedule[:num_simulations]


def sample_gumbel(like, generator=None):
    """Standard Gumbel noise shaped like `like`: -log of Exponential(1) draws."""
    return -torch.empty_like(like, dtype=torch.float32).exponential_(generator=generator).log()


def sigma_completed_q(tree, rows, discount, c_visit, c_scale):
    """sigma(completed Q) [B, A] of every action at the nodes `rows` [B] (mctx's
    qtransform_completed_by_mix_value), with the actions' visit counts [B, A] and priors [B, A].
    A visited action's Q is r + discount * mean value. An unvisited one takes the node's mixed
    value (the paper's Eq. 33), a weighted mean of two estimates: the model's own value at the
    node, with weight 1, and the visited actions' Q averaged under their renormalised prior,
    with weight sum_a N(a). The completed Q are then min-max normalised over the node's actions
    (all equal: all 0) and scaled by sigma's (c_visit + max_a N(a)) c_scale."""
    B, N, _, A = tree.edges.shape
    prior, n, value_sum, reward = tree.edges.view(B * N, 4, A).index_select(0, rows).unbind(1)  # [B, A] each
    visited = n > 0
    q = torch.addcdiv(reward, value_sum, n.clamp(min=1), value=discount)
    tiny = torch.finfo(prior.dtype).tiny  # a visited action whose prior underflowed to 0 still counts
    weight = torch.where(visited, prior.clamp(min=tiny), 0.0)
    visited_q = (weight * q).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=tiny)   # [B, 1]
    total = n.sum(1, keepdim=True)
    raw_value = tree.values.view(-1).index_select(0, rows)[:, None]
    mixed = (raw_value + total * visited_q) / (total + 1)
    completed = torch.where(visited, q, mixed)
    low, high = completed.aminmax(dim=1, keepdim=True)
    normalised = (completed - low) / (high - low).clamp(min=1e-8)  # mctx's epsilon: equal values give 0
    return (c_visit + n.amax(1, keepdim=True)) * c_scale * normalised, n, prior


def halving_scores(gumbel, logits, sigma, visits, considered):
    """Sequential Halving's choice among the actions with `considered` visits (an int or [B, 1]):
    the largest gumbel + logits + sigma(completed Q) [B, A]; the others score -inf."""
    score = (gumbel + logits + sigma).clamp(min=-1e9)  # a prior of 0 stays a candidate, below the rest
    return score.masked_fill(visits != considered, -math.inf)


def halving_action(tree, roots, discount, c_visit, c_scale, gumbel, logits, considered):
    """Sequential Halving's action [B] at the roots [B]: of the actions with `considered` visits
    (an int or a 0-d tensor), the one with the largest gumbel + logits + sigma(completed Q)."""
    sigma, visits, _ = sigma_completed_q(tree, roots, discount, c_visit, c_scale)
    return halving_scores(gumbel, logits, sigma, visits, considered).argmax(1)


def gumbel_interior_action(tree, rows, discount, c_visit, c_scale):
    """The paper's deterministic selection below the root: argmax_a pi'(a) - N(a) / (1 + sum_b N(b)),
    pi' the node's improved policy, so that the visit counts follow pi' (ties: the lowest index)."""
    sigma, n, prior = sigma_completed_q(tree, rows, discount, c_visit, c_scale)
    improved = torch.softmax(torch.log(prior) + sigma, -1)
    return (improved - n / (1 + n.sum(1, keepdim=True))).argmax(1)


def gumbel_walk_levels(tree, rows, active, discount, c_visit, c_scale, gumbel, logits, considered, levels):
    """`levels` levels of gumbel_search's walk (see descend_levels): halving_action at a root,
    gumbel_interior_action below. A row is a root by its index, not by its level: a later call
    continues a deep walk, and a tree whose root action is unexpanded stays at its root."""
    roots = rows - rows % tree.children.shape[1]                                 # [B] the roots of the rows' trees
    root_action = halving_action(tree, roots, discount, c_visit, c_scale, gumbel, logits, considered)
    choose = lambda rows: torch.where(rows == roots, root_action,
                                      gumbel_interior_action(tree, rows, discount, c_visit, c_scale))
    return descend_levels(tree, rows, active, choose, levels)


COMPILED_GUMBEL_WALK, COMPILED_GUMBEL_END = Compiled(gumbel_walk_levels), Compiled(end_simulation)


@torch.no_grad()
def gumbel_search(root_logits, root_value, root_embedding, recurrent_fn, num_simulations, *, discount=0.997,
                  max_num_considered_actions=16, c_visit=50.0, c_scale=0.1, gumbel_scale=1.0, generator=None,
                  compile=True):
    """Batched Gumbel MuZero search, with search's inputs and outputs. The policy is the improved
    policy softmax(logits + sigma(completed Q)) [B, A]; the action is the Sequential Halving winner
    (of the most visited actions, the largest gumbel + logits + sigma). gumbel_scale=0 searches
    without Gumbel noise (evaluation): deterministic, the considered actions are then the most
    probable ones. With 0 simulations the policy is the prior and the action argmax(gumbel + logits).
    compile=False takes the eager path (simulate); compile=True the compiled one, which grows the same trees."""
    logits = torch.log_softmax(root_logits.float(), -1)                         # [B, A]
    prior, root_value = logits.exp(), root_value.float()
    gumbel = gumbel_scale * sample_gumbel(logits, generator) if gumbel_scale else torch.zeros_like(logits)
    if num_simulations == 0:
        return SearchOutput(torch.zeros_like(prior), prior, root_value, (gumbel + logits).argmax(-1))
    schedule = considered_visits(min(max_num_considered_actions, logits.shape[1]), num_simulations)

    def walk(tree, roots, sim):
        # the root has had sim - 1 visits so far: its Sequential Halving step is schedule[sim - 1]
        root_action = halving_action(tree, roots, discount, c_visit, c_scale, gumbel, logits, schedule[sim - 1])
        return descend(tree, roots, lambda rows, level: root_action if level == 0 else
                       gumbel_interior_action(tree, rows, discount, c_visit, c_scale))

    with torch.inference_mode():
        if compile:
            considered = torch.tensor(schedule, device=logits.device)         # step s as a 0-d tensor: considered[s]
            # as walk's schedule[sim - 1]; the last end step also walks a simulation that never comes
            rule = lambda sim: (c_visit, c_scale, gumbel, logits, considered[min(sim, num_simulations) - 1])
            tree = compiled_simulate(prior, root_value, root_embedding, recurrent_fn, num_simulations, discount,
                                     COMPILED_GUMBEL_WALK, COMPILED_GUMBEL_END, rule)
        else:
            tree = simulate(prior, root_value, root_embedding, recurrent_fn, num_simulations, discount, walk)
        roots = torch.arange(len(logits), device=logits.device) * (num_simulations + 1)
        sigma, visit_counts, _ = sigma_completed_q(tree, roots, discount, c_visit, c_scale)
        most_visited = visit_counts.amax(1, keepdim=True)
        action = halving_scores(gumbel, logits, sigma, visit_counts, most_visited).argmax(1)
        policy = torch.softmax(logits + sigma, -1)
        root_value = tree.nodes[:, 0, VALUE_SUM] / tree.nodes[:, 0, VISITS]
    # cloned outside inference mode they are normal tensors, fit to be training targets
    return SearchOutput(visit_counts.clone(), policy.clone(), root_value.clone(), action.clone(), tree)


# ---------------------------------------------------------------------------------------------
# 6. Replay
# ---------------------------------------------------------------------------------------------
class Sequences(NamedTuple):
    """Rows t-S+1 .. t+K+n of sampled (time t, env) sequences, each field [B, W, ...]."""
    frames: Tensor          # [B, W, C, H, W] uint8, the newest frame of each observation
    action: Tensor          # [B, W] action taken at the row's observation
    reward: Tensor          # [B, W] reward received on arriving at the row's observation
    terminal: Tensor        # [B, W] the observation ends its episode (absorbing afterwards)
    truncated: Tensor       # [B, W] the observation was cut by the frame cap (still bootstraps)
    episode_step: Tensor    # [B, W] steps since the episode's first observation
    policy: Tensor          # [B, W, A] search policy
    root_value: Tensor      # [B, W] search root value
    network_value: Tensor   # [B, W] the network's value at the root


class ReplayBuffer:
    """Preallocated tensors, T = capacity // E steps for each of E envs, written as a ring in
    which all envs write row `steps % T` together. Each frame is stored once; observation
    stacks are rebuilt by index. The tensors live on `device`: in the single process on the
    GPU when they fit, so that sampling, the window and every write stay there and an update
    never waits on the host. In the process layout they live in shared host memory, written by
    the actor and reanalyze and read by trainers in other processes (section 9); a process that
    samples on a GPU then keeps its own copy of the frames there (mirror_frames)."""

    FIELDS = ("frames", "action", "reward", "terminal", "truncated", "episode_step", "policy",
              "root_value", "network_value", "priority", "reanalyzed", "max_priority")

    def __init__(self, capacity, num_envs, frame_shape, num_actions, stack, unroll_steps, td_steps,
                 priority_alpha=0.6, device="cpu"):
        T, E = capacity // num_envs, num_envs
        self.T, self.E, self.stack, self.K, self.n, self.alpha = T, E, stack, unroll_steps, td_steps, priority_alpha
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)
        self.frames = zeros(T, E, *frame_shape, dtype=torch.uint8)
        self.action = zeros(T, E, dtype=torch.long)
        self.reward = zeros(T, E)
        self.terminal = zeros(T, E, dtype=torch.bool)
        self.truncated = zeros(T, E, dtype=torch.bool)
        self.episode_step = zeros(T, E, dtype=torch.long)
        self.policy = zeros(T, E, num_actions)
        self.root_value = zeros(T, E)
        self.network_value = zeros(T, E)
        self.priority = zeros(T, E)
        self.reanalyzed = zeros(T, E, dtype=torch.int32)  # times reanalyze refreshed the row
        self.max_priority = zeros(1) + 1                    # new rows start at the highest priority seen
        self.counters = torch.tensor([0.0, 1.0], dtype=torch.float64)  # on the host: steps written per env
        self.mirror = None

    @property
    def steps(self):
        return int(self.counters[0])

    @property
    def device(self):
        return self.frames.device

    def share_memory_(self):
        for name in self.FIELDS + ("counters",):
            getattr(self, name).share_memory_()
        return self

    def add(self, frame, reward, terminal, truncated, episode_step, action, policy, root_value, network_value):
        """Write one step of all E envs; new rows get the highest priority seen so far."""
        row = self.steps % self.T
        for name, value in (("frames", frame), ("reward", reward), ("terminal", terminal), ("truncated", truncated),
                            ("episode_step", episode_step), ("action", action), ("policy", policy),
                            ("root_value", root_value), ("network_value", network_value)):
            getattr(self, name)[row] = value
        self.priority[row] = self.max_priority
        self.reanalyzed[row] = 0
        self.counters[0] += 1  # last: in shared memory this publishes the row to readers

    def times(self, steps=None):
        """Global time [T] held by each ring row (negative while unwritten)."""
        steps = self.steps if steps is None else steps
        return steps - 1 - (steps - 1 - torch.arange(self.T, device=self.device)) % self.T

    def start_mask(self):
        """[T, E]: rows that may start a sequence: their S-1 past rows and K+n future rows are
        still in the ring, and the row is not an episode's last observation."""
        steps = self.steps
        t = self.times(steps)
        ok = (t >= max(0, steps - self.T) + self.stack - 1) & (t + self.K + self.n <= steps - 1)
        return ok[:, None] & ~(self.terminal | self.truncated)

    def sample(self, batch_size, beta, generator=None):
        """Prioritised sampling: P(i) ~ p_i^alpha over valid starts. Returns global times [B],
        envs [B] and importance weights (N P(i))^-beta / max [B], on the buffer's device (and
        `generator` must be a generator of that device)."""
        weights = (self.priority.pow(self.alpha) * self.start_mask()).view(-1)
        # On a GPU this check would make the host wait; there, updates start only once
        # --learning-starts steps are in, which check_args makes enough for whole sequences.
        if self.device.type == "cpu" and not weights.any():
            raise RuntimeError("the replay buffer has no complete sequence to sample yet")
        index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        row, env = index // self.E, index % self.E
        importance = weights[index].pow(-beta)  # N and the sum of the weights cancel in the ratio to the max
        return self.times()[row], env, importance / importance.max()

    def window(self, time, env, before=None, after=None, device=None):
        """Rows time-before .. time+after of each sampled env (default: S-1 back, K+n ahead), as
        Sequences on `device` (default: the buffer's). The frames come from this process's copy
        on that device where it has one (mirror_frames), else from the buffer: from host memory
        to a GPU through pinned memory, without waiting. The other fields are small."""
        before = self.stack - 1 if before is None else before
        after = self.K + self.n if after is None else after
        device = self.device if device is None else torch.device(device)
        rows = (time[:, None] + torch.arange(-before, after + 1, device=time.device)) % self.T     # [B, W]
        envs = env[:, None].expand_as(rows)
        fields = {name: to_device(getattr(self, name)[rows, envs], device) for name in Sequences._fields[1:]}
        if self.mirror is not None and self.mirror.device == device:
            frames = self.synced_mirror()[rows.to(device), envs.to(device)]
        else:
            frames = to_device(self.frames[rows, envs], device)
        return Sequences(frames=frames, **fields)

    def mirror_frames(self, device):
        """Keep a copy of the frames on `device`, this process's own, for window: the layout's
        buffer lives in host memory, and there the window's frames (200 x 14 at the defaults)
        would be gathered and sent over at every update. The copy takes the rows written since
        its last use at each window: one actor step's frames per update, not a batch's."""
        self.mirror, self.mirrored = torch.zeros_like(self.frames, device=device), 0

    def synced_mirror(self):
        steps = self.steps
        new = min(steps - self.mirrored, self.T)
        if new:
            rows = torch.arange(steps - new, steps) % self.T
            self.mirror[rows.to(self.mirror.device)] = to_device(self.frames[rows], self.mirror.device)
        self.mirrored = steps
        return self.mirror

    def write_targets(self, time, env, **fields):
        """Reanalyze's write-back of fresh `fields` (policy, root_value, network_value) at the rows
        of (time, env) [N]. Rows the actor has overwritten since (or is about to) keep what they
        hold, so fresh targets never land on another step's row."""
        keep = time >= self.steps - self.T + 1
        rows = time % self.T
        for name, value in fields.items():
            old = getattr(self, name)[rows, env]
            getattr(self, name)[rows, env] = torch.where(keep.view(-1, *[1] * (old.dim() - 1)), value, old)
        self.reanalyzed[rows, env] += keep.int()

    def update_priorities(self, time, env, priority):
        """New priorities for the rows of (time, env) [B]. One that is not finite and positive
        would break sampling; it is not written (only a non-finite loss makes one, and the
        learner's NonFiniteWatch stops the run for it; raising here would make a GPU wait)."""
        priority = priority.float()
        valid = torch.isfinite(priority) & (priority > 0)
        keep = (time >= self.steps - self.T + 1) & valid
        rows = time % self.T
        self.priority[rows, env] = torch.where(keep, priority, self.priority[rows, env])
        torch.maximum(self.max_priority, torch.where(valid, priority, 0).max(), out=self.max_priority)

    def state_dict(self):
        return {name: getattr(self, name).clone() for name in self.FIELDS + ("counters",)}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).copy_(value)
        if "max_priority" not in state:  # a checkpoint written before the highest priority moved to the device
            self.max_priority.fill_(float(state["counters"][1]))


def fits_on(device, nbytes):
    """Whether `nbytes` more fit in the memory free on the GPU `device` with half of it left for
    the networks and the search (100k Atari frames of 96x96x3 take 2.8 GB)."""
    return torch.device(device).type == "cuda" and nbytes < torch.cuda.mem_get_info(device)[0] / 2


def buffer_device(args, device, frame_shape, num_actions):
    """Where the single process keeps its replay buffer: on its GPU when the buffer fits there,
    else (and on a CPU) in host memory."""
    if torch.device(device).type != "cuda":
        return torch.device("cpu")
    nbytes = args.buffer_size * (math.prod(frame_shape) + 4 * num_actions + 48)
    if fits_on(device, nbytes):
        return torch.device(device)
    print(f"replay buffer: {nbytes / 2**30:.1f} GB do not fit on {device}; they stay in host memory and each "
          f"window goes over through pinned memory", flush=True)
    return torch.device("cpu")


def to_device(tensor, device):
    """tensor on `device`; from host memory to a GPU through pinned memory, so that the copy does
    not make the host wait."""
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def stack_observations(frames, episode_step, stack, rows=None):
    """Rebuild the env's observation stacks from single frames: [B, W, C, H, W] ->
    [B, P, S*C, H, W] at the rows `rows` [P] or [B, P] (0: t, the window's position S-1; by
    default all W-S+1 of them), zeroing frames from before the episode's start (as the env does
    at reset) so no stack mixes two episodes. Only the rows a network will see are stacked."""
    B, device = frames.shape[0], frames.device
    rows = torch.arange(frames.shape[1] - stack + 1, device=device) if rows is None else rows
    rows = rows.expand(B, -1)                                                        # [B, P]
    index = rows[..., None] + torch.arange(stack, device=device)                     # [B, P, S] window positions
    stacks = frames[torch.arange(B, device=device)[:, None, None], index]            # [B, P, S, C, H, W]
    age = stack - 1 - torch.arange(stack, device=device)                             # steps before the row
    keep = age <= episode_step.gather(1, rows + stack - 1)[..., None]                # [B, P, S]
    return (stacks * keep[..., None, None, None]).flatten(2, 3)


def augment(obs, generator=None, shift=4, intensity=0.05):
    """EfficientZero's augmentation of what the learner sees: obs [B, P, S*C, H, W] uint8 ->
    float on the same 0..255 scale. Each sample gets one random shift of up to `shift` pixels
    (replicate-pad, then crop) and one brightness factor 1 + intensity * clip(N(0, 1), -2, 2),
    the same for all its P positions, so the unrolled latents and their NCE targets stay aligned."""
    B, P, C, H, W = obs.shape
    device = obs.device
    offset = torch.randint(-shift, shift + 1, (2, B, 1), device=device, generator=generator)
    rows = (torch.arange(H, device=device) + offset[0]).clamp(0, H - 1)              # [B, H]
    cols = (torch.arange(W, device=device) + offset[1]).clamp(0, W - 1)              # [B, W]
    pixels = (rows[:, :, None] * W + cols[:, None, :]).view(B, 1, 1, H * W)           # [B, 1, 1, H*W]
    out = obs.flatten(3).gather(3, pixels.expand(B, P, C, H * W)).view(B, P, C, H, W)  # one gather, not two
    noise = torch.randn(B, device=device, generator=generator).clamp(-2, 2)
    return out * (1 + intensity * noise)[:, None, None, None, None]                   # uint8 * float: float32


class Targets(NamedTuple):
    value: Tensor           # [B, K+1] n-step value targets
    value_mask: Tensor      # [B, K+1]
    reward: Tensor          # [B, K]   reward targets for unroll steps 1..K
    reward_mask: Tensor     # [B, K]
    policy: Tensor          # [B, K+1, A]
    policy_mask: Tensor     # [B, K+1]
    nce_mask: Tensor        # [B, K]   the real observation at t+k exists (same episode)
    actions: Tensor         # [B, K]
    # where each z_k bootstraps: a network evaluated there (the target network, C51's distribution)
    # needs only these K+1 rows of the window's K+n+1
    bootstrap_row: Tensor = None       # [B, K+1] the row (0: t) whose value z_k bootstraps from, t+k+h
    bootstrap_discount: Tensor = None  # [B, K+1] discount^h where z_k bootstraps, else 0


def td_steps_by_age(args, time, steps):
    """EfficientZero's off-policy correction: each sample's n [B] shrinks by one for every
    --auto-td-steps-ratio x --total-env-steps env steps (over all envs) since its row was
    written, down to 1. Old rows were played by an older policy: their long reward sums say
    little about the current one, so their targets lean sooner on a (reanalysed) value."""
    if args.auto_td_steps_ratio == 0:
        return torch.full_like(time, args.td_steps)
    age = (steps - 1 - time) * args.num_envs                                           # env steps
    per_step = max(1, int(args.auto_td_steps_ratio * args.total_env_steps))
    return (args.td_steps - age // per_step).clamp(1, args.td_steps)


def n_step_targets(seq, values, unroll_steps, td_steps, discount, stack):
    """Targets for unroll steps k = 0..K of sequences starting at window position S-1.
    values [B, K+n+1] are the bootstrap values of rows t..t+K+n, or None: then each z_k is its
    reward sum alone and add_bootstrap adds the values of the rows `bootstrap_row` later (a
    network need not see the other rows). td_steps is n, or each sample's own n [B] (at most the
    window's n; see td_steps_by_age).

    z_k = sum_{i<h} discount^i r_{t+k+i+1} + discount^h v_{t+k+h},  h = min(n, end - k),
    where `end` is the first final row: after a terminal one the bootstrap term is dropped and
    later steps are absorbing (value and reward 0, no policy target); a truncated one (frame
    cap) bootstraps from its own stored value and masks every target after it."""
    K, o = unroll_steps, stack - 1
    rewards = seq.reward[:, o:]                                                        # [B, K+n+1], row t first
    (B, W), device = rewards.shape, rewards.device
    n = W - K - 1                                                                      # the window's n
    td = torch.as_tensor(td_steps, device=device).reshape(-1, 1)                       # [B, 1] (or [1, 1])
    terminal, final = seq.terminal[:, o:], (seq.terminal | seq.truncated)[:, o:]     # [B, K+n+1], row t first
    j = torch.arange(K + n + 1, device=device)
    end = torch.where(final, j, K + n + 1).amin(1, keepdim=True)                      # [B, 1]; K+n+1: no end
    ends_terminal = terminal.gather(1, end.clamp(max=K + n)) & (end <= K + n)         # [B, 1]
    k = torch.arange(K + 1, device=device)
    z = torch.zeros(B, K + 1, device=device)
    for i in range(n):
        step = k + i + 1                                                               # reward on reaching t+k+i+1
        z += discount ** i * rewards[:, step] * ((step <= end) & (i < td))
    horizon = torch.minimum((end - k).clamp(min=0), td)                                # [B, K+1]
    bootstraps = (k <= end) & ~((k + horizon == end) & ends_terminal)
    k1 = k[1:]
    targets = Targets(
        value=z, value_mask=((k <= end) | ends_terminal).float(),
        reward=rewards[:, 1:K + 1] * (k1 <= end), reward_mask=((k1 <= end) | ends_terminal).float(),
        policy=seq.policy[:, o:o + K + 1],
        policy_mask=((k < end) | ((k == end) & ~ends_terminal)).float(),
        nce_mask=(k1 <= end).float(), actions=seq.action[:, o:o + K],
        bootstrap_row=k + horizon, bootstrap_discount=torch.where(bootstraps, discount ** horizon.float(), 0.0))
    return targets if values is None else add_bootstrap(targets, values.gather(1, targets.bootstrap_row))


def add_bootstrap(targets, values):
    """Targets whose z_k gain discount^h times `values` [B, K+1], the bootstrap values of the rows
    `targets.bootstrap_row` (0 where z_k does not bootstrap: past a terminal end)."""
    return targets._replace(value=targets.value + targets.bootstrap_discount * values)


# ---------------------------------------------------------------------------------------------
# 7. Losses
# ---------------------------------------------------------------------------------------------
def cross_entropy(logits, target_probs):
    """Cross-entropy between logits [..., M] and target distributions [..., M] -> [...]."""
    return -(target_probs * F.log_softmax(logits.float(), -1)).sum(-1)


def nce_loss(predictions, targets, temperature, valid, same_episode=None):
    """InfoNCE (Oord et al. 2018) for one unroll step: the online prediction [B, D] of sample i
    must pick out the target projection [B, D] of i's real observation among those of the
    batch, by cosine similarity / temperature. Negatives from i's own episode (same env, same
    episode; also a sequence sampled twice) are masked out, not merely down-weighted: they
    may show the same frame. Returns loss [B] (0 where not valid) and accuracy [B]."""
    targets = targets.detach()  # the target branch only supplies labels
    logits = F.normalize(predictions.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    if same_episode is not None:
        logits = logits.masked_fill(same_episode & (labels[:, None] != labels), -torch.inf)
    logits = logits.masked_fill(~valid.bool()[None, :], -torch.inf)  # past an episode's end: no target
    logits = torch.where(valid.bool()[:, None], logits, 0.0)         # rows without a target give 0
    loss = F.cross_entropy(logits, labels, reduction="none") * valid
    accuracy = (logits.argmax(1) == labels).float() * valid
    return loss, accuracy


def muzero_losses(outputs, targets, target_projections, same_episode, args, support_size):
    """Per-sample loss terms [B] and priorities [B]. outputs = MuZeroNet.forward(...).
    Step 0 counts fully and each unrolled step 1/K (MuZero), so the total does not grow with K."""
    policy_logits, value_logits, reward_logits, predictions = outputs
    K = reward_logits.shape[1]
    step_weight = torch.full((K + 1,), 1.0 / max(K, 1), device=value_logits.device)
    step_weight[0] = 1.0
    value = cross_entropy(value_logits, scalar_to_support(targets.value, support_size)) * targets.value_mask
    policy = cross_entropy(policy_logits, targets.policy) * targets.policy_mask
    reward = cross_entropy(reward_logits, scalar_to_support(targets.reward, support_size)) * targets.reward_mask
    terms = {"value": (value * step_weight).sum(1), "policy": (policy * step_weight).sum(1),
             "reward": (reward * step_weight[1:]).sum(1)}
    metrics = {}
    if predictions is not None:
        losses, accuracies = zip(*(nce_loss(predictions[:, k], target_projections[:, k], args.nce_temperature,
                                            targets.nce_mask[:, k], same_episode) for k in range(K)))
        terms["nce"] = (torch.stack(losses, 1) * step_weight[1:]).sum(1)
        counts = targets.nce_mask.sum(0).clamp(min=1)
        metrics = {f"nce/accuracy_step_{k + 1}": accuracies[k].sum() / counts[k] for k in range(K)}
    predicted = support_to_scalar(value_logits[:, 0].detach(), support_size)
    priorities = (predicted - targets.value[:, 0]).abs() + 1e-6
    return terms, priorities, metrics


# ---------------------------------------------------------------------------------------------
# 8. Acting, reanalyze, training step: what the process loops of section 9 call
# ---------------------------------------------------------------------------------------------
def run_search(net, obs, args, num_simulations, temperature=0.0, noise=False, generator=None, compile=True):
    """initial_inference on observations [B, S*C, H, W], then the batched search (--search).
    `noise` is the root's Dirichlet noise (pUCT) or Gumbel noise (Gumbel). Gumbel MuZero plays
    the Sequential Halving winner: its Gumbel noise already samples the move, so `temperature`
    (pUCT's visit-count temperature) does not apply to it. Either search takes the compiled path
    where --compile (by default: on CUDA) and the caller (`compile`) allow it."""
    with autocast(args, obs.device):
        latent, policy_logits, value_logits = net.initial_inference(obs)
    value = support_to_scalar(value_logits, net.support_size)
    compile = compile and (args.compile if args.compile is not None else obs.device.type == "cuda")
    if args.search == "gumbel":
        out = gumbel_search(policy_logits, value, latent, make_recurrent_fn(net, args), num_simulations,
                            discount=args.discount, max_num_considered_actions=args.max_num_considered_actions,
                            c_visit=args.c_visit, c_scale=args.c_scale, gumbel_scale=1.0 if noise else 0.0,
                            generator=generator, compile=compile)
        return out, value
    out = search(policy_logits, value, latent, make_recurrent_fn(net, args), num_simulations, discount=args.discount,
                 c1=args.c1, c2=args.c2, min_q_span=args.min_q_span, dirichlet_alpha=args.dirichlet_alpha,
                 dirichlet_fraction=args.dirichlet_fraction if noise else 0.0, temperature=temperature,
                 generator=generator, compile=compile)
    return out, value


def network_value(net, obs, args):
    """The network's own value [B] at observations [B, S*C, H, W], without a search."""
    with autocast(args, obs.device):
        value_logits = net.initial_inference(obs)[2]
    return support_to_scalar(value_logits, net.support_size)


def lives_of(info, num_envs):
    """Lives left per env [E] from a step's info (ALE gives them), or None for envs without lives."""
    return torch.as_tensor(info["lives"]).long().reshape(num_envs) if "lives" in info else None


class Actor:
    """Steps E envs, one batched search per step, and writes every step to the buffer. Row t of
    an env holds observation o_t with the reward and end flags that came with it, then the
    search's policy, value and action at o_t. An episode's last observation is searched too
    (NEXT_STEP autoreset ignores its action), so a truncated end has a value to bootstrap from.

    Two kinds of end: the env's own (game over or the frame cap: the env resets at the next
    step) and, with --episodic-life, a lost life (marked terminal for the value targets, while
    the game and its frame stack go on; episode_step keeps counting, so rebuilt stacks match).
    Returns are counted per game, with the env's unclipped rewards."""

    def __init__(self, envs, buffer, args, device, generator, seed):
        self.envs, self.buffer, self.args, self.device, self.generator = envs, buffer, args, device, generator
        self.frame_shape = env_spec(envs)[0]
        self.last_search = None
        self.reset(seed)

    def reset(self, seed):
        E = self.envs.num_envs
        self.obs, info = self.envs.reset(seed=seed)
        self.lives = lives_of(info, E)
        self.reward = torch.zeros(E)
        self.terminal = torch.zeros(E, dtype=torch.bool)
        self.truncated = torch.zeros(E, dtype=torch.bool)
        self.game_over = torch.zeros(E, dtype=torch.bool)   # the env resets at its next step
        self.episode_step = torch.zeros(E, dtype=torch.long)
        self.episode_return = torch.zeros(E, dtype=torch.float64)

    @torch.no_grad()
    def step(self, net, temperature):
        """One step of all envs. Returns the (return, length) of the games that ended."""
        obs = observation_tensor(self.obs)
        out, value = run_search(net, obs.to(self.device), self.args, self.args.num_simulations, temperature,
                                noise=True, generator=self.generator)
        action, self.last_search = out.action.cpu(), out  # the envs step on the host: the actor's one wait
        frame = obs[:, -self.frame_shape[0]:]  # the newest frame of each stack
        # the search's outputs go to the buffer from where they are (device to device in the single process)
        self.buffer.add(frame, self.reward, self.terminal, self.truncated, self.episode_step, action,
                        out.policy, out.root_value, value)
        self.obs, reward, terminal, truncated, info = self.envs.step(action.numpy())
        restarted = self.game_over                           # these envs just reset (their action was ignored)
        reward = torch.where(restarted, 0.0, torch.as_tensor(reward, dtype=torch.float32))
        self.game_over = torch.as_tensor(terminal) | torch.as_tensor(truncated)
        lives, life_lost = lives_of(info, len(reward)), torch.zeros_like(self.game_over)
        if self.args.episodic_life and lives is not None and self.lives is not None:
            life_lost = (lives < self.lives) & ~restarted
        self.lives = lives
        self.reward = torch.sign(reward) if self.args.clip_rewards else reward
        self.terminal, self.truncated = torch.as_tensor(terminal) | life_lost, torch.as_tensor(truncated)
        self.episode_step = torch.where(restarted, 0, self.episode_step + 1)
        self.episode_return = torch.where(restarted, 0.0, self.episode_return) + reward
        ended = self.game_over.nonzero().flatten().tolist()
        return [(float(self.episode_return[i]), int(self.episode_step[i])) for i in ended]

    def state_dict(self):
        return {"obs": self.obs, "reward": self.reward, "terminal": self.terminal, "truncated": self.truncated,
                "game_over": self.game_over, "lives": self.lives, "episode_step": self.episode_step,
                "episode_return": self.episode_return}

    def load_state_dict(self, state):
        for name, value in state.items():
            setattr(self, name, value)


@torch.no_grad()
def evaluate(net, env_fn, args, device, seed, video=None):
    """Play --eval-episodes episodes in parallel envs without exploration: no root noise, the
    most visited action (Gumbel: the Sequential Halving winner, without Gumbel noise),
    --eval-simulations. Returns the episode returns [episodes]. A list passed as `video`
    receives the first episode's frames as the agent sees them: the newest frame of each
    observation, [H, W] or [H, W, C], from the reset to the last."""
    envs = env_fn(args.eval_episodes)
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(args.eval_episodes)
    done = np.zeros(args.eval_episodes, dtype=bool)
    while not done.all():
        if video is not None and not done[0]:
            video.append(np.array(obs[0, -1]))  # a copy: vector envs may reuse their observation buffer
        playing = torch.as_tensor(~done)
        # compiled while every env plays: each smaller batch of the tail would be a graph to compile
        out, _ = run_search(net, observation_tensor(obs)[playing].to(device), args, args.eval_simulations,
                            compile=bool(playing.all()))
        action = np.zeros(args.eval_episodes, dtype=np.int64)
        action[~done] = out.action.cpu().numpy()
        obs, reward, terminal, truncated, _ = envs.step(action)
        if video is not None and not done[0] and (terminal[0] or truncated[0]):
            video.append(np.array(obs[0, -1]))  # the first episode's last frame
        returns += reward * ~done
        done |= terminal | truncated
    envs.close()
    return returns


def sample_batch(buffer, args, env_steps, generator=None):
    """--batch-size-per-worker prioritised sequence starts: times [B], envs [B], importance
    weights [B] (beta annealed from --priority-beta to 1 over the run) and each sample's n [B]."""
    beta = args.priority_beta + (1 - args.priority_beta) * min(1.0, env_steps / args.total_env_steps)
    time, env, weights = buffer.sample(args.batch_size_per_worker, beta, generator)
    return time, env, weights, td_steps_by_age(args, time, buffer.steps)


REANALYZE_CHUNK = 2048  # trees searched at once; bounds the memory of the nodes' latents


@torch.no_grad()
def reanalyze(net, buffer, time, env, args, device, generator=None):
    """MuZero Reanalyze at EfficientZero's cost. `net` is the target network. A fresh search at
    the K+1 rows t..t+K of each sequence, whose policies train, gives their policy targets; the
    network's value at every row t..t+K+n gives the bootstrap values, from the search's own
    initial inference at rows t..t+K and one more batched pass, with no search, at the n rows
    after. With --search-value-targets every row is searched (11 roots a sequence at the
    defaults, not 6) and its root value is the bootstrap. The search is the actor's, root noise
    included, as in EfficientZero: noise-free targets sharpen the policy onto the network's
    current favourite and starve exploration. Writes the fresh policies, root values and values
    back; returns the simulations run."""
    seq = buffer.window(time, env, device=device)
    B, L = len(time), buffer.K + buffer.n + 1
    searched = L if args.search_value_targets else buffer.K + 1
    times = time[:, None] + torch.arange(L, device=time.device)                          # [B, K+n+1]
    envs = env[:, None].expand(B, L)
    to_buffer = lambda x: x.to(buffer.device)  # a host buffer (the layout's) takes them over from the device
    stacked = lambda rows: stack_observations(seq.frames, seq.episode_step, buffer.stack,
                                              torch.arange(*rows, device=device)).flatten(0, 1)
    roots = stacked((0, searched))                                                      # [B*searched, S*C, H, W]
    # equal chunks: one shape, one compiled graph; a chunk bounds the memory of the trees' latents
    results = [run_search(net, chunk, args, args.num_simulations, noise=True, generator=generator)
               for chunk in roots.chunk(-(-len(roots) // REANALYZE_CHUNK))]
    policy, root_value, value = (to_buffer(torch.cat(parts)) for parts in
                                 zip(*[(out.policy, out.root_value, value) for out, value in results]))
    buffer.write_targets(times[:, :searched].flatten(), envs[:, :searched].flatten(), policy=policy,
                         root_value=root_value, network_value=value)
    if searched < L:
        rest = stacked((searched, L))                                                   # [B*(L-searched), S*C, H, W]
        value = torch.cat([network_value(net, chunk, args) for chunk in rest.split(REANALYZE_CHUNK)])
        buffer.write_targets(times[:, searched:].flatten(), envs[:, searched:].flatten(),
                             network_value=to_buffer(value))
    return len(roots) * args.num_simulations


class NonFiniteError(RuntimeError):
    pass


class NonFiniteWatch:
    """The first update whose losses or gradient norm were not finite, kept on the device with
    those values: checking them at every update would make the host wait for the GPU each time.
    check() reads them (a host read), every --publish-interval updates and before each
    checkpoint, so that neither the actor nor a checkpoint gets the weights of a broken update."""

    def __init__(self):
        self.names, self.first = None, None

    def note(self, update, losses, grad_norm):
        """losses: {name: loss} of the update numbered `update`, and its gradient norm."""
        values = torch.stack([*losses.values(), grad_norm]).detach().float()
        record = torch.cat([torch.full((1,), float(update), device=values.device), values])
        first = record.new_full(record.shape, -1.0) if self.first is None else self.first  # update -1: none yet
        self.names, self.first = list(losses), torch.where(~torch.isfinite(record).all() & (first[0] < 0), record,
                                                           first)

    def check(self):
        """Raise NonFiniteError naming the first non-finite update and its loss terms, if any."""
        if self.first is None or self.first[0] < 0:
            return
        update, *values, grad_norm = self.first.tolist()
        detail = ", ".join(f"{name}={value:.4g}" for name, value in zip(self.names, values))
        if all(map(math.isfinite, values)):
            raise NonFiniteError(f"non-finite gradient at update {int(update)} (losses: {detail})")
        raise NonFiniteError(f"non-finite loss at update {int(update)} ({detail})")


def optimizer_step(learner, terms, weights, metrics):
    """The end of every update: each loss term's importance-weighted mean [B] -> [] times its
    weight, one optimiser step at the scheduled learning rate with the gradient clipped, the
    losses and gradient watched (NonFiniteWatch) and the target network refreshed every
    --target-update-interval updates. Returns the metrics."""
    args = learner.args
    losses = {name: (term * weights).mean() for name, term in terms.items()}
    loss = sum(learner.loss_weights[name] * value for name, value in losses.items())
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(learner.net.parameters(), args.max_grad_norm)
    learner.watch.note(learner.updates + learner.world, {"total": loss, **losses}, grad_norm)
    for group in learner.optimizer.param_groups:
        group["lr"] = learning_rate(args, learner.updates)
    learner.optimizer.step()
    metrics.update({f"losses/{name}": v.detach() for name, v in losses.items()})
    metrics.update({"losses/total": loss.detach(), "losses/grad_norm": grad_norm,
                    "charts/learning_rate": torch.tensor(learning_rate(args, learner.updates))})
    learner.updates += learner.world
    if crossed(learner.updates, learner.world, args.target_update_interval):
        with torch.no_grad():
            for target, online in learner.target_pairs:
                target.copy_(online)
    return metrics


class Learner:
    """The online network (DDP-wrapped in a trainer process), its optimiser, and a target
    network refreshed every --target-update-interval updates for the NCE targets, reanalyze
    (EfficientZero) and, with --local-target-net, the bootstrap values.

    `updates` counts batches of --batch-size-per-worker sequences. With `world` DDP trainers,
    one optimiser step (train_step) averages the gradients of `world` batches and counts as
    `world` updates. The replay ratio, the learning-rate schedule, the target refresh and the
    checkpoints all count these updates, so the sequences trained per env step, and what
    happens when, do not depend on the number of GPUs."""

    def __init__(self, net, args, device, model=None, world=1, seed=0):
        self.net, self.model, self.args, self.device, self.world = net, model or net, args, device, world
        self.target = copy.deepcopy(net).eval().requires_grad_(False)
        # (target, online) tensor pairs, copied in place at each refresh: load_state_dict walks every
        # module each time, which cost a fifth of a small update refreshed at each one
        self.target_pairs = list(zip(self.target.state_dict().values(), net.state_dict().values()))
        self.generator = make_generator(device, seed)  # augmentation
        if args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                             weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, eps=args.adam_eps,
                                               weight_decay=args.weight_decay)
        self.updates, self.watch = 0, NonFiniteWatch()
        self.loss_weights = {"value": args.value_loss_weight, "policy": args.policy_loss_weight,
                             "reward": args.reward_loss_weight, "nce": args.nce_weight}

    def train_step(self, seq, time, env, weights, td_steps):
        """seq: Sequences on the device; weights [B] importance weights; td_steps [B] each
        sample's n. Returns (metrics, priorities)."""
        args, S, K = self.args, self.net.stack, self.args.jumps
        B, device = seq.frames.shape[0], seq.frames.device
        obs = stack_observations(seq.frames, seq.episode_step, S, torch.arange(K + 1, device=device))  # [B, K+1, ...]
        with torch.no_grad():
            targets = n_step_targets(seq, None, K, td_steps.to(self.device), args.discount, S)  # rewards alone
            if args.local_target_net:  # the target network's value at the K+1 bootstrap rows, in one pass
                at_rows = stack_observations(seq.frames, seq.episode_step, S, targets.bootstrap_row)  # [B, K+1, ...]
                values = network_value(self.target, at_rows.flatten(0, 1), args).view(B, K + 1)
            else:  # stored: the search's root values, or the values reanalyze and acting stored
                stored = (seq.root_value if args.search_value_targets else seq.network_value)[:, S - 1:]
                values = stored.gather(1, targets.bootstrap_row)                               # [B, K+1]
            targets = add_bootstrap(targets, values)
            seen = augment(obs, self.generator) if args.augment else obs                    # [B, K+1, S*C, H, W]
            projections = same_episode = None
            if args.nce and K > 0:
                with autocast(args, self.device):  # the observations at t+1..t+K
                    real = self.target.representation(seen[:, 1:].flatten(0, 1))
                    projections = self.target.project(real, online=False).view(B, K, -1)
                start = (time.to(self.device) - seq.episode_step[:, S - 1])
                env = env.to(self.device)
                same_episode = (env[:, None] == env) & (start[:, None] == start)
        self.model.train()
        with autocast(args, self.device):  # the losses take .float() of the outputs
            outputs = self.model(seen[:, 0], targets.actions, nce=args.nce)
        terms, priorities, metrics = muzero_losses(outputs, targets, projections, same_episode, args,
                                                   self.net.support_size)
        return optimizer_step(self, terms, weights, metrics), priorities.detach()

    def state_dict(self):
        return {"net": self.net.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


# ---------------------------------------------------------------------------------------------
# 9. Processes: the actor on GPU 0, DDP trainers on the other GPUs, reanalyze on every GPU
# ---------------------------------------------------------------------------------------------
# torch.multiprocessing (spawn). The launcher makes the shared state, starts the processes,
# prints progress from the shared counters and tears everything down when one fails:
#   actor       steps the envs with one batched search per step, writes the buffer, evaluates
#   trainers    one DDP group; each samples its own --batch-size-per-worker sequences per update,
#               ahead of time, and hands them to reanalyze before training on them
#   reanalyze   refreshes the first --reanalyze-fraction of each such batch with the target
#               network (--reanalyze-workers, by default one on each GPU: reanalyze is most of
#               an update's work, so it must grow with the GPUs), as the single process does
#               before each update
# The replay ratio is held across processes: trainers wait for env steps, and the actor waits
# when training falls more than two actor steps behind, so results do not depend on which
# part of the machine is faster. Under torchrun, each node runs this layout and all trainers
# of all nodes form one DDP group (rendezvous on MASTER_PORT + 1).

# Shared int64 counters and float64 statistics, by index.
(ENV_STEPS, UPDATES, SIMS, REANALYZED, VERSION, STOP, ACTOR_DONE, TRAINERS_DONE, START_STEPS, BASE_UPDATES,
 TARGET_VERSION) = range(11)
RETURN, EVAL_RETURN, LOSS, STALENESS = range(4)
# A trainer's sampled batch goes FREE -> WAITING (for reanalyze) -> CLAIMED -> READY (to train on).
FREE, WAITING, CLAIMED, READY = range(4)


class Layout(NamedTuple):
    actor: str
    reanalyze: list
    trainers: list
    backend: str
    node_rank: int = 0
    num_nodes: int = 1
    master: str = ""


def plan_layout(args):
    """Where each process runs, or None for the single process. Impossible requests are
    one-line errors here, before anything starts."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = visible if args.num_gpus is None else args.num_gpus
    if args.device == "cpu" and args.num_gpus is None:
        gpus = 0  # --device cpu: no GPU, whatever the machine has
    if gpus > visible:
        fail(f"--num-gpus {gpus} but this machine has {visible} GPU(s)")
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        for d in devices:
            if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
                fail(f"--devices entry '{d}' is not cpu or cuda:N")
            if d.startswith("cuda:") and int(d[5:]) >= visible:
                fail(f"--devices entry '{d}' but this machine has {visible} GPU(s)")
        R = 1 if args.reanalyze_workers is None else args.reanalyze_workers
        trainers = len(devices) - 1 - R
        if trainers < 1 or (args.num_trainers is not None and args.num_trainers != trainers):
            fail(f"--devices lists {len(devices)} devices; it needs 1 actor + {R} reanalyze + "
                 f"{args.num_trainers or 'at least 1'} trainer(s)")
        actor, reanalyze, trainer_devices = devices[0], devices[1:1 + R], devices[1 + R:]
    else:
        gpu_0_train = args.gpu_0_train if args.gpu_0_train is not None else gpus <= 1
        slots = [f"cuda:{i}" for i in range(0 if gpu_0_train else 1, gpus)] if gpus else []
        trainers = args.num_trainers if args.num_trainers is not None else (len(slots) if gpus else 0)
        if trainers == 0:
            return None
        if gpus and trainers > len(slots):
            where = "GPUs 0.." if gpu_0_train else "GPUs 1.."
            fail(f"--num-trainers {trainers} needs one GPU each but {where}{gpus - 1} give {len(slots)} "
                         f"(use --gpu-0-train, fewer trainers, or --devices)")
        actor = "cuda:0" if gpus else "cpu"
        # reanalyze grows with the GPUs: by default a worker on each GPU of the run, GPU 0 included
        run = [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
        R = len(run) if args.reanalyze_workers is None else args.reanalyze_workers
        reanalyze = [run[i % len(run)] for i in range(R)]
        trainer_devices = slots[:trainers] if gpus else ["cpu"] * trainers
    if args.reanalyze_fraction > 0 and args.num_simulations > 0 and not reanalyze:
        fail("--reanalyze-fraction > 0 needs --reanalyze-workers >= 1 in the process layout")
    distinct_gpus = (all(d.startswith("cuda") for d in trainer_devices)
                     and len(set(trainer_devices)) == len(trainer_devices))
    layout = Layout(actor, reanalyze, trainer_devices, "nccl" if distinct_gpus else "gloo")
    if "TORCHELASTIC_RUN_ID" in os.environ or "GROUP_RANK" in os.environ:  # launched by torchrun
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) != 1:
            fail("under torchrun use --nproc-per-node 1: each node's process starts its own layout")
        port = int(os.environ["MASTER_PORT"]) + 1
        layout = layout._replace(node_rank=int(os.environ["RANK"]), num_nodes=int(os.environ["WORLD_SIZE"]),
                                 master=f"tcp://{os.environ['MASTER_ADDR']}:{port}")
    return layout


class Shared:
    """What the processes share, all in shared memory: the replay buffer, the published weights
    of the online network (for the actor) and of the target network (for reanalyze), each with
    its version (the update it comes from), counters and statistics."""

    def __init__(self, ctx, args, frame_shape, stack, num_actions, weights, target, layout):
        self.buffer = ReplayBuffer(args.buffer_size, args.num_envs, frame_shape, num_actions, stack, args.jumps,
                                   args.td_steps, args.priority_alpha).share_memory_()
        self.weights, self.target = weights.share_memory(), target.share_memory()
        self.counters = torch.zeros(11, dtype=torch.long).share_memory_()
        self.reanalyzed_by = torch.zeros(len(layout.reanalyze), dtype=torch.long).share_memory_()  # per worker
        self.stats = torch.full((4,), math.nan, dtype=torch.float64).share_memory_()
        # The (time, env) starts of each trainer's coming batches, and where each batch stands: one
        # being trained on and enough sampled ahead to keep every reanalyze worker busy.
        T = len(layout.trainers)
        self.lookahead = 1 + -(-max(1, len(layout.reanalyze)) // T)
        self.batches = torch.zeros(T, self.lookahead, 2, args.batch_size_per_worker, dtype=torch.long).share_memory_()
        self.batch_state = torch.full((T, self.lookahead), FREE, dtype=torch.long).share_memory_()
        self.lock = ctx.Lock()
        self.errors = ctx.SimpleQueue()

    def add(self, index, amount):
        with self.lock:
            self.counters[index] += amount

    def stopping(self):
        """An error or Ctrl-C set STOP, or the launcher is gone (no process is left behind)."""
        launcher = torch.multiprocessing.parent_process()
        return bool(self.counters[STOP]) or (launcher is not None and not launcher.is_alive())

    def publish(self, net, updates, target=False):
        """Publish `net`'s weights as the online (or, with target=True, the target) network's."""
        weights, index = (self.target, TARGET_VERSION) if target else (self.weights, VERSION)
        with self.lock:
            for shared, own in zip(weights.state_dict().values(), net.state_dict().values()):
                shared.copy_(own)
            self.counters[index] = updates

    def fetch(self, net, version, target=False):
        """Load the published online (target) weights into `net` if newer than `version`; returns
        the version held."""
        weights, index = (self.target, TARGET_VERSION) if target else (self.weights, VERSION)
        if int(self.counters[index]) == version:
            return version
        with self.lock:
            net.load_state_dict(weights.state_dict())
            return int(self.counters[index])

    def claim_batch(self):
        """A batch waiting for reanalyze, as (trainer, slot), now claimed by the caller; or None."""
        with self.lock:
            waiting = (self.batch_state == WAITING).nonzero()
            if len(waiting) == 0:
                return None
            trainer, slot = waiting[0].tolist()
            self.batch_state[trainer, slot] = CLAIMED
            return trainer, slot


def fresh_counters(args):
    """Progress counters of a new run: training starts once --learning-starts env steps are in."""
    return {"env_steps": 0, "start_steps": args.learning_starts, "base_updates": 0, "sims": 0,
            "reanalyzed_sequences": 0}


def warm_up_again(counters, args, updates):
    """A resume without its buffer refills it for --learning-starts env steps before training on."""
    counters.update(start_steps=counters["env_steps"] + args.learning_starts, base_updates=updates)


def credited_steps(env_steps, start_steps, args):
    """Env steps that earn updates after `env_steps`: none before the buffer is warm
    (`start_steps`), then every env step including the one that made it warm."""
    return env_steps - start_steps + args.num_envs if env_steps >= start_steps else 0


def updates_allowed(env_steps, start_steps, base_updates, args):
    """Updates (batches) the replay ratio allows after `env_steps`: --train-steps-per-env-step
    for every credited env step."""
    return base_updates + int(credited_steps(env_steps, start_steps, args) * args.train_steps_per_env_step + 1e-9)


def replay_ratio(counters, updates, args):
    """The replay ratio actually held: updates done per env step since training started (what
    updates_allowed holds at --train-steps-per-env-step); NaN before training starts.
    `counters` are the progress counters (fresh_counters' names)."""
    steps = credited_steps(counters["env_steps"], counters["start_steps"], args)
    return (updates - counters["base_updates"]) / steps if steps else math.nan


def wait_until(condition, shared, poll=0.002):
    """Sleep-poll until `condition()` or the run is stopping. Returns True if the condition holds."""
    while not condition():
        if shared.stopping():
            return False
        time.sleep(poll)
    return True


def process_entry(role, index, body, args, shared, *extra):
    """Run one process's loop; any error stops the run and reaches the launcher with its traceback."""
    import traceback
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group; the launcher alone acts on
    # them and stops everyone in order, so that the final checkpoint gets written
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_float32_matmul_precision("high")
    layout = extra[0]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 + len(layout.reanalyze) + len(layout.trainers))))
    try:
        body(args, shared, index, *extra)
    except BaseException:
        shared.counters[STOP] = 1
        shared.errors.put((f"{role} {index}", traceback.format_exc()))
        sys.exit(1)
    # The work is done and saved. Leave without the interpreter's teardown, where a library's
    # background thread that still holds a tensor can abort a finished process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def updates_allowed_now(counters, args):
    """updates_allowed for the env steps the shared counters hold."""
    c = counters
    return updates_allowed(int(c[ENV_STEPS]), int(c[START_STEPS]), int(c[BASE_UPDATES]), args)


PROCESS_ROLES = ("actor", "reanalyze", "trainer")


def process_seed(args, role, index, node_rank):
    """The seed of one process (its generators use seed, seed + 1, seed + 2): the actor, each
    reanalyze worker and each trainer of each node gets its own, so no two draw the same batches
    or noise (the original's forked trainers shared one RNG state and sampled alike)."""
    return args.seed + 7919 * (len(PROCESS_ROLES) * index + PROCESS_ROLES.index(role)) + 1_000_003 * node_rank


def on_device(name):
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def actor_process(args, shared, index, layout):
    device = on_device(layout.actor)
    seed = process_seed(args, "actor", 0, layout.node_rank)  # every env of every node has its own seed
    seed_everything(seed)
    envs, eval_env_fn = make_atari_env_fn(args)(args.num_envs), make_atari_env_fn(args, evaluation=True)
    acting = copy.deepcopy(shared.weights).to(device).eval()
    version = shared.fetch(acting, -1)
    actor = Actor(envs, shared.buffer, args, device, make_generator(device, seed + 2), seed)
    progress = Progress(node_run_dir(args, layout))
    counters, E = shared.counters, args.num_envs
    # the actor runs at most two steps ahead of training, and far enough for one optimiser step of all trainers
    max_backlog = 2 * E * args.train_steps_per_env_step + len(layout.trainers)
    while int(counters[ENV_STEPS]) < args.total_env_steps:
        backlog = lambda: updates_allowed_now(counters, args) - int(counters[UPDATES])  # updates not done yet
        if not wait_until(lambda: backlog() <= max_backlog, shared):
            break
        version = shared.fetch(acting, version)
        steps = int(counters[ENV_STEPS])
        for episode_return, length in actor.step(acting, visit_temperature(steps / args.total_env_steps)):
            progress.episode(episode_return, length, steps)
        shared.add(SIMS, E * args.num_simulations)
        counters[ENV_STEPS] = steps = steps + E
        shared.stats[RETURN] = progress.recent_return()
        staleness = int(counters[UPDATES]) - version  # trainer updates the actor's weights lag behind
        shared.stats[STALENESS] = staleness
        if crossed(steps, E, args.log_interval):
            progress.scalars({"charts/weights_staleness": staleness, **search_stats(actor)}, steps)
        if args.eval_interval and crossed(steps, E, args.eval_interval) and steps < args.total_env_steps:
            run_evaluation(acting, eval_env_fn, args, device, steps, progress, shared.stats)
    counters[ACTOR_DONE] = 1
    if wait_until(lambda: bool(counters[TRAINERS_DONE]), shared, poll=0.05):
        shared.fetch(acting, -1)
        run_evaluation(acting, eval_env_fn, args, device, int(counters[ENV_STEPS]), progress, shared.stats)
    progress.close()
    envs.close()


def reanalyze_process(args, shared, index, layout):
    """Refresh the first --reanalyze-fraction of each batch a trainer has sampled ahead: the
    same sequences the single process refreshes before each update."""
    device = on_device(layout.reanalyze[index])
    if fits_on(device, shared.buffer.frames.nbytes):
        shared.buffer.mirror_frames(device)
    net = copy.deepcopy(shared.target).to(device).eval()
    version = shared.fetch(net, -1, target=True)
    noise = make_generator(device, process_seed(args, "reanalyze", index, layout.node_rank) + 1)
    refresh = round(args.reanalyze_fraction * args.batch_size_per_worker)
    while not shared.stopping() and not shared.counters[TRAINERS_DONE]:
        job = shared.claim_batch()
        if job is None:
            time.sleep(0.002)
            continue
        version = shared.fetch(net, version, target=True)
        time_, env = shared.batches[job][:, :refresh]
        sims = reanalyze(net, shared.buffer, time_, env, args, device, noise)
        shared.batch_state[job] = READY
        shared.add(REANALYZED, refresh)
        shared.reanalyzed_by[index] += refresh
        shared.add(SIMS, sims)


class HostCopy:
    """A device tensor's copy to host memory, started now and read later (get): an update later
    it has long arrived, where .cpu() now would make the host wait until the GPU caught up with
    everything queued before it. On a CPU it is the tensor itself."""

    def __init__(self, tensor):
        self.host, self.done = tensor, None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def get(self):
        if self.done is not None:
            self.done.synchronize()
        return self.host


def ddp_model(net, args, device):
    """The online network wrapped for DDP. Every parameter must get a gradient in every update,
    or DDP stops at the next one: --no-nce builds no NCE heads, and with --jumps 0 the dynamics
    go unused, which DDP must be told."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=args.jumps == 0)


def trainer_process(args, shared, index, layout):
    import torch.distributed as dist
    device = on_device(layout.trainers[index])
    T = len(layout.trainers)
    rank, world = layout.node_rank * T + index, layout.num_nodes * T
    # torchrun tells its workers to join its own store; our group has a store of its own
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    dist.init_process_group(layout.backend, init_method=layout.master, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    # the trainers' decisions go over gloo, on the host: over nccl, reading one would wait for the GPU
    control = dist.new_group(backend="gloo") if layout.backend == "nccl" else None
    net = copy.deepcopy(shared.weights).to(device)
    seed = process_seed(args, "trainer", index, layout.node_rank)
    learner = Learner(net, args, device, model=ddp_model(net, args, device), world=world, seed=seed + 1)
    if args.resume:
        learner.load_state_dict(load_checkpoint(args.resume))
    sampler = make_generator("cpu", seed)
    buffer, counters = shared.buffer, shared.counters
    if fits_on(device, buffer.frames.nbytes):
        buffer.mirror_frames(device)
    progress = Progress(node_run_dir(args, layout)) if rank == 0 else None
    leader = index == 0  # each node's first trainer publishes weights and counts updates
    run_dir, last_logged = node_run_dir(args, layout), int(counters[ENV_STEPS])
    metrics = {}
    collective_device = device if layout.backend == "nccl" else torch.device("cpu")
    needs_reanalyze = args.reanalyze_fraction > 0 and args.num_simulations > 0
    states, starts = shared.batch_state[index], shared.batches[index]
    pending, sampled = [], 0  # batches sampled ahead, oldest first, as (slot, weights, td_steps)
    written = None  # the last update's new priorities, on their way to the host buffer

    def credit():  # batches the replay ratio allows this node beyond those its trainers trained
        return updates_allowed_now(counters, args) - learner.updates // layout.num_nodes

    def sample_ahead():  # reanalyze refreshes the next batch while this one trains
        nonlocal sampled
        while len(pending) < shared.lookahead:
            slot = sampled % shared.lookahead
            time_, env, weights, td_steps = sample_batch(buffer, args, int(counters[ENV_STEPS]), sampler)
            starts[slot, 0], starts[slot, 1] = time_, env
            states[slot] = WAITING if needs_reanalyze else READY
            pending.append((slot, weights, td_steps))
            sampled += 1

    while True:
        actor_done = lambda: bool(counters[ACTOR_DONE])
        wait_until(lambda: (credit() >= T and bool(buffer.start_mask().any())) or actor_done(), shared)
        if credit() >= T:
            sample_ahead()
            wait_until(lambda: int(states[pending[0][0]]) == READY, shared)
        stop = shared.stopping() or credit() < T  # (once the actor is done: no credit left)
        # every trainer must take the same decision, or the others would wait in all_reduce forever
        flag = torch.tensor([float(stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        if flag.item():
            break
        slot, weights, td_steps = pending.pop(0)
        time_, env = starts[slot].clone()
        states[slot] = FREE
        seq = buffer.window(time_, env, device=device)
        metrics, priorities = learner.train_step(seq, time_, env, weights.to(device), td_steps)
        if written is not None:  # the previous update's, which arrived while this one was queued
            buffer.update_priorities(written[0], written[1], written[2].get())
        written = (time_, env, HostCopy(priorities))
        if crossed(learner.updates, world, args.publish_interval):
            learner.watch.check()  # before the actor takes the weights
        if leader:
            counters[UPDATES] = learner.updates // layout.num_nodes
            if crossed(learner.updates, world, args.publish_interval):
                shared.publish(net, learner.updates // layout.num_nodes)
            if crossed(learner.updates, world, args.target_update_interval):  # refreshed by this step
                shared.publish(learner.target, learner.updates // layout.num_nodes, target=True)
        if args.fault_after is not None and rank == world - 1 and learner.updates >= args.fault_after:
            raise RuntimeError(f"fault injected by --fault-after {args.fault_after} at update {learner.updates}")
        steps = int(counters[ENV_STEPS])
        if rank == 0 and crossed(steps, steps - last_logged, args.log_interval):
            shared.stats[LOSS] = float(metrics["losses/total"])
            progress.scalars(metrics, steps)
        if rank == 0 and crossed(steps, steps - last_logged, args.checkpoint_interval):
            learner.watch.check()
            save_run(os.path.join(run_dir, "checkpoint.pt"), args, learner, shared.weights, counters_dict(counters),
                     buffer)
        last_logged = steps
    if written is not None:
        buffer.update_priorities(written[0], written[1], written[2].get())
    learner.watch.check()
    if leader:
        shared.publish(net, learner.updates // layout.num_nodes)
        counters[UPDATES] = learner.updates // layout.num_nodes
        counters[TRAINERS_DONE] = 1
    # DDP keeps the replicas equal; check it, and keep the evidence in the final checkpoint
    checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1).to(collective_device)
    checksums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(checksums, checksum)
    if rank == 0:
        if metrics:  # the last update's, logged whatever the log interval
            shared.stats[LOSS] = float(metrics["losses/total"])
            progress.scalars(metrics, int(counters[ENV_STEPS]))
        save_run(os.path.join(run_dir, "checkpoint.pt"), args, learner, shared.weights,
                 {**counters_dict(counters), "replica_checksums": [float(c) for c in checksums]}, buffer)
        progress.close()
    # Tear down in order, while the interpreter is whole: DDP's reducer holds the process group,
    # and freed late (by the garbage collector at exit) gloo's threads abort the process
    # ("terminate called without an active exception"). The barrier keeps rank 0, which hosts
    # the group's store, alive until every rank is done with it.
    del learner
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


# the progress counters a checkpoint keeps, and where they live among the shared counters
COUNTER_NAMES = {"env_steps": ENV_STEPS, "start_steps": START_STEPS, "base_updates": BASE_UPDATES, "sims": SIMS,
                 "reanalyzed_sequences": REANALYZED}


def counters_dict(counters):
    return {name: int(counters[index]) for name, index in COUNTER_NAMES.items()}


def node_run_dir(args, layout):
    return args.run_dir if layout.node_rank == 0 else os.path.join(args.run_dir, f"node{layout.node_rank}")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, layout):
    """Start the layout, report progress, and bring every process down when one fails or on Ctrl-C."""
    ctx = torch.multiprocessing.get_context("spawn")
    args.run_dir = default_run_dir(args)
    if not layout.master:
        layout = layout._replace(master=f"tcp://127.0.0.1:{free_port()}")
    frame_shape, stack, num_actions = probe_env_spec(make_atari_env_fn(args))
    seed_everything(args.seed)
    weights = MuZeroNet(frame_shape, stack, num_actions, args).eval()
    target = copy.deepcopy(weights)
    shared = Shared(ctx, args, frame_shape, stack, num_actions, weights, target, layout)
    counters = fresh_counters(args)
    if args.resume:
        state = load_checkpoint(args.resume)
        weights.load_state_dict(state["acting"])
        target.load_state_dict(state["target"])
        counters.update(state["counters"])
        node_updates = state["updates"] // layout.num_nodes  # the batches this node's trainers trained
        if "buffer" in state:
            shared.buffer.load_state_dict(state["buffer"])
            mark_cut_episodes(shared.buffer)
        else:  # an empty buffer warms up again before training resumes
            warm_up_again(counters, args, node_updates)
        shared.counters[UPDATES] = shared.counters[VERSION] = shared.counters[TARGET_VERSION] = node_updates
    for name, index in COUNTER_NAMES.items():
        shared.counters[index] = counters[name]
    log_protocol(args, frame_shape, stack, num_actions, f"actor {layout.actor}, reanalyze {layout.reanalyze}, "
                 f"trainers {layout.trainers} ({layout.backend}), node {layout.node_rank + 1}/{layout.num_nodes}")
    roles = ([("actor", 0, actor_process)]
             + [("reanalyze", i, reanalyze_process) for i in range(len(layout.reanalyze))]
             + [("trainer", i, trainer_process) for i in range(len(layout.trainers))])
    processes = []
    for role, index, body in roles:
        process = ctx.Process(target=process_entry, args=(role, index, body, args, shared, layout),
                              name=f"{role} {index}")
        process.start()
        processes.append(process)
    print("started " + ", ".join(f"{p.name} (pid {p.pid})" for p in processes), flush=True)
    progress = Progress(args.run_dir, args)
    progress.mark = (time.time(), *(int(shared.counters[i]) for i in (ENV_STEPS, SIMS, UPDATES)))
    last = int(shared.counters[ENV_STEPS])
    try:
        while any(p.is_alive() for p in processes):
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed or not shared.errors.empty():
                time.sleep(0.5)  # let a raising worker's report arrive
                report_failure(shared, failed)
                shutdown(processes)
                sys.exit(1)
            steps = int(shared.counters[ENV_STEPS])
            if crossed(steps, steps - last, args.log_interval) or progress.overdue():
                print_progress(progress, shared)
            last = steps
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("interrupted: stopping all processes and saving a checkpoint", flush=True)
        shared.counters[STOP] = 1
        shutdown(processes, grace=60)
        sys.exit(130)
    failed = [p for p in processes if p.exitcode != 0]
    if failed or not shared.errors.empty():
        report_failure(shared, failed)
        sys.exit(1)
    print_progress(progress, shared)
    if layout.reanalyze:  # how the work spread over the workers
        print("reanalysed sequences per worker: " + ", ".join(
            f"{int(n):,} ({device})" for n, device in zip(shared.reanalyzed_by, layout.reanalyze)), flush=True)
    return {"eval_return": float(shared.stats[EVAL_RETURN]), "env_steps": int(shared.counters[ENV_STEPS]),
            "updates": int(shared.counters[UPDATES]), "run_dir": args.run_dir}


def print_progress(progress, shared):
    stats = shared.stats
    progress.returns = [] if math.isnan(stats[RETURN]) else [float(stats[RETURN])]
    progress.eval_return = None if math.isnan(stats[EVAL_RETURN]) else float(stats[EVAL_RETURN])
    progress.loss = None if math.isnan(stats[LOSS]) else float(stats[LOSS])
    progress.line(counters_dict(shared.counters), int(shared.counters[UPDATES]))


def report_failure(shared, failed):
    reports = []
    while not shared.errors.empty():
        reports.append(shared.errors.get())
    for name, trace in reports:
        print(f"{PROG}: error in {name}:\n{trace}", file=sys.stderr, flush=True)
    reported = {name for name, _ in reports}
    for p in failed:
        if p.name not in reported:
            how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            print(f"{PROG}: error: {p.name} died ({how}); stopping the run", file=sys.stderr, flush=True)


def shutdown(processes, grace=5.0):
    """Give processes `grace` seconds to finish (they watch the STOP counter), then kill them
    (SIGKILL: workers ignore SIGTERM, see process_entry)."""
    deadline = time.time() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


# ---------------------------------------------------------------------------------------------
# 10. Main
# ---------------------------------------------------------------------------------------------
class Progress:
    """Progress lines and tensorboard curves, both keyed by env steps (CleanRL's global_step).
    Given the run's args (the process that prints the lines), it writes the command and every
    flag as text, so that runs can be told apart."""

    def __init__(self, run_dir, args=None):
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only runs need it
        self.writer, self.args = SummaryWriter(run_dir), args
        if args is not None:
            self.writer.add_text("command", args.command)
            rows = [f"|--{name.replace('_', '-')}|{value}|" for name, value in sorted(vars(args).items())
                    if name != "command"]
            self.writer.add_text("args", "\n".join(["|flag|value|", "|-|-|", *rows]))  # a markdown table
        self.returns, self.eval_return, self.loss = [], None, None
        self.mark = (time.time(), 0, 0, 0)

    def overdue(self, seconds=60):
        """True when the last line is older than `seconds`: then a line is printed anyway, so a
        slow run (the CPU at the default settings) never looks hung."""
        return time.time() - self.mark[0] > seconds

    def scalars(self, values, step):
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def episode(self, episode_return, length, step):
        self.returns.append(episode_return)
        self.scalars({"charts/episode_return": episode_return, "charts/episode_length": length}, step)

    def recent_return(self):
        return float(np.mean(self.returns[-20:])) if self.returns else math.nan

    def line(self, counters, updates):
        """Print `env 48,000 | 3,900 env/s | 190.0k sims/s | 14.0 upd/s | ...` and log the rates
        and the replay ratio held. `counters` are the progress counters (fresh_counters' names)."""
        env_steps, sims = counters["env_steps"], counters["sims"]
        now = time.time()
        seconds = max(now - self.mark[0], 1e-9)
        env_rate, sim_rate, update_rate = ((x - m) / seconds for x, m in zip((env_steps, sims, updates), self.mark[1:]))
        self.mark = (now, env_steps, sims, updates)
        self.scalars({"charts/env_steps_per_s": env_rate, "charts/sims_per_s": sim_rate,
                      "charts/updates_per_s": update_rate}, env_steps)
        ratio = replay_ratio(counters, updates, self.args)
        if not math.isnan(ratio):
            self.scalars({"charts/replay_ratio": ratio}, env_steps)
        recent = self.recent_return()
        print(" | ".join([f"env {env_steps:,}", f"{env_rate:,.0f} env/s", f"{sim_rate / 1000:,.1f}k sims/s",
                          f"{update_rate:,.1f} upd/s", f"upd {updates:,}",
                          "return -" if math.isnan(recent) else f"return {recent:,.1f}",
                          "eval -" if self.eval_return is None else f"eval {self.eval_return:,.1f}",
                          "loss -" if self.loss is None else f"loss {self.loss:.3f}"]), flush=True)

    def video(self, frames, step):
        """frames [T, H, W] or [T, H, W, C] uint8, one evaluation episode: an MP4 file under the
        run directory, and an animated GIF in tensorboard (which cannot show MP4)."""
        iio = video_library()
        frames = np.repeat(frames[..., None], 3, -1) if frames.ndim == 3 else frames  # grey -> RGB
        path = os.path.join(self.writer.get_logdir(), "videos", f"eval_{step}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        iio.imwrite(path, frames, plugin="FFMPEG", fps=VIDEO_FPS)
        gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / VIDEO_FPS, loop=0)
        from tensorboard.compat.proto.summary_pb2 import Summary
        _, height, width, colours = frames.shape
        image = Summary.Image(height=height, width=width, colorspace=colours, encoded_image_string=gif)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag="eval/video", image=image)]), step)
        print(f"video of an evaluation episode ({len(frames)} frames): {path}", flush=True)

    def close(self):
        self.writer.close()


VIDEO_FPS = 15  # agent steps per second: Atari's 60 frames/s at frameskip 4, so real time


def video_library():
    """imageio, imported only for --capture-video: it writes MP4 through imageio-ffmpeg (which
    ships its own ffmpeg) and the GIF through pillow (which tensorboard brings)."""
    try:
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        fail("--capture-video needs imageio and imageio-ffmpeg, which are not installed: "
             "pip install imageio imageio-ffmpeg")
    return iio


def default_run_dir(args):
    return args.run_dir or os.path.join("runs", f"{args.game}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")


def crossed(value, step, interval):
    """True when `value` passed a multiple of `interval` during its last increase by `step`."""
    return value // interval > (value - step) // interval


def make_generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def rng_state(generators):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generators):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log_protocol(args, frame_shape, stack, num_actions, placement, atari=True):
    env = f"game {args.game}, <= {args.noop_max} no-ops, sticky {args.sticky_actions}" if atari else "env from env_fn"
    cap = lambda frames: f"cap {frames:,} frames, " if atari else ""
    training = (f"training: {cap(args.train_episode_frames)}"
                f"{'a lost life ends an episode' if args.episodic_life else 'no life loss'}, "
                f"{'clipped' if args.clip_rewards else 'raw'} rewards")
    evaluation = (f"evaluation: {args.eval_episodes} episodes, {cap(args.max_episode_frames)}no life loss, "
                  f"{args.eval_simulations} simulations ({args.search}), no noise, "
                  f"{'most-visited' if args.search == 'puct' else 'Sequential Halving'} action, final weights scored")
    print(f"{env} | frames {frame_shape} x {stack} | {num_actions} actions | {placement} | {training} | {evaluation}",
          flush=True)


def search_stats(actor):
    out = actor.last_search
    if out is None:
        return {}
    p = out.policy.clamp_min(1e-12)
    return {"search/root_value": out.root_value.mean(), "search/visit_entropy": -(p * p.log()).sum(-1).mean()}


def run_evaluation(net, env_fn, args, device, env_steps, progress, stats=None):
    """Evaluate, seeded by the env steps (so a checkpoint scores again exactly as its run did),
    log the returns and, with --capture-video, the first episode's video."""
    video = [] if args.capture_video else None
    returns = evaluate(net, env_fn, args, device, seed=args.seed + 10_000_019 + env_steps, video=video)
    progress.eval_return = float(returns.mean())
    progress.scalars({"charts/eval_return": returns.mean(), "charts/eval_return_std": returns.std()}, env_steps)
    if video:
        progress.video(np.stack(video), env_steps)
    if stats is not None:
        stats[EVAL_RETURN] = float(returns.mean())
    return returns


def save_run(path, args, learner, acting, counters, buffer=None, exact=None):
    """One checkpoint dict (nanoGPT): weights, target, optimiser, counters, args; with
    --save-buffer also the buffer and, in the single process, what makes the resume exact."""
    state = {"args": vars(args), **learner.state_dict(), "acting": acting.state_dict(), "counters": dict(counters)}
    if args.save_buffer and buffer is not None:
        state["buffer"] = buffer.state_dict()
        state.update(exact or {})
    save_checkpoint(path, state)


def mark_cut_episodes(buffer):
    """On a resume whose envs could not be saved, each env's last stored step ends its episode
    like the frame cap would (truncated: it still bootstraps), and fresh episodes follow."""
    if buffer.steps:
        buffer.truncated[(buffer.steps - 1) % buffer.T] = True


def picklable(envs):
    """The envs' state as bytes when they can be pickled (Python envs), else None (ALE's C++ envs)."""
    try:
        return pickle.dumps(envs)
    except Exception:
        return None


def train(args, env_fn=None):
    """Single process (--num-trainers 0): act, reanalyze and train in turn with the replay ratio
    held exactly; deterministic on CPU under --seed. `env_fn(num_envs)` may replace the Atari
    envs (section 3's contract). Returns a summary dict."""
    device = resolve_device(args.device)
    seed_everything(args.seed)
    atari = env_fn is None
    env_fn, eval_env_fn = (make_atari_env_fn(args), make_atari_env_fn(args, evaluation=True)) if atari else (env_fn, env_fn)
    envs = env_fn(args.num_envs)
    frame_shape, stack, num_actions = env_spec(envs)
    net = MuZeroNet(frame_shape, stack, num_actions, args).to(device)
    learner = Learner(net, args, device, seed=args.seed + 4)
    acting = copy.deepcopy(net).eval()  # the published weights, which the actor uses
    buffer = ReplayBuffer(args.buffer_size, args.num_envs, frame_shape, num_actions, stack, args.jumps,
                          args.td_steps, args.priority_alpha,
                          device=buffer_device(args, device, frame_shape, num_actions))
    sampler, noise = make_generator(buffer.device, args.seed + 1), make_generator(device, args.seed + 3)
    actor = Actor(envs, buffer, args, device, make_generator(device, args.seed + 2), args.seed)
    generators = [sampler, actor.generator, noise, learner.generator]
    counters = fresh_counters(args)
    run_dir = default_run_dir(args)
    if args.resume:
        envs = resume(args.resume, learner, acting, counters, buffer, actor, generators, envs)
    log_protocol(args, frame_shape, stack, num_actions, f"single process on {device}", atari)
    progress = Progress(run_dir, args)
    progress.mark = (time.time(), counters["env_steps"], counters["sims"], learner.updates)
    E, B = args.num_envs, args.batch_size_per_worker

    def save(path):
        learner.watch.check()  # a checkpoint never holds the weights of a broken update
        exact = {"actor": actor.state_dict(), "rng": rng_state(generators), "envs": picklable(envs)}
        save_run(path, args, learner, acting, counters, buffer, exact)

    def update(env_steps):
        """Sample, refresh the first --reanalyze-fraction of the batch, train, reprioritise, publish."""
        time_, env, weights, td_steps = sample_batch(buffer, args, env_steps, sampler)
        refresh = round(args.reanalyze_fraction * B)
        if refresh and args.num_simulations:
            counters["sims"] += reanalyze(learner.target, buffer, time_[:refresh], env[:refresh], args, device, noise)
            counters["reanalyzed_sequences"] += refresh
        seq = buffer.window(time_, env, device=device)
        metrics, priorities = learner.train_step(seq, time_, env, weights.to(device), td_steps)
        buffer.update_priorities(time_, env, priorities.to(buffer.device))
        if learner.updates % args.publish_interval == 0:
            learner.watch.check()  # before the actor takes the weights
            acting.load_state_dict(net.state_dict())
        return metrics

    metrics = {}
    try:
        while counters["env_steps"] < args.total_env_steps:
            done = counters["env_steps"] / args.total_env_steps
            for episode_return, length in actor.step(acting, visit_temperature(done)):
                progress.episode(episode_return, length, counters["env_steps"])
            counters["env_steps"] += E
            counters["sims"] += E * args.num_simulations
            steps, final = counters["env_steps"], counters["env_steps"] >= args.total_env_steps
            while learner.updates < updates_allowed(steps, counters["start_steps"], counters["base_updates"], args):
                metrics = update(steps)
                if progress.overdue():
                    progress.loss = float(metrics["losses/total"])
                    progress.line(counters, learner.updates)
            if (args.eval_interval and crossed(steps, E, args.eval_interval)) or final:
                run_evaluation(net.eval(), eval_env_fn, args, device, steps, progress)
            if crossed(steps, E, args.log_interval) or final:
                progress.loss = float(metrics["losses/total"]) if metrics else None
                # the acting copy holds the weights of the last multiple of --publish-interval
                staleness = {"charts/weights_staleness": learner.updates % args.publish_interval}
                progress.scalars({**metrics, **search_stats(actor), **staleness}, steps)
                progress.line(counters, learner.updates)
            elif progress.overdue():
                progress.line(counters, learner.updates)
            if crossed(steps, E, args.checkpoint_interval) or final:
                save(os.path.join(run_dir, "checkpoint.pt"))
                if args.keep_checkpoints and not final:
                    save(os.path.join(run_dir, f"checkpoint_{steps}.pt"))
    except KeyboardInterrupt:
        save(os.path.join(run_dir, "checkpoint.pt"))
        print(f"interrupted: checkpoint saved to {run_dir}/checkpoint.pt", flush=True)
        raise
    progress.close()
    envs.close()
    return {"eval_return": progress.eval_return, "env_steps": counters["env_steps"], "updates": learner.updates,
            "run_dir": run_dir, "net": net}


def resume(path, learner, acting, counters, buffer, actor, generators, envs):
    """Restore a checkpoint into a fresh single-process run. With a saved buffer and picklable
    envs the run continues exactly; with C++ envs the running episodes are cut and fresh ones
    start; without a buffer, it warms up again before training resumes."""
    state = load_checkpoint(path)
    try:
        learner.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as error:  # e.g. a checkpoint of an older network
        fail(f"--resume {path}: the saved weights do not fit the network its flags describe "
             f"({' '.join(str(error).split())[:300]})")
    acting.load_state_dict(state["acting"])
    counters.update(state["counters"])
    if "buffer" not in state:
        warm_up_again(counters, learner.args, learner.updates)
        actor.reset(learner.args.seed + counters["env_steps"])
        return envs
    buffer.load_state_dict(state["buffer"])
    set_rng_state(state["rng"], generators)
    if state.get("envs") is None:
        mark_cut_episodes(buffer)
        actor.reset(learner.args.seed + counters["env_steps"])
        return envs
    envs.close()
    envs = actor.envs = pickle.loads(state["envs"])
    actor.load_state_dict(state["actor"])
    return envs


def evaluate_checkpoint(args, env_fn=None):
    """--evaluate: score a checkpoint's final weights with its run's evaluation protocol and
    seed (so the run's last evaluation repeats exactly when nothing is overridden); print the
    statistics of the returns and write them as JSON beside the checkpoint. Tensorboard events
    (and --capture-video's video) go to <checkpoint dir>/evaluate. `env_fn` as in train()."""
    device = resolve_device(args.device)
    atari = env_fn is None
    env_fn = make_atari_env_fn(args, evaluation=True) if atari else env_fn
    frame_shape, stack, num_actions = probe_env_spec(env_fn)
    state = load_checkpoint(args.evaluate, "--evaluate")
    net = MuZeroNet(frame_shape, stack, num_actions, args)
    try:
        net.load_state_dict(state["net"])
    except Exception as error:  # torch names every bad tensor on a line of its own
        fail(f"--evaluate {args.evaluate}: the saved weights do not fit the network its flags describe "
             f"({' '.join(str(error).split())[:300]})")
    net.to(device).eval()
    steps = state["counters"]["env_steps"]
    log_protocol(args, frame_shape, stack, num_actions, f"evaluating {args.evaluate} (env step {steps:,}) on {device}",
                 atari)
    progress = Progress(os.path.join(os.path.dirname(os.path.abspath(args.evaluate)), "evaluate"), args)
    returns = run_evaluation(net, env_fn, args, device, steps, progress)
    progress.close()
    result = {"checkpoint": args.evaluate, "env_steps": steps, "episodes": len(returns),
              "simulations": args.eval_simulations, "mean": float(returns.mean()), "std": float(returns.std()),
              "min": float(returns.min()), "max": float(returns.max()), "returns": returns.tolist()}
    path = os.path.splitext(args.evaluate)[0] + "_eval.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"return over {len(returns)} episodes: mean {result['mean']:,.1f} | std {result['std']:,.1f} | "
          f"min {result['min']:,.1f} | max {result['max']:,.1f} (written to {path})", flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it; no effect on CPU
    if args.evaluate:  # before plan_layout: an evaluation runs in this process, whatever the run's layout
        check_precision(args, [resolve_device(args.device)])
        return evaluate_checkpoint(args)
    layout = plan_layout(args)
    check_precision(args, [resolve_device(args.device)] if layout is None else
                    [layout.actor, *layout.reanalyze, *layout.trainers])
    # SIGTERM (a cluster scheduler's preemption, or torchrun stopping its workers) stops the run
    # the way Ctrl-C does: every process stops and a checkpoint is written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if layout is None:
            train(args)
        else:
            launch(args, layout)
    except NonFiniteError as error:
        fail(f"{error}; the last checkpoint is untouched")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
