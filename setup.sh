#!/usr/bin/env bash
# Create .venv (if missing) and install everything nanowaltz needs. Safe to run again.
#   bash setup.sh                the torch that pip picks for this machine (CI: the CPU build)
#   TORCH_CUDA=1 bash setup.sh   a GPU machine: the CUDA build of torch in .venv, from PyPI (its Linux x86_64 wheel is
#                                the CUDA build); TORCH_INDEX_URL=<index> takes it from another index instead
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Prints torch's version and CUDA; fails when torch is missing or is a CPU-only build.
CUDA_CHECK='import torch; assert torch.version.cuda, "a CPU-only build"
print(f"setup.sh: torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")'
if [ "${TORCH_CUDA:-0}" = 1 ]; then
    TORCH=$(grep -o '^torch==[^ ]*' requirements.txt)
    if ! .venv/bin/python -c "$CUDA_CHECK" >/dev/null 2>&1; then
        # A CPU build already in .venv would satisfy torch==X ("X+cpu" matches it), so it goes first.
        .venv/bin/python -m pip uninstall -q -y torch >/dev/null 2>&1 || true
        .venv/bin/python -m pip install -q "$TORCH" --index-url "${TORCH_INDEX_URL:-https://pypi.org/simple}"
    fi
    if ! .venv/bin/python -c "$CUDA_CHECK"; then
        echo "setup.sh: TORCH_CUDA=1, but the torch in .venv is not a CUDA build (pip's configuration may point to a" \
             "CPU-only index or wheel folder); set TORCH_INDEX_URL to an index with CUDA builds" >&2
        exit 1
    fi
fi
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
echo "setup.sh: environment ready in .venv"
