#!/usr/bin/env bash
# Create .venv and install autopar with its test/example extras.
# Where a CUDA build of torch is already installed, the venv sees it (--system-site-packages) and
# keeps it; elsewhere it gets the CPU wheel of torch 2.13.0 (an open range would pull GBs of CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: keeping the installed CUDA torch"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test]"
python -c "import torch, autopar; print(f'setup: torch {torch.__version__}, autopar {autopar.__version__}')"
