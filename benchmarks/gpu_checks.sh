#!/bin/bash
# The GPU checks and GPU figures of README, on a machine with one CUDA GPU:
#     bash benchmarks/gpu_checks.sh LOG_DIR [PART ...]     # logs in LOG_DIR; all parts by default
# Parts (each with a time limit, so one that hangs does not hide the rest):
#   cuda_checks   cuda_checks.py: the CUDA path computes what the CPU path does
#   main_run      README's main command on ms_pacman at the defaults (the process layout: actor,
#                 reanalyze and one trainer sharing GPU 0), ended one actor step after learning starts
#   evaluate      --evaluate on that run's checkpoint
#   bench_search  throughput.py search on the GPU (with mctx on JAX's GPU where it is installed)
#   q_search      q_learning.py (Q-learning with search) in the process layout, 256 updates
#   q_c51         q_learning.py --distributional in the single process, 256 updates
#   bench_update  throughput.py update on the GPU: one update and one actor step, split by part
# All parts take about 12 minutes on an H200; README's figures come from these logs.
set -u
cd "$(dirname "$0")/.."
LOG=${1:?usage: bash benchmarks/gpu_checks.sh LOG_DIR [PART ...]}
shift
PARTS=${*:-cuda_checks main_run evaluate bench_search q_search q_c51 bench_update}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SHORT=(--eval-interval 0 --eval-episodes 4 --max-episode-frames 400)  # the end-of-run evaluation: 100 moves

part() {  # part NAME SECONDS COMMAND...: run it if asked for, log it, print its end and exit status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  grep -v "^search: compiled" "$LOG/$name.log" | tail -n 14
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
part cuda_checks 120 $PY benchmarks/cuda_checks.py
part main_run 240 $PY muzero_nce.py --game ms_pacman --total-env-steps 2112 --log-interval 512 "${SHORT[@]}" \
  --run-dir "$LOG/main_run"
part evaluate 90 $PY muzero_nce.py --evaluate "$LOG/main_run/checkpoint.pt" --eval-episodes 4 --max-episode-frames 400
part bench_search 200 $PY benchmarks/throughput.py search --device cuda
part q_search 120 $PY q_learning.py --game ms_pacman --total-env-steps 1536 --learning-starts 1280 --log-interval 256 \
  "${SHORT[@]}" --run-dir "$LOG/q_search"
part q_c51 120 $PY q_learning.py --game ms_pacman --distributional --num-trainers 0 --total-env-steps 1536 \
  --learning-starts 1280 --log-interval 256 "${SHORT[@]}" --run-dir "$LOG/q_c51"
part bench_update 150 $PY benchmarks/throughput.py update --device cuda --repeats 2
