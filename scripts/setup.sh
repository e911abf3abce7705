#!/usr/bin/env bash
# All set-up on a fresh machine or in a fresh venv: the pinned dependencies
# (requirements.txt, or the file given), then the extension built against the
# installed torch (no build isolation, so no second torch is fetched).
# Installs into the python3 that comes first: activate a venv first to keep it there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r "${1:-requirements.txt}"
python3 -m pip install -q --no-build-isolation --no-deps -e .
python3 -c "import memkernels; print('memkernels', memkernels.__version__, 'in', memkernels.__path__[0], '- backends:', memkernels.available_backends())"
