"""The public API of the ``i2x`` package: every documented name is exported, resolves to the object
of the module that defines it, and ``import i2x`` stays cheap (no scikit-learn).

Truths: the list of names below is written out by hand from the documentation (not read from
``i2x.__all__``), and the modules' own attributes; the import check runs in a fresh interpreter,
with a positive control showing that the same check does see scikit-learn once it is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import i2x

# name -> module that defines it (a name that is a module -> the module it is, written "module:NAME").
EXPORTS = {
    "data": "module:i2x.data",
    "models": "module:i2x.models",
    "store": "module:i2x.store",
    "track": "module:i2x.track",
    "prototypes": "module:i2x.track.prototypes",
    "analysis": "module:i2x.analysis",
    "ops": "module:i2x.ops",
    "reference": "module:i2x.reference",
    "metrics": "module:i2x.explain.metrics",
    "curate": "module:i2x.loop",
    "strategies": "module:i2x.loop.strategies",
    "penalty": "module:i2x.loop.penalty",
    "report": "module:i2x.report",
    "Probe": "track",
    "Tracker": "track",
    "track_checkpoints": "track",
    "log_schedule": "track",
    "RunStore": "store",
    "RunStoreError": "store",
    "load_dataset": "data",
    "build_model": "models",
    "Prototypes": "track.prototypes",
    "discover_prototypes": "track.prototypes",
    "fit_prototypes": "track.prototypes",
    "analyze": "analysis",
    "load_analysis": "analysis",
    "explain_sample": "analysis",
    "Explainer": "explain.explainer",
    "Captured": "explain.explainer",
    "vit_reshape": "explain.explainer",
    "swin_reshape": "explain.explainer",
    "relevance_mass": "explain.metrics",
    "wrong_reason_share": "explain.metrics",
    "find_targets": "loop.target_rule",
    "Targets": "loop.targets",
    "finetune": "loop.training",
    "experiment": "loop.experiments",
    "write_report": "report.html",
    "build_info": "_loader",
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_exported_name_resolves_to_its_definition(name):
    assert name in i2x.__all__, f"i2x.__all__ lacks {name!r}"
    obj = getattr(i2x, name)
    home = EXPORTS[name]
    if home.startswith("module:"):
        assert isinstance(obj, types.ModuleType)
        assert obj.__name__ == home.removeprefix("module:")
    else:
        module = sys.modules[f"i2x.{home}"]
        assert obj is getattr(module, name), f"i2x.{name} is not i2x.{home}.{name}"


def test_all_has_no_dangling_or_duplicate_names():
    assert len(i2x.__all__) == len(set(i2x.__all__)), "duplicates in i2x.__all__"
    missing = [n for n in i2x.__all__ if not hasattr(i2x, n)]
    assert not missing, f"i2x.__all__ names {missing}, which i2x does not define"


def test_star_import_gives_every_exported_name():
    namespace: dict = {}
    exec("from i2x import *", namespace)
    assert set(EXPORTS) <= set(namespace)


def test_error_class_is_a_value_error():
    # Callers catch a corrupt run folder as bad input, like every other i2x argument error.
    assert issubclass(i2x.RunStoreError, ValueError)


_IMPORT_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    import i2x
    after_import = "sklearn" in sys.modules
    # Positive control: the one function that needs scikit-learn imports it, and the check sees it.
    i2x.analysis.cluster_trajectories(torch.randn(12, 2, dtype=torch.float64), 5)
    after_hdbscan = "sklearn" in sys.modules
    print(json.dumps({"file": i2x.__file__, "after_import": after_import, "after_hdbscan": after_hdbscan}))
    """
)


def test_import_i2x_does_not_import_sklearn():
    root = Path(i2x.__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_clean_env(), "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve() == Path(i2x.__file__).resolve(), "the subprocess imported another i2x"
    assert report["after_import"] is False, "import i2x imported scikit-learn"
    assert report["after_hdbscan"] is True, "the check cannot see scikit-learn even once it is imported"


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env
