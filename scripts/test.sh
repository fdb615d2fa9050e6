#!/usr/bin/env bash
# Set up, then run the whole test suite (pass extra pytest args through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
