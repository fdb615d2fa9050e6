#!/usr/bin/env bash
# Set up, then run the whole test suite (pass extra pytest args through).
# Two pytest workers, a test module each at a time (module-scoped fixtures stay whole): run one
# after the other, the modules left about a quarter of the two cores idle (timeouts under test,
# Slurm's scheduler, sleeps), and the other worker's ranks compute in that time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q -n 2 --dist loadfile "$@"
