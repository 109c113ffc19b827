#!/usr/bin/env bash
# On a GPU machine (H100/H200: its own torch, nvcc, no network): build i2x with the CUDA kernels
# against that torch, run the whole test suite (the CUDA variants included), and the kernel
# benchmark table on the GPU beside the device-to-device copy bandwidth.
# Logs and the table go to $OUT (or build/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== build with CUDA (archs ${I2X_CUDA_ARCHS:-90})"
I2X_CUDA=1 I2X_CUDA_ARCHS=${I2X_CUDA_ARCHS:-90} \
  "$PY" -m pip install -q --no-index --no-build-isolation --no-deps --force-reinstall . 2>&1 | tee "$OUT/build.log"
# Run from outside the source tree so `import i2x` is the installed build.
(cd /tmp && "$PY" -c "import i2x; print(i2x.build_info())")
echo "== tests"
set +e
"$PY" -P -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "== kernel benchmarks on cuda"
"$PY" benchmarks/run_ops_table.py --device cuda --repeats 20 --write "$OUT/results.md" 2>&1 | tee "$OUT/bench.log"
exit "$tests_rc"
