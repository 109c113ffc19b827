"""PyTorch Lightning: record stages 1 and 2 of I2X from a ``Trainer`` (``pip install i2x[lightning]``).

::

    from i2x.integrations.lightning import TrackerCallback

    trainer = lightning.Trainer(max_epochs=4, callbacks=[TrackerCallback("model.layer3", probe, "runs/x")])
    trainer.fit(module, loader)             # records at the log-spaced schedule, then the final model
                                            # and its prototypes

The :class:`i2x.Tracker` is built on the ``LightningModule`` itself (so the layer name is relative
to it) when fitting starts; it records after optimizer steps, numbered by ``trainer.global_step``,
and finishes when training ends. Under a distributed strategy (DDP on CPU with gloo, or on GPUs)
every rank runs the callback in lockstep: each explains its shard of the probe and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError("i2x.integrations.lightning needs the lightning package: pip install 'i2x[lightning]' "
                      "(or pip install 'lightning>=2.2')") from e

from i2x.track import Tracker

__all__ = ["TrackerCallback"]


class TrackerCallback(pl.Callback):
    """Track a Lightning training run with :class:`i2x.Tracker` (stages 1 and 2 of I2X).

    Args:
        layer: the target layer of the ``LightningModule``: a dotted name relative to it
            (``"model.layer3"`` when the module holds the network as ``self.model``) or the module.
        probe: an :class:`i2x.Probe`, an ``i2x.data`` dataset, or ``(images, labels)``.
        run_dir: the run folder (created; reopened to resume when it holds the same run).
        planned_steps: the number of optimizer steps for the default log-spaced schedule.
            Default: ``trainer.estimated_stepping_batches`` (epochs, ``max_steps``, gradient
            accumulation and devices accounted for).
        schedule: explicit optimizer steps to record instead (0 records the untrained model).
        prototypes: fit the prototypes at the end (True), skip them (False), or a dict of options
            for :func:`i2x.fit_prototypes` (``{"n_prototypes": 64}``).
        save_weights: keep the final weights in the run (``weights.safetensors``), which
            ``i2x curate`` / ``i2x experiment`` need.
        **tracker_options: passed to :class:`i2x.Tracker` (``n_checkpoints``, ``batch_size``,
            ``recalibrate_bn``, ``method``, ...).

    The module's ``forward`` must return the logits: the probe is explained through it.
    After ``fit``, ``callback.tracker`` is the Tracker and ``callback.store`` the run's
    :class:`i2x.RunStore` (None off rank 0, and in the launching process of ``ddp_spawn``).
    """

    def __init__(self, layer, probe, run_dir: str | Path, *, planned_steps: int | None = None,
                 schedule: Iterable[int] | None = None, prototypes: bool | Mapping = True,
                 save_weights: bool = True, **tracker_options):
        super().__init__()
        if not isinstance(prototypes, (bool, Mapping)):
            raise TypeError(f"prototypes: expected True, False or a dict of options, got {type(prototypes).__name__}")
        if planned_steps is not None and schedule is not None:
            raise ValueError("give planned_steps (for the log-spaced schedule) or schedule, not both")
        self.layer = layer
        self.probe = probe
        self.run_dir = Path(run_dir)
        self.planned_steps = planned_steps
        self.schedule = None if schedule is None else list(schedule)
        self.prototypes = prototypes
        self.save_weights = bool(save_weights)
        self.tracker_options = tracker_options
        self.tracker: Tracker | None = None
        self.store = None
        self._last_step: int | None = None

    # -- Lightning hooks (every rank runs them, in the same order: the Tracker's collectives
    #    need all ranks) --------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Built here, not in __init__: the module is on its device and the process group exists.
        _check_forward(pl_module)
        steps: dict[str, Any]
        if self.schedule is not None:
            steps = {"schedule": self.schedule}
        else:
            planned = _estimated_steps(trainer) if self.planned_steps is None else self.planned_steps
            steps = {"planned_steps": planned}
        self.tracker = Tracker(pl_module, self.layer, self.probe, self.run_dir, **steps, **self.tracker_options)
        self.store = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step is restored from a checkpoint only after on_fit_start. Recording here covers
        # step 0 (an explicit schedule with 0: the untrained model); a resumed run has its step already.
        self._last_step = trainer.global_step
        self._step(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps so far, this batch's included
        if step == self._last_step:
            return  # accumulating gradients (or a skipped step): the model has not changed
        self._last_step = step
        self._step(pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.tracker is not None  # built in on_fit_start, which Lightning calls first
        with _training_rng_kept(pl_module):
            self.store = self.tracker.finish(trainer.global_step, prototypes=self.prototypes,
                                             save_weights=self.save_weights)

    # ------------------------------------------------------------------------------------

    def _step(self, pl_module, step: int) -> None:
        # Only a recording forks the random state; the other steps just tell the Tracker the step.
        assert self.tracker is not None  # built in on_fit_start, which Lightning calls first
        kept = _training_rng_kept(pl_module) if self.tracker.is_scheduled(step) else contextlib.nullcontext()
        with kept:
            self.tracker.step(step)


def _estimated_steps(trainer) -> int:
    steps = trainer.estimated_stepping_batches
    if steps is None or math.isinf(steps):
        raise ValueError("TrackerCallback: trainer.estimated_stepping_batches is infinite (no max_epochs, "
                         "max_steps or finite data); give planned_steps= or schedule=")
    return int(steps)


def _check_forward(pl_module) -> None:
    if type(pl_module).forward is pl.LightningModule.forward:
        raise TypeError(f"TrackerCallback: {type(pl_module).__name__} defines no forward(); the probe is explained "
                        "through the LightningModule's forward, which must return the logits")


@contextlib.contextmanager
def _training_rng_kept(pl_module):
    """The global random state as training left it, whatever the explained forward draws.

    The Tracker draws no random numbers itself, but a model may (a noise layer active in eval
    mode); the training's dropout masks and data order must not depend on whether it is tracked.
    """
    device = pl_module.device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield
