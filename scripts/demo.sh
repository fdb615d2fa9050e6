#!/usr/bin/env bash
# Set up, then train the GPT-2 demo on 8 local CPU processes, grid pp=2,dp=2,x=2 (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-8}" \
  examples/train_gpt.py "$@"
