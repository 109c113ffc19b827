"""Post hoc tracking (a folder of saved checkpoints recorded into a run, oldest first), and the
run's final model rebuilt with its weights."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from i2x._internal.modules import layer_output_shape, run_device, unwrap_model
from i2x._internal.weights import load_state_into, load_weights
from i2x.models import rebuild_model
from i2x.store import RunStore
from i2x.track.tracker import Tracker

__all__ = ["CHECKPOINT_SUFFIXES", "find_checkpoints", "load_weights", "track_checkpoints", "final_model",
           "check_run_grid"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")

_NUMBER = re.compile(r"(\d+)")


def find_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, file)`` for every weights file in ``folder``, ascending by step.

    The step is the last number in the file name (``epoch3-step1200.pt`` -> 1200). A file without a
    number, or two files with one step, are errors: the order of checkpoints is the explanation.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist or is not a folder")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
            continue
        numbers = _NUMBER.findall(path.stem)
        if not numbers:
            raise ValueError(f"checkpoint {path.name}: its name has no step number (name files like step-1200.pt)")
        step = int(numbers[-1])
        if step in found:
            raise ValueError(f"checkpoints {found[step].name} and {path.name} both claim step {step}")
        found[step] = path
    if not found:
        raise FileNotFoundError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in {folder}")
    return sorted(found.items())


def track_checkpoints(
    model: nn.Module,
    layer,
    probe,
    checkpoints: str | Path | Sequence[tuple[int, str | Path]],
    run_dir: str | Path,
    prototypes: bool | Mapping = True,
    **tracker_options,
) -> RunStore | None:
    """Post hoc tracking: record every saved checkpoint (ascending step) into ``run_dir``.

    ``checkpoints`` is a folder (see :func:`find_checkpoints`) or explicit ``(step, file)`` pairs.
    The last one is the final model; prototypes are discovered from it unless
    ``prototypes=False``. Steps already finished in ``run_dir`` are skipped, so an interrupted
    call resumes where it stopped. ``model`` gets its original weights back at the end. Returns
    the :class:`RunStore` (None off rank 0, as :meth:`Tracker.finish`).
    """
    pairs = find_checkpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else [
        (int(s), Path(p)) for s, p in checkpoints
    ]
    if not pairs:
        raise ValueError("checkpoints: expected at least one (step, file)")
    pairs = sorted(pairs)
    steps = [s for s, _ in pairs]
    if len(set(steps)) != len(steps):
        raise ValueError(f"checkpoints: duplicate steps in {steps}")
    module = unwrap_model(model)
    run_device(module, tracker_options.get("device"))  # before any checkpoint is loaded into it
    tracker = Tracker(module, layer, probe, run_dir, schedule=steps, **tracker_options)
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    final_step = steps[-1]
    try:
        for step, path in pairs:
            needs_prototypes = step == final_step and prototypes is not False and (
                tracker.store is None or not tracker.store.has("prototypes"))
            if step in tracker.finished and not needs_prototypes:
                continue
            load_state_into(module, load_weights(path), path)
            if step not in tracker.finished:
                tracker.record(step, final=step == final_step)
            if needs_prototypes:
                tracker.fit_prototypes(**(dict(prototypes) if isinstance(prototypes, Mapping) else {}))
    finally:
        module.load_state_dict(original)
        if tracker.store is not None:
            tracker.store.release()
    return tracker.store


# ----------------------------------------------------------------------------------------------
# The run's final model


def final_model(store: RunStore, weights: str | Path | None = None) -> nn.Module:
    """The run's final model on the CPU: rebuilt from the manifest's build spec (recorded when
    :func:`i2x.build_model` made it), with ``weights`` (a file) or the run's own final weights
    (``weights.safetensors``) loaded strictly."""
    spec = store.manifest["model"].get("build")
    if not isinstance(spec, dict):
        raise ValueError(
            f"run {store.path}: the model cannot be rebuilt, i2x did not build it (the manifest has no "
            "model 'build' spec; i2x.build_model records one). Use the Python API instead: i2x.find_targets "
            "and i2x.experiment take your model; i2x explain takes a weights file as --model FILE with --arch")
    model, _ = rebuild_model(spec)
    if weights is not None:
        state, source = load_weights(weights), Path(weights)
    else:
        try:
            state = store.read_weights()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"run {store.path} keeps no final weights (weights.safetensors): pass the final checkpoint "
                "(--weights FILE), or finish the Tracker with save_weights=True") from None
        source = store.path / "weights.safetensors"
    load_state_into(model, state, source, f"the run's {spec['name']}")
    return model


def check_run_grid(store: RunStore, model: nn.Module, layer: str, x: torch.Tensor, hint: str) -> None:
    """``layer`` of ``model`` on the images ``x`` must give the run's grid: at another image size
    the prototypes and records would describe positions of another resolution."""
    if store.grid is None:
        return
    shape = layer_output_shape(model, layer, x)
    if len(shape) == 4 and tuple(shape[-2:]) != tuple(store.grid):
        size = "x".join(str(v) for v in x.shape[-2:])
        raise ValueError(f"{size} px images give a {shape[-2]}x{shape[-1]} grid at {layer} but the run's grid is "
                         f"{store.grid[0]}x{store.grid[1]}: {hint}")
