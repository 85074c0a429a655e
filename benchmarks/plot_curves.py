"""Learning curves of muzero_nce.py and q_learning.py runs, drawn from their tensorboard event files.

    python benchmarks/plot_curves.py runs/<run> [runs/<run> ...] --out benchmarks/<name>.png [--published SPR,...]

One panel per run, against env steps: the evaluation return (mean over --eval-episodes, with a
band of one standard deviation), every training episode's return with the mean of the last 20,
the game's random-policy score as a dashed line and, with --published, published scores at 100k
steps as lines. The panel's title holds the game and the command that started the run (and each
command that resumed it) as a user types them: the run directory the run recorded (its --run-dir,
often absolute, also inside --resume <dir>/checkpoint.pt) is shown as the RUN_DIR given here, and
any other absolute path relative to the current directory when it lies inside it, else as .../<its
last two components>, so that no plot names a path of the machine the run was made on. The events
are read with tensorboard's own reader (EventAccumulator); the game, the run directory and the
commands come from the run's `command` and `args` texts, or else from its checkpoint.pt.

matplotlib is a dependency of this benchmark only, not of the scripts: pip install matplotlib
"""
import argparse
import os
import re
import shlex
import sys
import textwrap
from collections import defaultdict

import numpy as np

# Random-policy scores of the Atari-100k tables (SimPLe, DER, SPR and EfficientZero all report
# these): the games README's curves use. Another game needs --random-score.
RANDOM_SCORES = {"ms_pacman": 307.3, "breakout": 1.7, "boxing": 0.1, "pong": -20.7, "road_runner": 11.5,
                 "kung_fu_master": 258.5}
# Published mean scores after 100k env steps, drawn as lines with --published: DrQ(eps) and SPR from
# rliable's Atari-100k data (the mean of 100 runs each), DER as the SPR paper reports it (5 seeds),
# EfficientZero from its Table 1.
PUBLISHED = {
    "DER": {"ms_pacman": 1204.1, "breakout": 1.9, "boxing": 0.2, "pong": -19.3, "road_runner": 9600.0,
            "kung_fu_master": 14346.1},
    "DrQ(eps)": {"ms_pacman": 1218.1, "breakout": 19.8, "boxing": 9.0, "pong": -9.1, "road_runner": 11211.4,
                 "kung_fu_master": 11467.4},
    "SPR": {"ms_pacman": 1318.4, "breakout": 19.6, "boxing": 35.7, "pong": -5.4, "road_runner": 12213.1,
            "kung_fu_master": 14783.2},
    "EfficientZero": {"ms_pacman": 1281.2, "breakout": 414.1, "boxing": 52.7, "pong": 20.1, "road_runner": 17751.3,
                      "kung_fu_master": 30944.8},
}
RECENT = 20  # training episodes in the running mean, as in the progress line's return


def fail(message):
    sys.exit(f"plot_curves.py: error: {message}")


def read_events(run_dir):
    """Scalars {tag: [(step, value)]} and texts {tag: [text]} of the event files in run_dir.
    Each process of a run (and each resume) writes a file of its own: every file is read whole,
    in the order of their names, which begin with their creation time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    if not os.path.isdir(run_dir):
        fail(f"{run_dir}: no such run directory")
    names = sorted(name for name in os.listdir(run_dir) if name.startswith("events.out"))
    if not names:
        fail(f"{run_dir}: no tensorboard event files (events.out.*) in it")
    scalars, texts = defaultdict(list), defaultdict(list)
    for name in names:
        events = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0, "tensors": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] += [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["tensors"]:
            if tag.endswith("/text_summary"):
                texts[tag.removesuffix("/text_summary")] += [make_ndarray(e.tensor_proto).item().decode()
                                                             for e in events.Tensors(tag)]
    return {tag: sorted(values) for tag, values in scalars.items()}, texts


def game_and_commands(run_dir, texts):
    """The run's game, the commands that started and resumed it and the run directories it
    recorded (--run-dir as each process got it): from its texts, or else from its checkpoint
    (a run written before the command was logged)."""
    def flag(name):  # its values in the args tables
        return [value for table in texts.get("args", [])
                for value in re.findall(rf"^\|--{name}\|(.+)\|$", table, re.M)]
    games, recorded = flag("game"), {path for path in flag("run-dir") if path != "None"}
    commands = list(dict.fromkeys(texts.get("command", [])))  # in order, each once
    if games and commands:
        return games[0], commands, recorded
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        fail(f"{run_dir}: its events hold no command, and it has no checkpoint.pt to read it from")
    import torch
    saved = torch.load(path, map_location="cpu", weights_only=False)["args"]
    return (saved["game"], commands or [saved.get("command", "(command not recorded)")],
            recorded | ({saved["run_dir"]} if saved.get("run_dir") else set()))


def as_typed(command, recorded, run_dir):
    """The command with each recorded run directory in it (a word, or a word's start before a
    /) written as run_dir, and any other absolute path relative to the current directory if it
    lies inside it, else as .../<its last two components> (see the module's docstring)."""
    def path(word):
        for old in (old.rstrip("/") for old in recorded):
            if word == old or word.startswith(old + "/"):
                return run_dir.rstrip("/") + word[len(old):]
        if not os.path.isabs(word):
            return word
        relative = os.path.relpath(word)
        return os.path.join("...", *word.split("/")[-2:]) if relative.split(os.sep)[0] == ".." else relative

    def shown(word):  # a --flag=value word keeps its --flag=
        flag, value = re.fullmatch(r"(-[\w-]*=)?(.*)", word, re.S).groups("")
        return flag + path(value)
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: not a recorded command line
        return command
    typed = [shown(word) for word in words]
    return shlex.join(typed) if typed != words else command


def running_mean(values, window):
    return np.array([np.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))])


