"""Weights from files into models: safetensors or torch files read without unpickling, training
checkpoints unwrapped, DDP/DataParallel prefixes dropped, and a mismatch reported in one line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_weights", "load_state_into"]

# Where training checkpoints nest the model's state dict (Lightning, most scripts).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# How many mismatching weight names an error shows.
_LIST_KEYS = 4


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file read with ``weights_only=True``
    (nothing is unpickled); training checkpoints nesting it under ``state_dict``/``model``/...
    are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state: object
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or one that needs unpickling of arbitrary objects
        raise ValueError(f"checkpoint {path}: cannot be read as weights ({type(e).__name__}: {e})") from None
    for _ in range(3):
        if isinstance(state, Mapping) and not _is_state_dict(state):
            nested = next((state[k] for k in _NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if nested is None:
                break
            state = nested
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise ValueError(f"checkpoint {path}: holds no state dict (a mapping of names to tensors)")
    return dict(state)


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], source, what: str = "the model") -> None:
    """Load ``state`` into ``model`` strictly (a state dict saved from a DDP/DataParallel wrapper
    too), or a ValueError naming ``source`` and a few missing, unexpected and misshapen keys
    (load_state_dict's own report lists every key over many lines)."""
    own = model.state_dict()
    if not any(k in own for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    kinds = (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs model)", shapes))
    problems = [f"{len(keys)} {label} ({_few(keys)})" for label, keys in kinds if keys]
    if problems:
        raise ValueError(f"weights {source} do not fit {what}: keys " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:_LIST_KEYS]) + (f", ... {len(keys) - _LIST_KEYS} more" if len(keys) > _LIST_KEYS else "")
