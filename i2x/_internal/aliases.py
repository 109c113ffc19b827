"""The module paths i2x had before its modules moved into stage folders, kept importable.

``i2x.curate``, ``from i2x.strategies import OversampleSampler``, ``import i2x.cam`` ... keep
working: a finder on ``sys.meta_path`` answers each old name with the module that now holds its
contents (the same module object, not a copy). Only the standard library is imported here.
``i2x.finetune`` and ``i2x.experiment`` are the functions of those names, so their old modules are
not aliased (``i2x.loop.training``, ``i2x.loop.experiments``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

__all__ = ["MOVED", "install"]

#: old module name (under i2x) -> the module that holds its contents now
MOVED = {
    "cam": "explain.explainer",
    "metrics": "explain.metrics",
    "streamed": "track.streamed",
    "prototypes": "track.prototypes",
    "readings": "analysis.readings",
    "curate": "loop",
    "strategies": "loop.strategies",
    "penalty": "loop.penalty",
    "planted": "loop.planted",
    "pipeline": "apps.demo",
    "bench": "apps.bench",
    "explain_files": "apps.explain_files",
}


class _AliasLoader:
    # importlib's loader protocol (duck-typed: importing importlib.abc would cost ~15 ms at `import i2x`)
    def __init__(self, target: str):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system stamped the alias's spec on the real module: give it its own back.
        module.__spec__ = self._spec


class _AliasFinder:
    # importlib's meta path finder protocol
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.rpartition(".")
        if head != self.package or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{self.package}.{MOVED[old]}"))


def install(package: str) -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _AliasFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(package))
