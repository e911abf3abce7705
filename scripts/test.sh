#!/usr/bin/env bash
# Set-up (with the test requirements), then the whole test suite. Without a
# GPU, the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1)
# on CPU tensors, and every CUDA source is compile-checked with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec python3 -m pytest tests "$@"