def draw_run(ax, run_dir, random_score, published=()):
    scalars, texts = read_events(run_dir)
    game, commands, recorded = game_and_commands(run_dir, texts)
    commands = [as_typed(command, recorded, run_dir) for command in commands]
    if random_score is None:
        if game not in RANDOM_SCORES:
            fail(f"{run_dir}: no random score for {game} in the table ({', '.join(RANDOM_SCORES)}); "
                 f"give one with --random-score")
        random_score = RANDOM_SCORES[game]
    if not scalars.get("charts/eval_return") and not scalars.get("charts/episode_return"):
        fail(f"{run_dir}: no returns logged yet (charts/eval_return, charts/episode_return)")
    training = np.array(scalars.get("charts/episode_return", [])).reshape(-1, 2)
    if len(training):
        ax.scatter(training[:, 0], training[:, 1], s=4, alpha=0.25, color="tab:blue", label="training episode")
        ax.plot(training[:, 0], running_mean(training[:, 1], RECENT), color="tab:blue",
                label=f"training, mean of the last {RECENT} episodes")
    evaluation = np.array(scalars.get("charts/eval_return", [])).reshape(-1, 2)
    if len(evaluation):
        steps, mean = evaluation[:, 0], evaluation[:, 1]
        ax.plot(steps, mean, "o-", color="tab:red", label="evaluation, mean over its episodes")
        std = dict(scalars.get("charts/eval_return_std", []))
        if all(step in std for step in steps):
            spread = np.array([std[step] for step in steps])
            ax.fill_between(steps, mean - spread, mean + spread, color="tab:red", alpha=0.15,
                            label="evaluation, ± 1 std")
    ax.axhline(random_score, color="grey", linestyle="--", label=f"random policy ({random_score:g})")
    for name, style in zip(published, ("-.", ":", (0, (5, 2, 1, 2)), (0, (1, 3)))):
        if game in PUBLISHED[name]:
            score = PUBLISHED[name][game]
            ax.axhline(score, color="black", linestyle=style, linewidth=1,
                       label=f"{name}, published mean at 100k steps ({score:,g})")
    ax.set_xlabel("env steps (agent steps of 4 frames, all envs together)")
    ax.set_ylabel("return (game score)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    wrapped = "\n".join(textwrap.fill(command, 110, subsequent_indent="    ", break_on_hyphens=False,
                                                break_long_words=False) for command in commands)
    ax.set_title(f"{game}\n{wrapped}", loc="left", fontsize=8, family="monospace")


def main(argv=None):
    p = argparse.ArgumentParser(prog="plot_curves.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding tensorboard event files")
    p.add_argument("--out", required=True, help="PNG file to write, e.g. benchmarks/curves.png")
    p.add_argument("--random-score", type=float, default=None,
                   help="the random-policy score to mark, for every run given (default: the Atari-100k table)")
    p.add_argument("--published", default="",
                   help=f"comma list of published results to draw as lines, of {', '.join(PUBLISHED)}")
    args = p.parse_args(argv)
    published = [name for name in args.published.split(",") if name]
    for name in published:
        if name not in PUBLISHED:
            fail(f"--published {name}: unknown; choose from {', '.join(PUBLISHED)}")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed; it is needed by this benchmark only: pip install matplotlib")
    fig, axes = plt.subplots(len(args.runs), 1, figsize=(11, 5 * len(args.runs)), squeeze=False)
    for ax, run_dir in zip(axes[:, 0], args.runs):
        draw_run(ax, run_dir, args.random_score, published)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
