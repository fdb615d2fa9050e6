#!/usr/bin/env bash
# Set up, then run the whole test suite (pass extra pytest args through).
# One pytest process: two workers (pytest-xdist, a module each) took 814, 888 and 968 s against
# ~920 s alone on this 2-core machine; launches under the other worker's load slowed by 2-16x.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
