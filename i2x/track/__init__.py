"""Stages 1-2: the probe, the saliency records over training (online with :class:`Tracker`, or
post hoc over saved checkpoints), and the prototypes discovered from the final model.

    streamed.py   images from any torch Dataset, a batch at a time
    batchnorm.py  BatchNorm statistics recomputed on fixed images while recording
    tracker.py    :class:`Probe`, :class:`Tracker`, :func:`record_checkpoint`, :func:`log_schedule`
    checkpoints.py  :func:`track_checkpoints` over a folder of saved weights
    prototypes.py :class:`Prototypes`: PCA + k-means of the final layer features (stage 2)
"""

from i2x._internal.weights import load_weights
from i2x.track.batchnorm import recalibrated_batchnorm
from i2x.track.checkpoints import (
                                   CHECKPOINT_SUFFIXES,
                                   check_run_grid,
                                   final_model,
                                   find_checkpoints,
                                   track_checkpoints,
)
from i2x.track.prototypes import (
                                   Prototypes,
                                   discover_prototypes,
                                   fit_prototypes,
                                   layer_features,
                                   read_assignment,
                                   read_prototypes,
                                   write_prototypes,
)
from i2x.track.streamed import (
                                   StreamedImages,
                                   batches_at,
                                   holds_tensors,
                                   images_at,
                                   iter_batches,
)
from i2x.track.tracker import (
                                   DEFAULT_CHECKPOINTS,
                                   Probe,
                                   Tracker,
                                   log_schedule,
                                   record_checkpoint,
)

__all__ = [
    "Probe", "Tracker", "log_schedule", "record_checkpoint", "DEFAULT_CHECKPOINTS",
    "track_checkpoints", "find_checkpoints", "final_model", "check_run_grid", "load_weights", "CHECKPOINT_SUFFIXES",
    "recalibrated_batchnorm", "write_prototypes", "read_prototypes", "read_assignment",
    "Prototypes", "layer_features", "fit_prototypes", "discover_prototypes",
    "StreamedImages", "iter_batches", "holds_tensors", "images_at", "batches_at",
]
