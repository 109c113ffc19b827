#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the main job: `i2x demo` on the default data
# (Fashion-MNIST when found, else scikit-learn's digits). Arguments go to `i2x demo`, e.g. --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Spin-waiting OpenMP threads make torch crawl when another process shares the cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/i2x demo "$@"
