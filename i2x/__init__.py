"""i2x: structured explanations of image classifiers (the I2X method), on batched native kernels.

The pipeline, one module per stage (``docs/tracking.md``, ``docs/run-format.md``, ``docs/analysis.md``)::

    train = i2x.load_dataset("fashion-mnist")
    model, layer = i2x.build_model("small-resnet", num_classes=10)
    probe = i2x.Probe.from_dataset(train, size=1000)
    tracker = i2x.Tracker(model, layer, probe, "runs/fmnist", planned_steps=total_steps)
    ...  tracker.step(step) in the training loop, tracker.finish(step) at the end (stages 1-2)
    i2x.analyze("runs/fmnist")                          # stages 3-8
    print(i2x.explain_sample("runs/fmnist", 0))         # "why does it look there"

Importing i2x does not import scikit-learn: ``i2x.analysis`` imports it only inside the function
that runs HDBSCAN, and ``i2x.data`` only to load the ``digits`` dataset.
"""

from ._loader import build_info
from . import ops, reference
from .cam import Captured, Explainer, swin_reshape, vit_reshape
from . import metrics
from . import data, models, store, track, prototypes, analysis
from .data import load_dataset
from .models import build_model
from .store import RunStore, RunStoreError
from .track import Probe, Tracker, log_schedule, track_checkpoints
from .prototypes import Prototypes, discover_prototypes, fit_prototypes
from .analysis import analyze, explain_sample, load_analysis
from . import curate
from . import strategies, penalty
from .curate import NothingToCurate, Targets, find_targets, known_targets, load_targets
from .penalty import ExplanationPenalty
from .finetune import evaluate, finetune, train
from .experiment import experiment, load_results

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
]
__version__ = "0.1.0"
