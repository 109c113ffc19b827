#!/usr/bin/env bash
# Compile-only check of the CUDA wheel: builds the i2x wheel with the CUDA kernels switched on
# (I2X_CUDA=1), exactly as a CUDA wheel is made, and inspects it: the CUDA build flag, the torch pin
# in its metadata, and device code for every requested architecture in the compiled module. Needs
# nvcc and a Python environment with torch and the build requirements (scikit-build-core>=1.1,
# pybind11, cmake>=3.26, ninja); needs no GPU (nothing is run).
#
#   scripts/cuda_compile_check.sh [BUILD_DIR]      (default: build/cuda-check; the wheel lands in BUILD_DIR/dist)
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

"$py" -c "import scikit_build_core, pybind11, cmake, ninja" 2>/dev/null ||
  die "the build requirements are missing for $py (pip install 'scikit-build-core>=1.1' pybind11 'cmake>=3.26' ninja)"

echo "cuda_compile_check: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), python $py"
echo "cuda_compile_check: building the CUDA wheel in $build_dir (archs $archs, $jobs jobs)"

rm -rf "$build_dir/dist"
# The same command as the CPU wheel, with the switch; its own build folder, so the CPU build in
# build/<wheel tag> is left as it is.
I2X_CUDA=1 I2X_CUDA_ARCHS="$archs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
  "$py" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  --config-settings=build-dir="$build_dir/cmake" -w "$build_dir/dist" .

wheel="$(ls "$build_dir"/dist/i2x-*.whl)"
"$py" - "$wheel" "$archs" <<'PY'
import re, subprocess, sys, tempfile, zipfile
import torch

def cuobjdump() -> str:
    """cuobjdump on PATH, beside the real nvcc, or the copy triton ships (this toolkit has none)."""
    import os, shutil
    from pathlib import Path
    found = shutil.which("cuobjdump")
    nvcc = shutil.which("nvcc")
    if not found and nvcc:
        for candidate in [Path(os.path.realpath(nvcc)).parent / "cuobjdump",
                          *Path("/usr/local").glob("cuda*/bin/cuobjdump")]:
            if candidate.exists():
                found = str(candidate)
                break
    if not found:
        try:
            import triton
            candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            found = str(candidate) if candidate.exists() else None
        except ImportError:
            pass
    if not found:
        sys.exit("cuda_compile_check: error: no cuobjdump (CUDA toolkit or triton) to list the device code with")
    return found


wheel, archs = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    config = zf.read("i2x/_build_config.py").decode()
    metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    (module,) = [n for n in names if re.fullmatch(r"i2x/_C\..*\.so", n)]
    with tempfile.TemporaryDirectory() as tmp:
        so = zf.extract(module, tmp)
        # the device code nvcc put in the module, one ELF per architecture
        listed = subprocess.run([cuobjdump(), "--list-elf", so], capture_output=True, text=True, check=True).stdout
problems = []
if "WITH_CUDA = True" not in config:
    problems.append("_build_config.py does not say WITH_CUDA = True")
series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
if f"Requires-Dist: torch=={series}.*" not in metadata:
    problems.append(f"METADATA does not pin torch=={series}.*")
for arch in re.split(r"[;,]", archs):
    if not re.search(rf"sm_{arch.strip()}\b", listed):
        problems.append(f"no device code for sm_{arch.strip()} in {module} (cuobjdump --list-elf: {listed.strip()!r})")
if problems:
    sys.exit("cuda_compile_check: error: " + "; ".join(problems))
print(f"cuda_compile_check: {module}: {len(listed.splitlines())} device ELF(s): {', '.join(sorted(set(re.findall(r'sm_[0-9a-z]+', listed))))}")
PY
echo "cuda_compile_check: OK, built $wheel"
