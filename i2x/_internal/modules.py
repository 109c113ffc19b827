"""Model plumbing every stage needs: the user's model behind its wrappers, a layer from its name,
the device a model runs on, a forward whose shape errors say what was wrong, and eval mode that
leaves every submodule's own mode as it was."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator

import torch
from torch import nn

from i2x._internal.checks import describe

__all__ = ["uncompiled", "unwrap_model", "resolve_layer", "find_last_spatial_layer", "model_device", "run_device",
           "check_input_device", "checked_forward", "eval_mode", "choose_layer", "layer_output_shape"]


def uncompiled(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (the same parameters), else ``model``."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DataParallel / DistributedDataParallel and ``torch.compile``."""
    model = uncompiled(model)
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and isinstance(inner, nn.Module):
        return uncompiled(inner)
    return model


def resolve_layer(model: nn.Module, spec) -> tuple[str, nn.Module]:
    named = dict(model.named_modules())
    if isinstance(spec, nn.Module):
        for name, module in named.items():
            if module is spec:
                return name, module
        raise ValueError(f"layer: the module {type(spec).__name__} given is not a submodule of the model")
    if not isinstance(spec, str):
        raise TypeError(f"layer must be a module, a dotted name, a list of these, or None; got {type(spec).__name__}")
    if spec in named and spec != "":
        return spec, named[spec]
    inner = unwrap_model(model)
    if inner is not model:  # "layer4" on a DataParallel-wrapped model means "module.layer4"
        wrapped = f"module.{spec}"
        if wrapped in named:
            return wrapped, named[wrapped]
    candidates = difflib.get_close_matches(spec, [n for n in named if n], n=5, cutoff=0.5)
    hint = f"; close candidates: {', '.join(repr(c) for c in candidates)}" if candidates else ""
    raise ValueError(f"layer {spec!r} is not a submodule of {type(model).__name__}{hint}")


def find_last_spatial_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module (in the order modules finish) whose output is a 4-D tensor with a
    grid larger than 1 x 1, found by a forward without a graph."""
    finished: list[str] = []
    handles = []

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                finished.append(name)

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(record(name)))
    # The dry forward must leave no trace: buffers (BatchNorm running statistics in train mode) are
    # put back and the random state (dropout) is forked.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda_devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
            model(x)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    if not finished:
        raise ValueError(
            "layer=None: no submodule of the model returns a 4-D [B, C, h, w] output with h * w > 1; "
            "name the layer and, for token outputs, pass reshape= (e.g. i2x.vit_reshape)"
        )
    return finished[-1]


def model_device(model: nn.Module) -> torch.device:
    """Where a model lives: its first parameter's (or buffer's) device, else the CPU."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    # "cuda" names the current CUDA device: it matches "cuda:0" there
    return (a.index if a.index is not None else torch.cuda.current_device()) == (
        b.index if b.index is not None else torch.cuda.current_device())


def run_device(model: nn.Module, device=None) -> torch.device:
    """The device an entry point runs ``model`` on (``device``, or the model's own), after the
    checks that would otherwise surface as a torch error halfway through: a model spread over
    several devices, a model on ``meta`` (shapes, no values), a ``device`` the model is not on."""
    found = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len({(d.type, d.index) for d in found}) > 1:
        raise ValueError("model: its parameters and buffers are on several devices "
                         f"({', '.join(sorted(map(str, found)))}); "
                         "i2x runs a model on one device: move it there with model.to(...)")
    own = model_device(model)
    if own.type == "meta":
        raise ValueError("model: its parameters are on the meta device (shapes only, no values); materialise it first "
                         "(model.to_empty(device='cpu') and load its weights)")
    if device is None:
        return own
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if not _same_device(wanted, own):
        raise ValueError(f"device={str(wanted)!r} but the model is on {own}: move the model "
                         f"(model.to({str(wanted)!r})) or leave device= out to run where it is")
    return wanted


def check_input_device(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """A clear error, before any work, when the model's parameters and the input live apart."""
    device = model_device(model)
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model is on {device}: move one of them "
                         f"(model.to({str(x.device)!r}) or {name}.to({str(device)!r}))")


def checked_forward(model: nn.Module, x: torch.Tensor, name: str = "x"):
    """``model(x)``; a forward that fails on the input's shape (wrong channels or image size) is
    reported as a ValueError naming the input's shape, with torch's own message."""
    try:
        return model(x)
    except RuntimeError as e:
        text = str(e)
        if any(word in text for word in ("channels", "size", "shape", "dimension", "mat1 and mat2")):
            raise ValueError(f"{name}: the model cannot take a {describe(x)} ({' '.join(text.split())}); "
                             "give images of the size and channels it was built for") from e
        raise


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every submodule's own ``training`` flag back, also on
    error (``model.train(was_training)`` would flip submodules the user froze in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def choose_layer(model: nn.Module, layer, x: torch.Tensor) -> tuple[str, str]:
    """The explained layer's name and why it was chosen: ``layer`` when given, ResNet's
    ``layer4``, else the last module whose output is 4-D and larger than 1 x 1 on ``x``."""
    if layer is not None:
        return resolve_layer(model, layer)[0], "given"
    if isinstance(getattr(model, "layer4", None), nn.Module):
        return "layer4", "ResNet's last stage (layer4)"
    try:
        found = find_last_spatial_layer(model, x)
    except (ValueError, RuntimeError) as e:  # no grid left at this size, or a forward that cannot run
        raise ValueError(f"size: at {x.shape[-1]} px no layer of the model can be explained "
                         f"({' '.join(str(e).split())[:300]}); pass a larger size or name the layer") from None
    return found, "the last module with a 4-D output larger than 1x1 (dry run)"


def layer_output_shape(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``layer``'s output in one eval forward of ``x`` without a graph (``()`` when
    the layer returns no tensor); the model's modes are left as they were."""
    seen: dict[str, tuple[int, ...]] = {}

    def hook(_module, _inputs, output):
        seen["shape"] = tuple(output.shape) if isinstance(output, torch.Tensor) else ()

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen.get("shape", ())
