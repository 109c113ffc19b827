"""GradCAM-family saliency for any torch model, cheap enough to leave on in a training loop.

``Explainer.explain`` runs the model once. The part of the forward *before* the target layer runs
without an autograd graph; at the layer a forward hook detaches the output into a leaf that
requires grad and switches grad mode on, so only the layers *after* it record a graph. The
gradient of the target scores is then taken with ``torch.autograd.grad`` down to that leaf only:
no parameter's ``.grad`` is touched, and the cost is a forward plus a backward through the head.
The channel weighting and the resize run in the compiled ops (``i2x.ops``).

``Explainer.capture`` + ``Explainer.explain_from`` serve a training loop that already runs the
forward with a graph: the activations are recorded inside that graph, the gradient is taken down
to them with the graph kept, and the loop's own ``loss.backward()`` proceeds unchanged.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from i2x import ops
from i2x._internal.modules import (
    check_input_device,
    checked_forward,
    find_last_spatial_layer,
    resolve_layer,
    uncompiled,
)
from i2x._internal.profiling import profiled
from i2x._internal.tensors import as_grid, at_least_float32
from i2x.reference import CAM_METHODS

__all__ = ["Explainer", "Captured", "vit_reshape", "swin_reshape"]

Targets = None | int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
Size = None | str | tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Token-to-grid helpers for transformer layers (pass as ``reshape=``)


def vit_reshape(tokens: torch.Tensor) -> torch.Tensor:
    """torchvision ViT encoder tokens ``[B, 1 + N, C]`` -> ``[B, C, s, s]``: the class token is
    dropped and the N = s * s patch tokens are laid on their square grid."""
    if tokens.dim() != 3:
        raise ValueError(f"vit_reshape: expected tokens [B, 1 + N, C], got shape {tuple(tokens.shape)}")
    patches = tokens[:, 1:, :]
    n = patches.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"vit_reshape: {n} patch tokens (after dropping the class token) do not form a square grid")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def swin_reshape(features: torch.Tensor) -> torch.Tensor:
    """torchvision Swin stage output ``[B, H, W, C]`` (channels last) -> ``[B, C, H, W]``."""
    if features.dim() != 4:
        raise ValueError(f"swin_reshape: expected [B, H, W, C], got shape {tuple(features.shape)}")
    return features.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Layer lookup


# ----------------------------------------------------------------------------------------------
# Capture


@dataclass
class Captured:
    """What ``Explainer.capture`` recorded during one forward.

    ``activations`` holds one tensor per explained layer (layer order), each part of the forward's
    autograd graph; ``Captured.activation`` is the single one when there is one layer.
    """

    layer_names: list[str]
    activations: list[torch.Tensor] = field(default_factory=list)

    @property
    def activation(self) -> torch.Tensor:
        if len(self.activations) != 1:
            raise ValueError(f"{len(self.activations)} activations were captured; use .activations")
        return self.activations[0]


class _Hooks:
    """Forward hooks on the target layers for the duration of one forward.

    mode "explain": the first target layer to run hands a detached leaf (requiring grad) to the
    rest of the model and turns grad mode on, so only the layers after it build a graph.
    mode "capture": outputs are recorded where they sit in the caller's graph.
    Either way the model receives a clone of the output, so an in-place op that follows the layer
    (ReLU(inplace=True)) cannot change the recorded activation.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], mode: str):
        self.layers = layers
        self.mode = mode
        self.records: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(len(layers))}
        self.grad_started: set[int] = set()  # devices whose replica already made its leaf
        self._handles: list[RemovableHandle] = []
        self._grad_mode_before = torch.is_grad_enabled()

    def __enter__(self):
        for index, (_, module) in enumerate(self.layers):
            self._handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        torch.set_grad_enabled(self._grad_mode_before)
        return False

    def _hook(self, index: int):
        name = self.layers[index][0]

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "pick a layer whose output is a tensor"
                )
            if not output.is_floating_point():
                raise ValueError(f"layer {name!r} returns a {output.dtype} tensor; a floating-point output is needed")
            device_index = output.device.index if output.device.index is not None else -1
            if self.mode == "explain" and device_index not in self.grad_started:
                recorded = output.detach().requires_grad_(True)
                self.grad_started.add(device_index)
                # Grad mode is thread-local: this turns it on for the rest of this forward (of this
                # DataParallel replica), which then records a graph starting at the leaf.
                torch.set_grad_enabled(True)
            else:
                recorded = output
            self.records[index].append((device_index, recorded))
            return recorded.clone()

        return hook

    def activations(self) -> list[torch.Tensor]:
        """One tensor per layer; DataParallel replicas are joined in device (= batch) order."""
        out = []
        for index, (name, _) in enumerate(self.layers):
            found = self.records[index]
            if not found:
                raise ValueError(f"layer {name!r} did not run during the forward")
            devices = [d for d, _ in found]
            if len(set(devices)) != len(devices):
                raise ValueError(
                    f"layer {name!r} ran {len(found)} times in one forward; pick a layer that runs once per forward"
                )
            found = sorted(found, key=lambda item: item[0])
            out.append(found[0][1] if len(found) == 1 else torch.cat([t for _, t in found]))
        return out


