"""i2x: structured explanations of image classifiers (the I2X method), on batched native kernels.

The pipeline, one folder per stage (``docs/architecture.md``)::

    train = i2x.load_dataset("fashion-mnist")
    model, layer = i2x.build_model("small-resnet", num_classes=10)
    probe = i2x.Probe.from_dataset(train, size=1000)
    tracker = i2x.Tracker(model, layer, probe, "runs/fmnist", planned_steps=total_steps)
    ...  tracker.step(step) in the training loop, tracker.finish(step) at the end (stages 1-2)
    i2x.analyze("runs/fmnist")                          # stages 3-8
    print(i2x.explain_sample("runs/fmnist", 0))         # "why does it look there"

Importing i2x is cheap: the names below are loaded on first use (PEP 562), so ``import i2x`` (and
``i2x --help``) does not import torch until a name is touched (when torch is imported already, the
compiled kernels are loaded and checked against it at once), and never
imports scikit-learn (``i2x.analysis`` imports it only inside the function that runs HDBSCAN,
``i2x.data`` only to load the ``digits`` dataset).
"""


from __future__ import annotations

import importlib
import sys

from i2x._internal import aliases as _internal_aliases

# public name -> the module (of this package) that defines it
_EXPORTS = {
    "build_info": "_loader",
    "Explainer": "explain", "Captured": "explain", "swin_reshape": "explain", "vit_reshape": "explain",
    "relevance_mass": "explain", "wrong_reason_share": "explain",
    "load_dataset": "data",
    "build_model": "models",
    "RunStore": "store", "RunStoreError": "store", "RunLockedError": "store",
    "Probe": "track", "Tracker": "track", "log_schedule": "track", "track_checkpoints": "track",
    "Prototypes": "track", "discover_prototypes": "track", "fit_prototypes": "track",
    "analyze": "analysis", "explain_sample": "analysis", "load_analysis": "analysis",
    "NothingToCurate": "loop", "Targets": "loop", "find_targets": "loop", "known_targets": "loop",
    "load_targets": "loop",
    "ExplanationPenalty": "loop",
    "evaluate": "loop", "finetune": "loop", "train": "loop",
    "experiment": "loop", "load_results": "loop",
    "write_report": "report",
}
# i2x.<name> that is a module: the stage folders, and the modules' names before they moved into
# them (i2x.curate is i2x.loop.targets...), so code written against either keeps working.
_MODULES = {
    **{m: m for m in ("ops", "reference", "data", "models", "store", "track", "analysis", "loop", "report", "explain",
                      "apps")},
    **_internal_aliases.MOVED,
}

__all__ = [
    "build_info",
    # modules
    "ops",
    "reference",
    "metrics",
    "data",
    "models",
    "store",
    "track",
    "prototypes",
    "analysis",
    # explaining one model
    "Explainer",
    "Captured",
    "vit_reshape",
    "swin_reshape",
    "relevance_mass",
    "wrong_reason_share",
    # datasets and models
    "load_dataset",
    "build_model",
    # stage 1: tracking, and the run on disk
    "Probe",
    "Tracker",
    "track_checkpoints",
    "log_schedule",
    "RunStore",
    "RunStoreError",
    # stage 2: prototypes
    "Prototypes",
    "discover_prototypes",
    "fit_prototypes",
    # stages 3-8: analysis
    "analyze",
    "load_analysis",
    "explain_sample",
    # stage 9: the closed loop
    "curate",
    "strategies",
    "penalty",
    "find_targets",
    "known_targets",
    "load_targets",
    "Targets",
    "NothingToCurate",
    "ExplanationPenalty",
    "finetune",
    "train",
    "evaluate",
    "experiment",
    "load_results",
    "RunLockedError",
    # the report
    "report",
    "write_report",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module 'i2x' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


# ``import i2x.curate`` / ``from i2x.strategies import ...``: the old module paths still import.
_internal_aliases.install(__name__)

# With torch already imported (the usual ``import torch, i2x``) loading the kernels costs little:
# do it now, so that torch.ops.i2x.* exist at once and a build made for another torch is refused
# at import rather than at first use.
if "torch" in sys.modules:
    from i2x import _loader  # noqa: F401


def __dir__():
    return sorted(set(globals()) | set(__all__))
