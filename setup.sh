#!/usr/bin/env bash
# Create .venv (if missing) and install everything nanowaltz needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# requirements.txt pins torch==2.13.0; on a GPU machine install the CUDA build of torch first (README "GPU").
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
echo "setup.sh: environment ready in .venv"
