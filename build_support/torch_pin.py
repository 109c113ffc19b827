"""Build-time metadata: a wheel of i2x requires the torch release series it was compiled against.

i2x's compiled module links against libtorch, whose C++ ABI holds within a release series
(2.14.0, 2.14.1, ...) and not across them. So a wheel built against torch 2.14.1 declares
``torch==2.14.*`` and pip refuses to install it beside any other torch. scikit-build-core calls
this provider (``[[tool.dynamic-metadata]]`` in pyproject.toml) while it prepares the metadata of
a wheel, an editable install or an sdist; it is build machinery only and is not shipped.

The torch compiled against is the one the build environment imports (``--no-build-isolation``),
the same one CMakeLists.txt finds. An sdist is not compiled, so its metadata carries the range
i2x supports (``torch-range``) and marks ``Requires-Dist`` as Dynamic: the wheel built from it
pins again, to whatever torch that build finds. i2x/_loader.py applies the same rule when the
module is imported (it cannot be imported from here: the build must not need i2x itself).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping
from typing import Any

SETTINGS = {"dependencies", "torch-range"}


def _require_list(settings: Mapping[str, Any], key: str) -> list[str]:
    value = settings.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"torch_pin: setting {key!r} must be a list of requirement strings")
    return list(value)


def _project_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def torch_series(version: str) -> str:
    """'2.14.1+cu130' -> '2.14': the release series whose ABI a build is tied to."""
    parts = version.split("+", 1)[0].split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"torch_pin: cannot read a release series from torch version {version!r}")
    return f"{parts[0]}.{parts[1]}"


def built_torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "i2x compiles against the torch of the build environment, and this one has none. Install "
            "torch first, then build without isolation: `pip wheel --no-build-isolation --no-deps .` "
            "(or `pip install --no-build-isolation .`)."
        ) from None


class TorchPin:
    """dynamic-metadata provider filling ``[project].dependencies``."""

    def __init__(self) -> None:
        self._state = "metadata_wheel"

    def build_state(self, build_state: str) -> None:
        self._state = build_state

    def dynamic_metadata(self, settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(settings) - SETTINGS
        if unknown:
            raise KeyError(f"torch_pin: unknown settings {sorted(unknown)}; it takes {sorted(SETTINGS)}")
        others = _require_list(settings, "dependencies")
        if any(_project_name(req) == "torch" for req in others):
            raise ValueError("torch_pin: list torch in 'torch-range', not in 'dependencies'")
        if self._state == "sdist":
            torch_requirement = "torch" + str(settings.get("torch-range", ""))
        else:
            torch_requirement = f"torch=={torch_series(built_torch_version())}.*"
        return {"dependencies": [torch_requirement, *others]}

    def dynamic_wheel(self, settings: Mapping[str, Any]) -> dict[str, bool]:
        # the sdist's torch requirement is a range; each wheel built from it pins its own torch
        return {"dependencies": True}
