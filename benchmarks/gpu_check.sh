#!/usr/bin/env bash
# One call proves the GPU: builds the CUDA extension, checks its opt-in tensor-core
# kernels against the reference, runs the benchmarks, the
# GPU test suite (triton and cuda backends against the reference, the memory
# model on CUDA), the CPU kernels' AVX-512 body where the host CPU has it, the
# standalone CMake build with its profiling driver, nsys/ncu on that driver when
# installed (PROFILE=0 skips them), and writes one log, the results files and one
# per-test log. Each phase has a time limit (overridable: TC_TEST_TIMEOUT,
# BENCH_TIMEOUT, TC_BENCH_TIMEOUT, TEST_TIMEOUT, ISA_TIMEOUT), and no phase runs past
# BUDGET_S (default 570 s) from the start, so the whole fits one 600 s device call.
# On the H200 (2026-12-04) the phases took: build 88 s (sm_90 only), benchmarks 50,
# tensor-core benchmarks 35, tests 170+ (stopped at 61%), CMake 41, ncu 6.
#
#   bash benchmarks/gpu_check.sh            # logs in benchmarks/results/gpu-latest/
#   RESULTS=/some/dir bash benchmarks/gpu_check.sh
#   TEST_K=cuda BENCH_ARGS="--ops read_fwd" bash benchmarks/gpu_check.sh
#
# The benchmarks run before the tests so that a slow test phase cannot cost
# the figures; a failing phase does not stop the next one (exit status 1 if any failed).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu-latest}
mkdir -p "$RESULTS"
rm -f "$RESULTS/gpu_results.jsonl" "$RESULTS/gpu_results_tensor_cores.jsonl"  # this run's rows only
LOG="$RESULTS/gpu_check.log"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# build for this GPU's architecture only (setup.py's default, sm_80 and sm_90, takes longer)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
[[ "$arch" =~ ^[0-9]+\.[0-9]+$ ]] || arch="8.0;9.0"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
status=0
status_file=$(mktemp)  # the block below runs in a subshell (piped to tee): its status comes back here
phase() { echo "== $1 ($(date -u +%T), ${SECONDS} s)"; }
# a phase's limit, cut to what is left of BUDGET_S
cap() { local left=$(( ${BUDGET_S:-570} - SECONDS )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  phase build
  time python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3 || status=1
  python3 -c "import memkernels, torch; print('backends on cuda:', memkernels.available_backends('cuda'))"
  phase "the CUDA backend's tensor-core kernels (opt-in) against the reference"
  # First, as they gate making the tensor-core kernels the default; the main test phase
  # leaves out test_cuda_tensor_core_kernels_match_the_reference, which runs the same.
  # A run where every case skips (no CUDA build, say) counts as a failure.
  tc_log=$(MEMKERNELS_CUDA_TENSOR_CORES=1 timeout "$(cap "${TC_TEST_TIMEOUT:-35}")" python3 -m pytest \
    tests/ops/test_kernels.py -k "cuda and half_precision" -q -rfE -p no:cacheprovider \
    -p no:benchmark 2>&1) || status=1
  echo "$tc_log" | tail -n 15
  echo "$tc_log" | tail -n 1 | grep " passed" | grep -qv skipped \
    || { echo "the tensor-core cases did not all run"; status=1; }
  phase benchmarks
  timeout "$(cap "${BENCH_TIMEOUT:-70}")" python3 -m memkernels.apps.bench --device cuda \
    --min-time "${BENCH_MIN_TIME:-0.3}" --out "$RESULTS/gpu_results.jsonl" ${BENCH_ARGS:-} || status=1
  # every run's rows also go to the machine kind's file (ops-h100.jsonl, ops-h200.jsonl, ...)
  kind=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -oiE "[a-z][0-9]{2,4}" | head -n 1 | tr A-Z a-z)
  [ -f "$RESULTS/gpu_results.jsonl" ] && cat "$RESULTS/gpu_results.jsonl" >> "benchmarks/results/ops-${kind:-gpu}.jsonl"
  phase "benchmarks: the CUDA backend's tensor-core forward (opt-in)"
  MEMKERNELS_CUDA_TENSOR_CORES=1 timeout "$(cap "${TC_BENCH_TIMEOUT:-40}")" python3 -m memkernels.apps.bench \
    --device cuda --backends cuda --ops read_fwd write_fwd --min-time "${BENCH_MIN_TIME:-0.3}" \
    --out "$RESULTS/gpu_results_tensor_cores.jsonl" || status=1
  phase tests
  # The tests that touch the GPU (triton and cuda backends, the memory model on
  # CUDA); CI runs the CPU-only ones on every commit. pytest-xdist and
  # pytest-timeout are on the GPU image. One line per test goes to
  # gpu_tests.log, so a run stopped at its limit still names its failures.
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-16}")
  per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
  timeout "$(cap "${TEST_TIMEOUT:-250}")" python3 -m pytest tests/ops tests/memory tests/hf tests/apps/test_bench_harness.py \
    -k "${TEST_K:-not cpu and not tensor_core}" -v -rfE --durations=10 \
    -p no:cacheprovider -p no:benchmark $xdist $per_test ${TEST_ARGS:-} > "$RESULTS/gpu_tests.log" 2>&1 \
    || status=1
  grep -E "FAILED|ERROR|Timeout|passed|failed" "$RESULTS/gpu_tests.log" | grep -v PASSED | tail -n 40
  phase "the CPU kernels' AVX-512 body on this host's CPU (CI's hosts may have none)"
  # The test filter above leaves out the files named for the CPU; this one checks the
  # AVX-512 bodies (the few-row read, the reading layer, the tile path on the AVX-512 GEMM
  # kernel and on the BLAS) against the reference, and the native AVX-512 exp against its
  # emulation.
  if grep -q avx512f /proc/cpuinfo; then
    timeout "$(cap "${ISA_TIMEOUT:-60}")" python3 -m pytest tests/ops/test_cpu_isa_paths.py \
      -k "avx512 or vector_exp" -q \
      -p no:cacheprovider -p no:benchmark 2>&1 | tail -n 15 || status=1
  else
    echo "no AVX-512 on this host"
  fi
  phase "cmake build + profiling driver"
  if [ "${SKIP_CMAKE:-0}" != 1 ]; then
    timeout "$(cap 45)" bash -c 'cmake -S . -B /tmp/mk-build -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null &&
      cmake --build /tmp/mk-build -j "$MAX_JOBS" >/dev/null &&
      /tmp/mk-build/memkernels_check_cpu | tail -n 2 && /tmp/mk-build/memkernels_profile &&
      echo "with MEMKERNELS_CUDA_TENSOR_CORES=1:" &&
      MEMKERNELS_CUDA_TENSOR_CORES=1 /tmp/mk-build/memkernels_profile' || status=1
  fi
  phase "nsys / ncu on the profiling driver (README, Profiling)"
  # Kernel time per NVTX range (nsys), then speed-of-light and occupancy of the decode
  # read's kernels (ncu); each tool only if installed, each capped at 25 s. Hardware
  # counters can be refused (ERR_NVGPUCTRPERM) on a shared machine: the log then says so.
  if [ "${PROFILE:-1}" = 1 ] && [ -x /tmp/mk-build/memkernels_profile ]; then
    if command -v nsys >/dev/null; then
      timeout "$(cap 25)" nsys profile -t cuda,nvtx --stats=true -o "$RESULTS/profile" --force-overwrite true \
        /tmp/mk-build/memkernels_profile > "$RESULTS/nsys.txt" 2>&1 || echo "nsys failed (see nsys.txt)"
      grep -A 12 "cuda_gpu_kern_sum" "$RESULTS/nsys.txt" | head -n 16
    fi
    if command -v ncu >/dev/null; then
      timeout "$(cap 25)" ncu --clock-control none --nvtx --nvtx-include "read_fwd_decode/" --section SpeedOfLight \
        --section Occupancy -c 4 /tmp/mk-build/memkernels_profile > "$RESULTS/ncu.txt" 2>&1 \
        || echo "ncu failed (see ncu.txt)"
      grep -E "^  [a-z_]+.*\(|Memory Throughput|DRAM Throughput|Achieved Occupancy|ERR_" \
        "$RESULTS/ncu.txt" | head -n 24
    fi
  fi
  phase "exit status $status"
  echo "$status" > "$status_file"
} 2>&1 | tee "$LOG"
status=$(cat "$status_file"); rm -f "$status_file"
exit "${status:-1}"
