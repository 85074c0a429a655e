import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import muzero_nce

REPO = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
# One torch thread per process: spinning OpenMP threads of several processes on 2 cores slow
# each other down tens of times.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A network and search small enough for 2 CPU cores; everything else at its default.
TINY = ["--device", "cpu", "--num-envs", "2", "--channels", "8", "--reduced-channels", "4", "--head-hidden", "8",
        "--support-size", "10", "--proj-hidden", "16", "--proj-dim", "16", "--pred-hidden", "8",
        "--num-simulations", "2", "--eval-simulations", "2", "--eval-episodes", "1", "--batch-size-per-worker", "4",
        "--buffer-size", "200", "--learning-starts", "32", "--max-episode-frames", "400", "--eval-interval", "0",
        "--log-interval", "40", "--reanalyze-fraction", "0.25"]


def run_script(*flags, timeout=240):
    return subprocess.run([PYTHON, "muzero_nce.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out"):
            events = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0})
            events.Reload()
            if tag in events.Tags()["scalars"]:
                values += [(e.step, e.value) for e in events.Scalars(tag)]
    return sorted(values)


def test_cli_trains_logs_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "run"
    done = run_script("--game", "ms_pacman", *TINY, "--total-env-steps", "80", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert re.search(r"env 80 \| .* env/s \| .* sims/s \| .* upd/s", done.stdout)
    assert scalars(run, "losses/total") and scalars(run, "charts/eval_return")
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 80 and state["updates"] == 80 - 32 + 2
    resumed = run_script("--resume", str(run / "checkpoint.pt"), "--total-env-steps", "120", "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 120
    assert state["args"]["channels"] == 8  # the saved flags came back
    # without --save-buffer the buffer warms up again (32 steps) before training resumes
    assert state["updates"] == 80 - 32 + 2 + (120 - (80 + 32) + 2)


def test_same_seed_same_losses(tmp_path):
    losses = []
    for name in ("a", "b"):
        done = run_script(*TINY, "--total-env-steps", "80", "--log-interval", "2", "--run-dir", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        losses.append(scalars(tmp_path / name, "losses/total"))
    assert len(losses[0]) > 10 and losses[0] == losses[1]


@pytest.mark.parametrize("flags, message", [
    (["--game", "ms_pacmann"], r"unknown game 'ms_pacmann'; closest: ms_pacman"),
    (["--game", "MsPacman"], r"unknown game 'MsPacman'; closest: .*ms_pacman"),
    (["--num-envs", "0"], r"--num-envs: must be a positive integer, got 0"),
    (["--num-simulations", "-1"], r"--num-simulations: must be zero or a positive integer, got -1"),
    (["--batch-size-per-worker", "500"], r"--batch-size-per-worker 500 is larger than --buffer-size 200"),
    (["--num-gpus", "4"], r"--num-gpus 4 but this machine has 0 GPU\(s\)"),
    (["--devices", "cpu,cuda:3,cpu"], r"--devices entry 'cuda:3' but this machine has 0 GPU\(s\)"),
    (["--devices", "cpu"], r"--devices lists 1 devices; it needs 1 actor \+ 1 reanalyze"),
    (["--resume", "no/such/checkpoint.pt"], r"--resume no/such/checkpoint.pt: no such checkpoint file"),
])
def test_bad_input_is_one_line_error(tmp_path, flags, message):
    done = run_script(*TINY, "--total-env-steps", "80", "--run-dir", str(tmp_path / "run"), *flags, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_more_trainers_than_gpus_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = muzero_nce.parse_args(["--num-trainers", "3"])
    with pytest.raises(SystemExit, match=r"--num-trainers 3 needs one GPU each but GPUs 1..1 give 1"):
        muzero_nce.plan_layout(args)
    layout = muzero_nce.plan_layout(muzero_nce.parse_args([]))  # 2 GPUs: search on 0, one trainer on 1
    assert (layout.actor, layout.trainers, layout.backend) == ("cuda:0", ["cuda:1"], "nccl")
    layout = muzero_nce.plan_layout(muzero_nce.parse_args(["--gpu-0-train"]))
    assert layout.trainers == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    layout = muzero_nce.plan_layout(muzero_nce.parse_args([]))  # one GPU: everything shares it
    assert (layout.actor, layout.reanalyze, layout.trainers) == ("cuda:0", ["cuda:0"], ["cuda:0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert muzero_nce.plan_layout(muzero_nce.parse_args([])) is None  # no GPU: the single process


def test_import_does_not_initialise_cuda():
    code = "import torch, muzero_nce; print(torch.cuda.is_initialized())"
    done = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert done.stdout.strip() == "False", done.stderr


# --- the process layout ---------------------------------------------------------------------
LAYOUT = [*TINY, "--devices", "cpu,cpu,cpu,cpu"]  # actor, one reanalyze worker, two gloo trainers


def test_layout_runs_to_completion(tmp_path):
    run = tmp_path / "run"
    done = run_script(*LAYOUT, "--total-env-steps", "120", "--save-buffer", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert "trainers ['cpu', 'cpu'] (gloo)" in done.stdout
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    checksums = state["counters"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both trainers ended with the same weights
    own = sum(float(p.double().sum()) for name, p in state["net"].items() if "running" not in name
              and "num_batches" not in name)
    assert abs(own - checksums[0]) < 1e-6 * max(1.0, abs(own))
    assert state["counters"]["env_steps"] == 120 and int(state["buffer"]["counters"][0]) * 2 == 120
    assert state["updates"] == 120 - 32 + 2  # the replay ratio held across processes
    assert state["counters"]["reanalyzed_sequences"] > 0 and int(state["buffer"]["reanalyzed"].sum()) > 0
    assert scalars(run, "charts/weights_staleness")


def test_torchrun_two_nodes(tmp_path):
    port = str(29500 + os.getpid() % 1000)
    flags = [*TINY, "--devices", "cpu,cpu,cpu", "--total-env-steps", "80", "--run-dir", str(tmp_path / "run")]
    nodes = [subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                               "muzero_nce.py", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "node 1/2" in outputs[0] and "node 2/2" in outputs[1]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    checksums = state["counters"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]


def start_layout(tmp_path, *flags):
    process = subprocess.Popen([PYTHON, "muzero_nce.py", *LAYOUT, "--total-env-steps", "100000",
                                "--run-dir", str(tmp_path / "run"), *flags], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    pids, lines = {}, []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("started"):
            pids = {name: int(pid) for name, pid in re.findall(r"(\w+ \d) \(pid (\d+)\)", line)}
        if line.startswith("env 80 "):  # training is under way
            break
    assert len(pids) == 4, "".join(lines)
    return process, pids, lines


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_failed_trainer_brings_the_run_down(tmp_path, how):
    flags = ["--fault-after", "60"] if how == "raise" else []
    process, pids, lines = start_layout(tmp_path, *flags)
    start = time.time()
    if how == "kill":
        os.kill(pids["trainer 1"], signal.SIGKILL)
    output = process.communicate(timeout=60)[0]
    assert process.returncode != 0 and time.time() - start < 30
    if how == "kill":
        assert "trainer 1 died (killed by signal 9)" in output
    else:
        assert "error in trainer 1:" in output and "RuntimeError: fault injected" in output
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_sigint_stops_everything_and_checkpoints(tmp_path):
    process, pids, _ = start_layout(tmp_path)
    start = time.time()
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=90)[0]
    assert process.returncode == 130 and time.time() - start < 30, output
    assert "interrupted: stopping all processes and saving a checkpoint" in output
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["updates"] > 0
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if alive(pid)]


# --- exact resume ---------------------------------------------------------------------------
def test_resume_repeats_an_uninterrupted_run(tmp_path):
    """2N updates straight vs N, a checkpoint with --save-buffer, a new process, N more: the
    same parameters, bit for bit (CPU, picklable envs)."""
    flags = ["--device", "cpu", "--seed", "3", "--num-envs", "4", "--channels", "8", "--reduced-channels", "4",
             "--head-hidden", "8", "--support-size", "5", "--proj-hidden", "16", "--proj-dim", "16",
             "--pred-hidden", "8", "--num-simulations", "4", "--eval-simulations", "2", "--eval-episodes", "2",
             "--batch-size-per-worker", "8", "--buffer-size", "200", "--learning-starts", "64", "--jumps", "3", "--td-steps", "2",
             "--total-env-steps", "160", "--checkpoint-interval", "96", "--eval-interval", "0",
             "--reanalyze-fraction", "0.5", "--publish-interval", "7", "--target-update-interval", "5",
             "--save-buffer", "--keep-checkpoints"]
    code = "import sys, test_learning as t, muzero_nce as m; m.train(m.parse_args(sys.argv[1:]), t.env_fn)"
    run = lambda *extra: subprocess.run([PYTHON, "-c", code, *flags, *extra], cwd=REPO, capture_output=True,
                                        text=True, timeout=240, env=ENV)
    straight = run("--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    middle = tmp_path / "straight" / "checkpoint_96.pt"
    resumed = run("--resume", str(middle), "--run-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert 0 < torch.load(middle, weights_only=False)["updates"] < a["updates"] == b["updates"]
    for name in a["net"]:
        assert torch.equal(a["net"][name], b["net"][name]), name
    assert torch.equal(a["buffer"]["priority"], b["buffer"]["priority"])


# --- failing safely -------------------------------------------------------------------------
def test_non_finite_loss_names_the_update_and_term(tmp_path, monkeypatch):
    """NaN rewards make the value and reward losses NaN: the update raises with the step and the
    term before touching the weights; main turns it into a one-line exit; the checkpoint
    written before is untouched and loadable."""
    import test_learning
    args = muzero_nce.parse_args(["--device", "cpu", "--num-envs", "4", "--channels", "8", "--support-size", "5",
                                  "--proj-hidden", "16", "--proj-dim", "16", "--pred-hidden", "8", "--num-simulations",
                                  "2", "--batch-size-per-worker", "8", "--buffer-size", "400", "--learning-starts", "64",
                                  "--jumps", "3", "--td-steps", "2", "--total-env-steps", "96", "--checkpoint-interval",
                                  "64", "--eval-interval", "0", "--eval-episodes", "1", "--run-dir", str(tmp_path)])
    real_add = muzero_nce.ReplayBuffer.add

    def add(self, frame, reward, *rest):  # from env step 80 on, rewards are NaN
        return real_add(self, frame, reward * math.nan if self.steps * 4 >= 80 else reward, *rest)

    monkeypatch.setattr(muzero_nce.ReplayBuffer, "add", add)
    before = None
    with pytest.raises(muzero_nce.NonFiniteError, match=r"non-finite loss at update \d+ \(total=nan, .*(value|reward)=nan"):
        try:
            muzero_nce.train(args, test_learning.env_fn)
        finally:
            before = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert before["counters"]["env_steps"] == 64 and before["updates"] > 0
    monkeypatch.setattr(muzero_nce, "train", lambda args: (_ for _ in ()).throw(muzero_nce.NonFiniteError("boom at update 3")))
    with pytest.raises(SystemExit, match=r"^muzero_nce.py: error: boom at update 3; the last checkpoint is untouched$"):
        muzero_nce.main(["--device", "cpu"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    muzero_nce.save_checkpoint(str(path), {"updates": 1})
    real_save = torch.save

    def crash(obj, f):  # dies half-way through writing
        real_save({"partial": True}, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        muzero_nce.save_checkpoint(str(path), {"updates": 2})
    assert torch.load(path, weights_only=False) == {"updates": 1}
