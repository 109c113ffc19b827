"""The package's shape, as a contract the tests hold (docs/architecture.md).

Truths: the source files themselves (parsed, not imported), import-linter's verdict on the layer
contracts in pyproject.toml, and a fresh interpreter's view of the old module paths.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "i2x"
# Modules whose names start with "_" but are meant to be imported: the compiled module, its
# build record, the loader, and the one home of shared helpers.
PRIVATE_MODULES_OK = {"_C", "_build_config", "_loader", "_internal"}
STAGE_FOLDERS = ("_internal", "explain", "data", "store", "track", "analysis", "loop", "report", "apps", "cli",
                 "integrations", "models")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists() or base.name in PRIVATE_MODULES_OK


def _private_imports(path: Path) -> list[str]:
    """``from i2x.x import _y`` where ``_y`` is a function, class or value of another module."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("i2x"):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not _is_module(f"{node.module}.{alias.name}"):
                found.append(f"{_module_name(path)}:{node.lineno} from {node.module} import {alias.name}")
    return found


def test_the_stages_are_folders():
    for folder in STAGE_FOLDERS:
        assert (PACKAGE / folder / "__init__.py").is_file(), f"i2x/{folder}/ is not a package"
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    # What stays at the top: the package's door, the compiled ops and their twins.
    assert flat == ["__init__.py", "__main__.py", "_loader.py", "ops.py", "reference.py"], flat


def test_no_module_imports_another_modules_private_name():
    found = [hit for path in _modules() for hit in _private_imports(path)]
    assert not found, "private names imported across modules (move them to i2x/_internal/ or make them public):\n" \
        + "\n".join(found)


def test_the_private_import_check_sees_a_private_import(tmp_path):
    """The check above can fail: a planted ``from i2x.track.tracker import _dist_context`` is found."""
    planted = tmp_path / "planted.py"
    planted.write_text("from i2x.track.tracker import _dist_context\nfrom i2x._internal import checks\n")
    hits = _private_imports(planted)
    assert len(hits) == 1 and "_dist_context" in hits[0]


def test_no_star_imports_and_no_relative_imports():
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not any(a.name == "*" for a in node.names), f"{path}: import *"
                assert node.level == 0, f"{path}:{node.lineno}: a relative import (the package uses absolute ones)"


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "lint-imports is not installed (scripts/setup.sh installs import-linter)"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def _fresh(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_old_module_paths_import_the_modules_that_hold_their_contents_now():
    report = _fresh(
        "import json, importlib, types, i2x\n"
        "from i2x._internal.aliases import MOVED\n"
        "out = {}\n"
        "for old, new in MOVED.items():\n"
        "    via_import = importlib.import_module('i2x.' + old)\n"
        "    out[old] = [via_import is importlib.import_module('i2x.' + new), getattr(i2x, old) is via_import,\n"
        "                via_import.__spec__.name]\n"
        "from i2x.strategies import OversampleSampler\n"
        "from i2x.curate import find_targets, otsu_threshold\n"
        "import i2x.loop.training, i2x.loop.experiments\n"
        "out['functions'] = [isinstance(i2x.finetune, types.FunctionType), isinstance(i2x.experiment, types.FunctionType),\n"
        "                    OversampleSampler.__module__, find_targets is i2x.find_targets]\n"
        "print(json.dumps(out))\n")
    functions = report.pop("functions")
    from i2x._internal.aliases import MOVED

    for old, (same, attribute, spec_name) in report.items():
        assert same and attribute, old
        assert spec_name == f"i2x.{MOVED[old]}", f"i2x.{old} changed the real module's __spec__ to {spec_name}"
    assert functions == [True, True, "i2x.loop.strategies", True]


def test_an_unknown_old_path_still_fails_to_import():
    with pytest.raises(ModuleNotFoundError):
        __import__("i2x.no_such_module")
