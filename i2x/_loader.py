"""Loads the compiled module, refusing a torch other than the one it was built against."""

from __future__ import annotations

import torch


def release_series(version: str) -> str:
    """'2.14.1+cu130' -> '2.14'. Patch releases of torch keep its C++ ABI, so a build made against
    2.14.1 loads under 2.14.0 or 2.14.2 too; the wheel's metadata pins the same (torch==2.14.*)."""
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def _load_compiled():
    try:
        from i2x import _build_config
    except ImportError as exc:  # a source checkout that was never built, or imported in place
        from pathlib import Path

        here = Path(__file__).resolve().parent
        in_source = (here.parent / "CMakeLists.txt").exists()
        raise ImportError(
            "i2x: the compiled extension is not built"
            + (f" (this is the source folder {here}: the installed build is shadowed by it; run from "
               "another directory or with `python -P`)" if in_source else "")
            + ". Install it with `pip install --no-build-isolation .` from the repository root "
            "(build requirements first: scikit-build-core pybind11 'cmake>=3.26' ninja)."
        ) from exc
    built = release_series(_build_config.TORCH_VERSION)
    if built != release_series(torch.__version__):
        raise ImportError(
            f"i2x {_build_config.VERSION} was built against torch {_build_config.TORCH_VERSION}, "
            f"but torch {torch.__version__} is installed; libtorch's C++ ABI only holds within one "
            "release series. Rebuild i2x against this torch "
            "(`pip install --no-build-isolation --force-reinstall --no-deps .`) or install "
            f"torch=={built}.*."
        )
    try:
        from i2x import _C
    except ImportError as exc:
        raise ImportError(
            f"i2x: the compiled module failed to load ({exc}). It was built against torch "
            f"{_build_config.TORCH_VERSION}; torch {torch.__version__} is installed."
        ) from exc
    return _C


_C = _load_compiled()


def build_info() -> dict:
    """What the compiled module was built with (versions, CUDA, OpenMP, thread count)."""
    return dict(_C.build_info())
