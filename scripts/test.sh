#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Spin-waiting OpenMP threads make torch crawl when two processes share the 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# -P: keep the source folder i2x/ (which has no compiled module) off sys.path; test the installed build.
exec .venv/bin/python -P -m pytest tests "$@"
