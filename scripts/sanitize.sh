#!/usr/bin/env bash
# The CPU kernels under GCC's AddressSanitizer and UndefinedBehaviorSanitizer, in a scratch
# worktree of HEAD (commit first: uncommitted changes are not in it): memkernels._C built with
# MEMKERNELS_SANITIZE=address,undefined (setup.py) and the tests that call it (tests/ops
# without the GPU, Triton and nvcc ones), each child process of theirs included; then the
# standalone checks (memkernels_check_cpu, CMake) built with the same sanitizers. The first
# report stops the run. On 2 cores: ~5 minutes to build the extension, ~7 of tests, ~5 to
# build the checks. Needs a CPU torch, cmake and a GCC with libasan (Debian/Ubuntu: gcc).
# Extra arguments go to pytest.
#   bash scripts/sanitize.sh                 # all of it
#   bash scripts/sanitize.sh -k extension_fuzz
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)/memkernels-sanitized
git -C "$repo" worktree add -q --detach "$work" HEAD
trap 'git -C "$repo" worktree remove --force "$work"' EXIT
cd "$work"
MEMKERNELS_SANITIZE=address,undefined MEMKERNELS_NO_CUDA=1 MAX_JOBS=2 \
  python3 setup.py -q build_ext --inplace > build.log 2>&1 || { tail -30 build.log; exit 1; }
# Python itself is not instrumented: the ASan runtime must load first, and libstdc++ with it
# so ASan finds the C++ exception entry points it wraps (without it the first C++ exception,
# an argument check's, aborts the process).
asan=$(g++ -print-file-name=libasan.so)
stdcxx=$(g++ -print-file-name=libstdc++.so.6)
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
LD_PRELOAD="$asan $stdcxx" python3 -m pytest tests/ops -q -p no:cacheprovider \
  --ignore=tests/ops/test_build.py -k "not triton and not cuda" "$@"
# the standalone checks: a plain executable, instrumented whole, nothing to preload
flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -S . -B build-sanitized -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
  > cmake.log 2>&1 || { tail -30 cmake.log; exit 1; }
cmake --build build-sanitized -j2 --target memkernels_check_cpu >> cmake.log 2>&1 ||
  { tail -30 cmake.log; exit 1; }
./build-sanitized/memkernels_check_cpu
