#!/bin/bash
# The GPU checks and GPU figures of README, on a machine with one CUDA GPU, in about 8 minutes:
#     bash benchmarks/gpu_checks.sh LOG_DIR [PART ...]     # logs in LOG_DIR; all parts by default
# Parts (each with a time limit, so one that hangs does not hide the rest):
#   cuda_checks   cuda_checks.py: the CUDA path computes what the CPU path does (fp32 and bf16, the
#                 compiled pUCT and Gumbel searches, the buffer on the GPU), and the syncs of an
#                 update and of an actor step
#   layout_run    README's main command on ms_pacman at the defaults (the process layout: actor,
#                 reanalyze and one trainer sharing GPU 0), 320 updates after learning starts
#                 (--learning-starts 1024 instead of 2,000, to reach them sooner): updates/s
#   single_run    the same in the single process (--num-trainers 0): updates/s
#   evaluate      --evaluate on the layout run's checkpoint
#   bench_update  throughput.py update on the GPU: one update and one actor step, split by part,
#                 their roots, network rows and syncs, and a 100k-step run projected on 1 and 4 GPUs
# Not by default (name them): bench_search (throughput.py search, with mctx where installed).
set -u
cd "$(dirname "$0")/.."
LOG=${1:?usage: bash benchmarks/gpu_checks.sh LOG_DIR [PART ...]}
shift
PARTS=${*:-cuda_checks layout_run single_run evaluate bench_update}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RUN=(--game ms_pacman --total-env-steps 1344 --learning-starts 1024 --log-interval 64 --eval-interval 0
     --eval-episodes 4 --max-episode-frames 400)  # the end-of-run evaluation: 100 moves

part() {  # part NAME SECONDS COMMAND...: run it if asked for, log it, print its end and exit status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  grep -v "^search: compiled" "$LOG/$name.log" | tail -n 16
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
part cuda_checks 110 $PY benchmarks/cuda_checks.py
part layout_run 130 $PY muzero_nce.py "${RUN[@]}" --run-dir "$LOG/layout_run"
part single_run 120 $PY muzero_nce.py "${RUN[@]}" --num-trainers 0 --run-dir "$LOG/single_run"
part evaluate 40 $PY muzero_nce.py --evaluate "$LOG/layout_run/checkpoint.pt" --eval-episodes 4 --max-episode-frames 400
part bench_update 100 $PY benchmarks/throughput.py update --device cuda --repeats 1 --gpus 4
part bench_search 200 $PY benchmarks/throughput.py search --device cuda
