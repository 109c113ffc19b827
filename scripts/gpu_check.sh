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
# pyproject.toml's torch pin needs scikit-build-core >= 1.1 ([[tool.dynamic-metadata]]). The GPU
# machine has no network: an older one there is replaced from wheelhouse/, which the caller brings
# (pip download --no-deps -d wheelhouse 'scikit-build-core>=1.1', then carry "wheelhouse").
if ! "$PY" -c "import sys, scikit_build_core as s; from packaging.version import Version; sys.exit(Version(s.__version__) < Version('1.1'))" 2>/dev/null; then
  if ls wheelhouse/scikit_build_core-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --find-links wheelhouse "scikit-build-core>=1.1"
  else
    echo "gpu_check: scikit-build-core >= 1.1 is needed and missing; bring it in wheelhouse/ (see above)" >&2
    exit 2
  fi
fi
echo "== build with CUDA (archs ${I2X_CUDA_ARCHS:-90})"
I2X_CUDA=1 I2X_CUDA_ARCHS=${I2X_CUDA_ARCHS:-90} \
  "$PY" -m pip install -q --no-index --no-build-isolation --no-deps --force-reinstall . 2>&1 | tee "$OUT/build.log"
# Run from outside the source tree so `import i2x` is the installed build.
(cd /tmp && "$PY" -c "import i2x; print(i2x.build_info())")
# The CUDA tests first (what only this machine can check), then the kernel table, then the rest
# of the suite with the GPU visible (defaults that pick a device), in parallel where pytest-xdist
# is installed and within REST_LIMIT seconds (a lease is short; 0 skips it).
echo "== CUDA tests"
set +e
"$PY" -P -m pytest tests -q -rs -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests-cuda.log"
cuda_rc=${PIPESTATUS[0]}
set -e
echo "== kernel benchmarks on cuda"
"$PY" benchmarks/run_ops_table.py --device cuda --repeats 20 --write "$OUT/results.md" 2>&1 | tee "$OUT/bench.log"
rest_rc=0
if [ "${REST_LIMIT:-1800}" -gt 0 ]; then
  echo "== the other tests, GPU visible (limit ${REST_LIMIT:-1800} s)"
  parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "${WORKERS:-8}"); fi
  set +e
  timeout "${REST_LIMIT:-1800}" "$PY" -P -m pytest tests -q -rs -m "not cuda" "${parallel[@]}" -p no:cacheprovider \
    2>&1 | tee "$OUT/tests-rest.log"
  rest_rc=${PIPESTATUS[0]}
  set -e
fi
echo "gpu_check: CUDA tests exit $cuda_rc, other tests exit $rest_rc"
[ "$cuda_rc" -eq 0 ] && [ "$rest_rc" -eq 0 ]
