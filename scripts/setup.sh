#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned torch and the build requirements, then builds and
# installs i2x into it. Idempotent: a second run only rebuilds i2x.
#   I2X_CUDA=1 bash scripts/setup.sh   builds the CUDA kernels too (needs nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-python3}
VENV=${I2X_VENV:-.venv}

# Real data for the demo and the Fashion-MNIST tests (best effort: i2x itself does not need it).
bash scripts/get_data.sh || echo "setup: dataset-fashion-mnist not installed; the Fashion-MNIST tests will skip" >&2

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch and torchvision are pinned as a pair (PyPI's torchvision needs its own torch).
"$PY" -m pip install -q --disable-pip-version-check \
  torch==2.14.1 torchvision==0.29.1 \
  "scikit-build-core>=1.1" "pybind11>=2.12" "cmake>=3.26" ninja numpy \
  "safetensors>=0.4" "scikit-learn>=1.3" tqdm "matplotlib>=3.7" \
  "pytest>=8" "pytest-benchmark>=4" expecttest \
  captum grad-cam timm lightning build packaging "cleanlab>=2.6" \
  import-linter==2.17 ruff==0.17.6 mypy==2.4.1    # test-only: the linters of scripts/lint.sh, pinned so a new release cannot turn CI red (tests/test_architecture.py runs lint-imports too), build and packaging (tests/test_wheel.py makes the sdist with it), the parity peers, timm (tests/test_timm.py explains its models), lightning (tests/test_lightning.py)
# test-only: tests/_browser.py drives the system Chromium (.ci/run installs it) through Playwright;
# no browser is downloaded (it is launched with executable_path=/usr/bin/chromium).
"$PY" -m pip install -q --disable-pip-version-check playwright
# --no-build-isolation: compile against the torch in this environment instead of copying
# 5.5 GB of torch into a temporary build environment.
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .
"$PY" -P -c "import i2x; print('i2x built:', i2x.build_info())"
