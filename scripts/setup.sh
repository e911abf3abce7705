#!/usr/bin/env bash
# All set-up on a fresh machine: pinned dependencies, then the extension
# built against the installed torch (no build isolation, so no second torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --no-build-isolation --no-deps -e .
python3 -c "import memkernels; print('memkernels', memkernels.__version__, 'backends:', memkernels.available_backends())"
