#!/usr/bin/env bash
# Sets up the environment and runs the main job. Until `i2x demo` exists this prints the build
# info and the kernel benchmark table (i2x ops vs their eager-torch composites).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -P benchmarks/run_ops_table.py "$@"
