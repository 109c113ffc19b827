"""PyTorch Lightning: record stages 1 and 2 of I2X from a ``Trainer`` (``pip install i2x[lightning]``).

::

    from i2x.integrations.lightning import TrackerCallback

    trainer = lightning.Trainer(max_epochs=4, callbacks=[TrackerCallback("model.layer3", probe, "runs/x")])
    trainer.fit(module, loader)             # records at the log-spaced schedule, then the final model
                                            # and its prototypes

The :class:`i2x.Tracker` is built when fitting starts, on the ``LightningModule`` itself (the layer
name relative to it) or, for a module that keeps its network as a submodule and defines no
``forward`` (``self.net = resnet18()``, ``training_step`` calling ``self.net(x)``), on that network:
``TrackerCallback("layer4", probe, run, module="net")`` or ``TrackerCallback("net.layer4", probe, run)``.
It it records after optimizer steps, numbered by ``trainer.global_step``,
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

from torch import nn

from i2x.track import Tracker

__all__ = ["TrackerCallback"]


class TrackerCallback(pl.Callback):
    """Track a Lightning training run with :class:`i2x.Tracker` (stages 1 and 2 of I2X).

    Args:
        layer: the target layer: a dotted name relative to the ``LightningModule`` (``"model.layer3"``
            when it holds the network as ``self.model``), relative to ``module`` when that is given,
            or the layer module itself.
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

        module: the submodule the probe is explained through (``"net"`` for ``self.net``), for a
            ``LightningModule`` whose ``forward`` is not the network's. Default: the
            ``LightningModule`` when it defines ``forward`` (which must return the logits), else the
            submodule named by the first part of a dotted ``layer``.
    After ``fit``, ``callback.tracker`` is the Tracker and ``callback.store`` the run's
    :class:`i2x.RunStore` (None off rank 0, and in the launching process of ``ddp_spawn``).
    """

    def __init__(self, layer, probe, run_dir: str | Path, *, planned_steps: int | None = None,
                 schedule: Iterable[int] | None = None, prototypes: bool | Mapping = True,
                 save_weights: bool = True, module: str | None = None, **tracker_options):
        super().__init__()
        if not isinstance(prototypes, (bool, Mapping)):
            raise TypeError(f"prototypes: expected True, False or a dict of options, got {type(prototypes).__name__}")
        if planned_steps is not None and schedule is not None:
            raise ValueError("give planned_steps (for the log-spaced schedule) or schedule, not both")
        if module is not None and (not isinstance(module, str) or not module):
            raise TypeError(f"module: expected the dotted name of a submodule ('net'), got {module!r}")
        self.layer = layer
        self.module = module
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
        network, layer = _explained(pl_module, self.module, self.layer)
        steps: dict[str, Any]
        if self.schedule is not None:
            steps = {"schedule": self.schedule}
        else:
            planned = _estimated_steps(trainer) if self.planned_steps is None else self.planned_steps
            steps = {"planned_steps": planned}
        self.tracker = Tracker(network, layer, self.probe, self.run_dir, **steps, **self.tracker_options)
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


def _explained(pl_module: pl.LightningModule, module: str | None, layer) -> tuple[nn.Module, Any]:
    """The network the probe is explained through, and the layer's name (or module) in it."""
    name = type(pl_module).__name__
    if module is not None:
        try:
            network = pl_module.get_submodule(module)
        except AttributeError:
            children = ", ".join(repr(n) for n, _ in pl_module.named_children()) or "none"
            raise ValueError(f"TrackerCallback: module={module!r} is not a submodule of {name} "
                             f"(its submodules: {children})") from None
        if isinstance(layer, str) and layer.startswith(module + "."):
            layer = layer[len(module) + 1:]  # "net.layer4" with module="net" means the same layer
        return network, layer
    if type(pl_module).forward is not pl.LightningModule.forward:
        return pl_module, layer
    # No forward of its own: the network is the submodule the layer lives in.
    for child_name, child in pl_module.named_children():
        if isinstance(layer, str) and layer.startswith(child_name + "."):
            return child, layer[len(child_name) + 1:]
        if isinstance(layer, nn.Module) and any(m is layer for m in child.modules()):
            return child, layer
    raise TypeError(f"TrackerCallback: {name} defines no forward(), so the probe cannot be explained through it; "
                    "name the network it calls: module='net' (with layer='layer4'), or a dotted layer='net.layer4'")


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
