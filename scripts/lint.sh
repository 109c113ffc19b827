#!/usr/bin/env bash
# The package's shape and hygiene, as CI checks them (docs/architecture.md):
#   lint-imports  the layer contracts in pyproject.toml (each folder imports only the ones below it)
#   ruff          style and bug patterns ([tool.ruff] in pyproject.toml)
#   mypy          types of the package ([tool.mypy])
# Needs the venv of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${I2X_VENV:-.venv}/bin
echo "== lint-imports"
"$BIN/lint-imports" --no-cache
echo "== ruff check"
"$BIN/ruff" check i2x
echo "== mypy"
"$BIN/mypy"
