"""i2x: structured explanations of image classifiers (the I2X method), on batched native kernels.

The pipeline, one module per stage (``docs/tracking.md``, ``docs/run-format.md``, ``docs/analysis.md``)::

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
import types

# public name -> the module (of this package) that defines it; a name that maps to itself is a
# module, except the two functions named like their modules (below)
_EXPORTS = {
    "build_info": "_loader",
    **{m: m for m in ("ops", "reference", "metrics", "data", "models", "store", "track", "prototypes", "analysis",
                      "curate", "strategies", "penalty", "report", "pipeline", "bench", "readings",
                      "explain_files")},
    "Explainer": "cam", "Captured": "cam", "swin_reshape": "cam", "vit_reshape": "cam",
    "load_dataset": "data",
    "build_model": "models",
    "RunStore": "store", "RunStoreError": "store", "RunLockedError": "store",
    "Probe": "track", "Tracker": "track", "log_schedule": "track", "track_checkpoints": "track",
    "Prototypes": "prototypes", "discover_prototypes": "prototypes", "fit_prototypes": "prototypes",
    "analyze": "analysis", "explain_sample": "analysis", "load_analysis": "analysis",
    "NothingToCurate": "curate", "Targets": "curate", "find_targets": "curate", "known_targets": "curate",
    "load_targets": "curate",
    "ExplanationPenalty": "penalty",
    "evaluate": "finetune", "finetune": "finetune", "train": "finetune",
    "experiment": "experiment", "load_results": "experiment",
    "write_report": "report",
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
# ``i2x.train``-style functions that share their module's name: ``i2x.finetune`` and
# ``i2x.experiment`` are the functions, as the documentation uses them.
_FUNCTIONS_NAMED_LIKE_MODULES = ("finetune", "experiment")


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'i2x' has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    is_module = module_name == name and name not in _FUNCTIONS_NAMED_LIKE_MODULES
    value = module if is_module else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule i2x.experiment makes Python set the package attribute to the
        # module; keep the function there instead.
        if name in _FUNCTIONS_NAMED_LIKE_MODULES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# With torch already imported (the usual ``import torch, i2x``) loading the kernels costs little:
# do it now, so that torch.ops.i2x.* exist at once and a build made for another torch is refused
# at import rather than at first use.
if "torch" in sys.modules:
    from . import _loader  # noqa: F401


def __dir__():
    return sorted(set(globals()) | set(__all__))
