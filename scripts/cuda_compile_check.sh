#!/usr/bin/env bash
# Compile-only check of the CUDA build: configures and builds the i2x._C module with the CUDA
# kernels in a separate build directory. Needs nvcc and a Python environment with torch, pybind11,
# cmake>=3.26 and ninja; needs no GPU (nothing is run).
#
#   scripts/cuda_compile_check.sh [BUILD_DIR]      (default: build/cuda-check)
#   PYTHON=/path/to/python   interpreter to build against (default: .venv/bin/python)
#   CUDA_ARCHS=90            architectures to compile for (default: 90, H100/H200)
#   JOBS=2                   parallel compile jobs (default: 2)
set -euo pipefail

die() { echo "cuda_compile_check: error: $*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
case "$py" in
  /*) ;;
  */*) py="$PWD/$py" ;;                     # relative to where the script was called from
  *) py="$(command -v "$py" || echo "$py")" ;;  # a bare name: look it up on PATH
esac
cd "$root"
build_dir="${1:-${BUILD_DIR:-build/cuda-check}}"
archs="${CUDA_ARCHS:-90}"
jobs="${JOBS:-2}"

command -v nvcc >/dev/null 2>&1 ||
  die "nvcc not found on PATH; install the CUDA toolkit (or add its bin/ to PATH) to compile the CUDA kernels"
[ -x "$py" ] || command -v "$py" >/dev/null 2>&1 ||
  die "python '$py' not found; create the venv (.venv) or set PYTHON=/path/to/python"

# cmake >= 3.26 (the system 3.25 fails on CUDA with C++20): the environment's own, as a module or
# beside the interpreter.
if "$py" -m cmake --version >/dev/null 2>&1; then
  cmake_cmd=("$py" -m cmake)
elif [ -x "$(dirname "$py")/cmake" ]; then
  cmake_cmd=("$(dirname "$py")/cmake")
else
  die "no cmake in the Python environment of $py; install it there (pip install 'cmake>=3.26')"
fi
ninja_bin="$(dirname "$py")/ninja"
ninja_args=()
if [ -x "$ninja_bin" ]; then
  ninja_args=(-DCMAKE_MAKE_PROGRAM="$ninja_bin")
elif ! command -v ninja >/dev/null 2>&1; then
  die "ninja not found (pip install ninja in the environment of $py)"
fi
pybind11_dir="$("$py" -m pybind11 --cmakedir)" || die "pybind11 is not installed for $py"

echo "cuda_compile_check: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), $("${cmake_cmd[@]}" --version | head -n1), python $py"
echo "cuda_compile_check: building in $build_dir (archs $archs, $jobs jobs)"

"${cmake_cmd[@]}" -S . -B "$build_dir" -G Ninja \
  -DI2X_WITH_CUDA=ON \
  -DI2X_CUDA_ARCHS="$archs" \
  -DPython_EXECUTABLE="$py" \
  -Dpybind11_DIR="$pybind11_dir" \
  "${ninja_args[@]}"
"${cmake_cmd[@]}" --build "$build_dir" -j "$jobs"

echo "cuda_compile_check: OK, built $(ls "$build_dir"/_C*.so 2>/dev/null | head -n1)"