# ----------------------------------------------------------------------------------------------
# The explainer


class Explainer:
    """GradCAM-family saliency maps of a model at one or several layers.

    Args:
        model: any ``nn.Module`` (DataParallel / DDP-wrapped too); it is never modified: its mode,
            ``requires_grad`` flags and ``.grad`` are left as they are.
        layer: a submodule, its dotted name (``"layer4"``, ``"features.28"``), a list of these
            (the maps are averaged), or None: the last layer with a 4-D output larger than 1 x 1,
            found by a forward without a graph on the first call.
        method: ``gradcam``, ``gradcam++``, ``xgradcam``, ``layercam`` or ``hirescam``.
        reshape: callable turning a layer's output into ``[B, C, h, w]`` (token outputs of
            transformers: ``vit_reshape``, ``swin_reshape``).
    """

    def __init__(self, model: nn.Module, layer=None, method: str = "gradcam", reshape: Callable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method not in CAM_METHODS:
            raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}; got {method!r}")
        if reshape is not None and not callable(reshape):
            raise TypeError(f"reshape must be callable or None, got {type(reshape).__name__}")
        # A compiled model is explained through its eager module: the same parameters, exact
        # gradients at the layer, and no recompilation for the explainer's hooks.
        self.model = uncompiled(model)
        self._compiled = self.model is not model
        self.method = method
        self.reshape = reshape
        self._layers: list[tuple[str, nn.Module]] | None = None
        if layer is not None:
            specs = list(layer) if isinstance(layer, (list, tuple)) else [layer]
            if not specs:
                raise ValueError("layer: an empty list; give at least one layer or None")
            # "_orig_mod.layer4" (a name taken from the compiled model) is "layer4" of the eager one
            specs = [s[len("_orig_mod."):] if self.model is not model and isinstance(s, str)
                     and s.startswith("_orig_mod.") else s for s in specs]
            self._layers = [resolve_layer(self.model, s) for s in specs]

    @property
    def layer_names(self) -> list[str] | None:
        """Names of the explained layers (None until found when ``layer=None``)."""
        return None if self._layers is None else [name for name, _ in self._layers]

    def _ensure_layers(self, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
        if self._layers is None:
            self._layers = [resolve_layer(self.model, find_last_spatial_layer(self.model, x))]
        return self._layers

    # -- the two entry points -----------------------------------------------------------------

    @profiled("i2x::explain")
    def explain(
        self,
        x: torch.Tensor,
        targets: Targets = None,
        size: Size = "input",
        normalize: bool = True,
        return_logits: bool = False,
    ):
        """Saliency maps of ``x`` ``[B, ...]`` for ``targets``.

        Args:
            targets: None (the predicted class), an int (one class for all), a ``[B]`` tensor or
                list of class indices, or a callable ``logits -> [B]`` scores.
            size: ``"input"`` (x's last two dims), ``None`` (the layer's raw ``h x w`` grid) or
                ``(H, W)``.
            normalize: min-max each map to [0, 1]; False keeps the raw (ReLU'd) values.
            return_logits: also return the model's output, so callers need no second forward.

        Returns:
            ``[B, H, W]`` maps on x's device (and the detached logits with ``return_logits``).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Explainer.explain cannot run under torch.inference_mode(): gradients are needed. "
                "Use torch.no_grad() instead, or call it outside the inference_mode block."
            )
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            return self._empty_result(x, size, return_logits)
        check_input_device(self.model, x)
        layers = self._ensure_layers(x)
        with _Hooks(layers, "explain") as hooks, torch.no_grad():
            logits = checked_forward(self.model, x)
        activations = hooks.activations()
        maps = self._maps(activations, logits, targets, tuple(x.shape[-2:]), size, normalize, retain_graph=False)
        return (maps, _detach_output(logits)) if return_logits else maps

    @contextlib.contextmanager
    def capture(self) -> Iterator[Captured]:
        """Record the layers' activations inside the caller's forward (graph kept)::

            with explainer.capture() as captured:
                logits = model(x)
            maps = explainer.explain_from(captured.activations, logits, y)
            loss.backward()   # same parameter gradients as without i2x
        """
        if self._layers is None:
            raise ValueError("capture() needs the layer named: construct the Explainer with layer=...")
        captured = Captured([name for name, _ in self._layers])
        with _Hooks(self._layers, "capture") as hooks:
            yield captured
        captured.activations = hooks.activations()

    @profiled("i2x::explain_from")
    def explain_from(
        self,
        activations: torch.Tensor | Sequence[torch.Tensor] | Captured,
        logits: torch.Tensor,
        targets: Targets = None,
        size: Size = None,
        normalize: bool = False,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Maps from a forward the caller already ran under ``capture()``.

        The gradient of the target scores is taken down to the activations only, with the graph
        kept, so the caller's ``loss.backward()`` afterwards gives exactly the parameter gradients
        it would give without i2x. Defaults return the raw grid (what tracking stores);
        ``size="input"`` needs ``image_size``.
        """
        if isinstance(activations, Captured):
            acts = list(activations.activations)
        elif isinstance(activations, torch.Tensor):
            acts = [activations]
        else:
            acts = list(activations)
        if not acts or not all(isinstance(a, torch.Tensor) for a in acts):
            raise TypeError("activations must be the tensor(s) recorded by capture() (or the Captured object)")
        if self._layers is None:
            raise ValueError("explain_from needs the layers: construct the Explainer with layer=...")
        if len(acts) != len(self._layers):
            raise ValueError(
                f"{len(acts)} activation tensor(s) for {len(self._layers)} layer(s) {self.layer_names}; "
                "pass the Captured object from this explainer's capture()"
            )
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if any(not a.requires_grad for a in acts):
            raise ValueError(
                "activations are not part of an autograd graph: run the forward with grad enabled inside "
                "explainer.capture()"
            )
        if size == "input" and image_size is None:
            raise ValueError("explain_from: size='input' needs image_size=(H, W)")
        image_hw = _check_size(image_size) if image_size is not None else None
        if acts[0].shape[0] == 0:
            grid = self._to_grid(acts[0].detach(), self._layers[0][0])
            out_size = _output_size(size, image_hw, grid)
            return torch.zeros(0, *out_size, device=grid.device, dtype=at_least_float32(grid).dtype)
        return self._maps(acts, logits, targets, image_hw, size, normalize, retain_graph=True)

    __call__ = explain

    # -- shared machinery ---------------------------------------------------------------------

    def _maps(self, activations, logits, targets, image_hw, size, normalize, retain_graph):
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            bad = int((~torch.isfinite(logits.detach())).flatten(1).any(1).sum()) if logits.dim() > 1 else 0
            if bad:
                raise ValueError(f"the model's output (logits) holds NaN or inf for {bad} of the {logits.shape[0]} "
                                 "images: nothing to explain; check the model and its input")
        with torch.enable_grad():  # the caller may be under no_grad; the scores need a graph
            total = _target_scores(logits, targets).sum()
        if not total.requires_grad:
            raise RuntimeError(
                "the target scores do not depend on the explained layer(s) through an autograd graph "
                f"(layers {self.layer_names}); is the layer used by the model's output?"
            )
        grads = torch.autograd.grad(total, activations, retain_graph=retain_graph, allow_unused=True)
        cams = []
        for (name, _), act, grad in zip(self._layers, activations, grads, strict=True):
            if grad is None:
                if self._compiled:
                    raise RuntimeError(
                        f"no gradient reaches layer {name!r} from these logits: a torch.compile'd forward keeps no "
                        "layer output in its autograd graph, so capture() cannot see inside it. Run the eager "
                        "model (compiled._orig_mod) under capture(), or use explainer.explain(x), which does")
                raise RuntimeError(f"layer {name!r} does not influence the target scores; no gradient reaches it")
            # Half-precision layers (autocast) are weighted in float32: a bf16 map in [0, 1] would
            # keep only 8 bits.
            act_grid = self._to_grid(at_least_float32(act.detach()), name)
            grad_grid = self._to_grid(at_least_float32(grad), name)
            _check_finite(act_grid, f"activations of layer {name!r}")
            _check_finite(grad_grid, f"gradients at layer {name!r}")
            cams.append(ops.cam(act_grid, grad_grid, self.method, relu=True))
        out_size = _output_size(size, image_hw, cams[0])
        if len(cams) == 1:
            if size is None and not normalize:
                return cams[0]
            return ops.upsample_normalize(cams[0], out_size, normalize)
        # Several layers: the mean of the maps resized to one size (normalised first when asked,
        # so no layer dominates by scale), normalised again.
        stacked = torch.stack([ops.upsample_normalize(c, out_size, normalize) for c in cams]).mean(dim=0)
        return ops.upsample_normalize(stacked, out_size, True) if normalize else stacked

    def _to_grid(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return as_grid(t, name, self.reshape)

    def _empty_result(self, x, size, return_logits):
        if size is None or size == "input":
            if x.dim() < 2:
                raise ValueError(f"x of shape {tuple(x.shape)} is empty and has no spatial size")
            out_size = tuple(x.shape[-2:]) if size == "input" else (0, 0)
        else:
            out_size = _check_size(size)
        maps = torch.zeros(0, *out_size, device=x.device)
        if not return_logits:
            return maps
        with torch.no_grad():
            logits = self.model(x)
        return maps, _detach_output(logits)


def _detach_output(logits):
    return logits.detach() if isinstance(logits, torch.Tensor) else logits


def _check_size(size) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"size must be 'input', None or two positive ints (H, W); got {size!r}")
    return int(size[0]), int(size[1])


def _output_size(size, image_hw, cam):
    if size is None:
        return tuple(cam.shape[-2:])
    if isinstance(size, str):
        if size != "input":
            raise ValueError(f"size must be 'input', None or two positive ints (H, W); got {size!r}")
        return image_hw
    return _check_size(size)


def _target_scores(logits, targets) -> torch.Tensor:
    if callable(targets) and not isinstance(targets, torch.Tensor):
        scores = targets(logits)
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
            raise ValueError("targets: a callable target must return a [B] tensor of scores")
        return scores
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model's output is {shape}, not [B, classes] logits; pass a callable target")
    batch, classes = logits.shape
    if targets is None:
        index = logits.detach().argmax(dim=1)
    elif isinstance(targets, bool) or (isinstance(targets, torch.Tensor) and targets.dtype == torch.bool):
        raise TypeError("targets: a bool is not a class index")
    elif _is_integer_scalar(targets):
        index = torch.full((batch,), operator.index(targets), dtype=torch.long, device=logits.device)
    else:
        index = torch.as_tensor(targets, device=logits.device)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() != 1:
            raise ValueError(f"targets must be an int, a [B] sequence of class indices or a callable; got {targets!r}")
        if index.shape[0] != batch:
            raise ValueError(f"targets has {index.shape[0]} entries for a batch of {batch}")
        index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= classes):
        raise ValueError(
            f"targets must lie in [0, {classes}) (the model's {classes} classes); got values "
            f"from {int(index.min())} to {int(index.max())}"
        )
    return logits.gather(1, index[:, None])[:, 0]


def _is_integer_scalar(value) -> bool:
    """An int, a numpy integer or a 0-d integer tensor: one class for the whole batch."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.dtype.is_floating_point and not value.dtype.is_complex
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{what} contain {bad} NaN/inf value(s); the model's forward or loss is not finite")
