"""Every other way to get a model: a torchvision classification model by name, a user's
``module:factory``, a deep copy of a module, or an architecture sized to fit a weights file."""

from __future__ import annotations

import copy
import difflib
import importlib

import torch
from torch import nn

from i2x._internal.checks import check_int, describe
from i2x.models.architectures import build_model

__all__ = ["load_model", "build_arch", "first_conv_channels", "input_channels"]


def load_model(model, num_classes: int | None = None) -> tuple[nn.Module, str]:
    """``model`` as a fresh module and where it came from: a torchvision name
    (``torchvision.models.get_model(name, weights=None)``), ``"module:factory"`` (``factory()``
    must return an ``nn.Module``) or a module (deep-copied, so the caller's is never changed)."""
    if isinstance(model, nn.Module):
        if num_classes is not None:
            raise ValueError("num_classes: only for a torchvision model name; a module has its own head")
        return copy.deepcopy(model), "module"
    if not isinstance(model, str) or not model.strip():
        raise TypeError("model: expected a torchvision model name, 'module:factory' or an nn.Module, "
                        f"got {describe(model)}")
    if ":" in model:
        if num_classes is not None:
            raise ValueError("num_classes: only for a torchvision model name; 'module:factory' builds its own head")
        return _from_factory(model), "factory"
    return _from_torchvision(model, num_classes), "torchvision"


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"model: expected 'module:factory' (e.g. 'mypkg.nets:build'), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({e})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"model {spec!r}: {attr!r} is not callable ({describe(factory)})")
    built = factory()
    if not isinstance(built, nn.Module):
        raise TypeError(f"model {spec!r}: {attr}() returned {describe(built)}, not a torch.nn.Module")
    return built


def _from_torchvision(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # the classification models
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(
            f"model: {name!r} is not a torchvision classification model{hint}; "
            "`python -c \"import torchvision; print(torchvision.models.list_models(module=torchvision.models))\"` "
            "lists them, or pass 'module:factory' for your own")
    config = {} if num_classes is None else {"num_classes": check_int(num_classes, "num_classes")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random weights every run
        return torchvision.models.get_model(name, weights=None, **config)


def _small_resnet_from_state(state: dict) -> nn.Module:
    """A SmallResNet shaped like the weights: channels from the stem, widths from each stage's
    first conv, blocks per stage from the block indices, classes from the head."""
    if "stem.0.weight" not in state or "fc.weight" not in state:
        raise ValueError("--arch small-resnet: the weights hold no stem.0.weight / fc.weight, so they are not a "
                         f"small-resnet's (keys: {', '.join(sorted(state)[:4])}, ...)")
    widths = tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)
                   if f"layer{i}.0.conv1.weight" in state)
    blocks = len({k.split(".")[1] for k in state if k.startswith("layer1.")})
    model, _ = build_model("small-resnet", int(state["fc.weight"].shape[0]),
                           in_channels=int(state["stem.0.weight"].shape[1]), widths=widths, blocks_per_stage=blocks)
    return model


def _torchvision_from_state(name: str, state: dict) -> nn.Module:
    """torchvision's ``name`` with its head sized like the weights' last linear layer."""
    model, _ = load_model(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = f"{linears[-1]}.weight" if linears else None
    if head in state and state[head].shape[0] != model.get_submodule(linears[-1]).out_features:
        model, _ = load_model(name, num_classes=int(state[head].shape[0]))
    return model


def build_arch(arch: str, state: dict) -> tuple[nn.Module, str]:
    """The architecture ``arch`` for these weights and its kind (small-resnet, torchvision, factory)."""
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"--arch: expected a torchvision name, module:factory or small-resnet, got {arch!r}")
    if arch == "small-resnet":
        return _small_resnet_from_state(state), "small-resnet"
    if ":" in arch:
        return load_model(arch)[0], "factory"
    try:
        return _torchvision_from_state(arch, state), "torchvision"
    except ValueError as e:
        raise ValueError(f"--arch: {e} (or 'small-resnet')") from None




def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution, or None when it has none."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def input_channels(model: nn.Module) -> int:
    """The channels the model takes: its first convolution's (3, as for RGB, when it has none)."""
    found = first_conv_channels(model)
    return 3 if found is None else found
