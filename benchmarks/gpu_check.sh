#!/usr/bin/env bash
# One call proves the GPU: builds the CUDA extension, runs the whole GPU test
# suite (cpu, triton and cuda backends against the reference) and the
# benchmarks, and writes one log and one results file. Keep it under 9 min.
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/
#   RESULTS=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "== build"
  time python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3 || status=1
  python3 -c "import memkernels, torch; print('backends on cuda:', memkernels.available_backends('cuda'))"
  echo "== tests"
  # pytest-xdist (on the GPU image) spreads the suite over the CPU cores.
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}")
  python3 -m pytest tests -q -p no:cacheprovider -p no:benchmark $xdist || status=1
  echo "== benchmarks"
  python3 -m memkernels.bench --device cuda --min-time ${BENCH_MIN_TIME:-0.3} \
    --out "$RESULTS/gpu_results.jsonl" ${BENCH_ARGS:-} || status=1
  echo "== exit status $status"
} 2>&1 | tee "$LOG"
exit $status
