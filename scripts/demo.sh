#!/usr/bin/env bash
# Set up, then train the GPT-2 demo on 4 local CPU processes (pass extra args through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-4}" \
  examples/train_gpt.py "$@"
