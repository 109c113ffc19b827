"""timm models (``timm.create_model``) with :class:`i2x.Explainer` and :class:`i2x.Tracker`.

Three helpers pick, per model family, what the explainer needs::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, num_classes=5)
    explainer = i2x.integrations.timm.explainer_for(model)          # layer + reshape chosen
    maps = explainer.explain(x, targets)

* :func:`default_layer`: the natural target layer. Vision Transformers (anything with
  ``num_prefix_tokens``, ``patch_embed`` and ``blocks``): the last block's ``norm1``, the layer
  pytorch-grad-cam recommends (the last block's output reaches the class token only through the
  final norm and pooling, so its patch tokens get no gradient under token pooling). Other
  families: the last entry of timm's ``feature_info`` (ResNet ``layer4``, ConvNeXt ``stages.3``,
  Swin ``layers.3``, ...), the last feature stage timm itself exposes.
* :func:`reshape_for` / :func:`vit_reshape`: the ``reshape=`` that turns the layer's output into a
  ``[B, C, h, w]`` grid: ViT tokens with their prefix (class and register tokens) dropped, laid on
  the patch grid; channels-last (``output_fmt == "NHWC"``, e.g. Swin) permuted; None for CNNs.
* :func:`explainer_for`: an :class:`i2x.Explainer` configured with both.

timm itself is never imported here: the helpers read the attributes timm models carry, so they
also work on a model object built elsewhere with the same layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from i2x._internal.modules import unwrap_model
from i2x.explain import Explainer, swin_reshape

__all__ = ["ViTTokenGrid", "vit_reshape", "reshape_for", "default_layer", "explainer_for"]


def _is_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (
        isinstance(getattr(model, "num_prefix_tokens", None), int)
        and hasattr(getattr(model, "patch_embed", None), "grid_size")
        and isinstance(blocks, (nn.Sequential, nn.ModuleList))
        and len(blocks) > 0
    )


def _describe(model) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


class ViTTokenGrid:
    """``reshape=`` for a timm ViT: block tokens ``[B, P + h * w, C]`` -> ``[B, C, h, w]``.

    The ``P = model.num_prefix_tokens`` leading tokens (class token, register tokens, distillation
    token) are dropped; the rest are the patch tokens in row-major order over the patch grid.
    With a fixed image size the grid is ``model.patch_embed.grid_size``. With
    ``dynamic_img_size=True`` the grid follows each input, so a forward hook on ``patch_embed``
    (whose output is then ``[B, h, w, C]``) records the grid of the latest forward; ``remove()``
    takes it off.
    """

    def __init__(self, model: nn.Module):
        inner: Any = unwrap_model(model)  # a timm ViT: attributes torch's nn.Module type does not know
        if not _is_vit(inner):
            raise TypeError(
                f"vit_reshape: {_describe(inner)} is not a timm Vision Transformer (it needs num_prefix_tokens, "
                "patch_embed.grid_size and blocks); CNNs need no reshape, channels-last models (Swin) use "
                "reshape_for(model)"
            )
        self.num_prefix_tokens = int(inner.num_prefix_tokens)
        grid_h, grid_w = inner.patch_embed.grid_size
        self.static_grid = (int(grid_h), int(grid_w))
        self.dynamic = bool(getattr(inner, "dynamic_img_size", False))
        self.last_grid: tuple[int, int] | None = None
        self._handle = inner.patch_embed.register_forward_hook(self._record_grid) if self.dynamic else None

    def _record_grid(self, module, inputs, output) -> None:
        # dynamic_img_size: patch_embed returns [B, h, w, C] (timm flattens it after the pos-embed)
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            self.last_grid = (int(output.shape[1]), int(output.shape[2]))

    def remove(self) -> None:
        """Take the dynamic-size hook off ``patch_embed`` (a no-op for a fixed image size)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def grid(self) -> tuple[int, int]:
        if not self.dynamic:
            return self.static_grid
        if self.last_grid is None:
            raise ValueError("vit_reshape: dynamic_img_size model, but no forward has run through patch_embed yet")
        return self.last_grid

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"vit_reshape: expected block tokens [B, N, C], got {shape}")
        h, w = self.grid()
        batch, n, channels = tokens.shape
        if n != self.num_prefix_tokens + h * w:
            raise ValueError(
                f"vit_reshape: {n} tokens, but {self.num_prefix_tokens} prefix + {h}x{w} patch tokens = "
                f"{self.num_prefix_tokens + h * w} expected; the input size must match the model's img_size "
                "(or create the model with dynamic_img_size=True)"
            )
        patches = tokens[:, self.num_prefix_tokens:, :]
        return patches.reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def vit_reshape(model: nn.Module) -> ViTTokenGrid:
    """The ``reshape=`` for a timm ViT's block outputs (see :class:`ViTTokenGrid`); a TypeError
    for a model that is not one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"vit_reshape: expected a timm model (nn.Module), got {type(model).__name__}")
    return ViTTokenGrid(model)


def reshape_for(model: nn.Module):
    """The ``reshape=`` for :func:`default_layer`'s output: :func:`vit_reshape` for ViTs,
    ``i2x.swin_reshape`` for channels-last models (``output_fmt == "NHWC"``), None for CNNs."""
    inner = unwrap_model(model)
    if _is_vit(inner):
        return vit_reshape(model)
    if str(getattr(inner, "output_fmt", "NCHW")) == "NHWC":
        return swin_reshape
    return None


def default_layer(model: nn.Module) -> str:
    """The natural GradCAM target layer of a timm model, as a dotted name (see the module doc)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"default_layer: expected a timm model (nn.Module), got {type(model).__name__}")
    inner: Any = unwrap_model(model)  # a timm model: attributes torch's nn.Module type does not know
    if _is_vit(inner):
        last = len(inner.blocks) - 1
        if isinstance(getattr(inner.blocks[last], "norm1", None), nn.Module):
            return f"blocks.{last}.norm1"
        return f"blocks.{last}"
    info = getattr(inner, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return str(info[-1]["module"])
    raise ValueError(
        f"default_layer: {_describe(inner)} is neither a timm ViT nor has timm's feature_info; "
        "name the layer: explainer_for(model, layer=...)"
    )


def explainer_for(model: nn.Module, method: str = "gradcam", layer=None) -> Explainer:
    """An :class:`i2x.Explainer` of a timm model at ``layer`` (default :func:`default_layer`) with
    the family's reshape."""
    return Explainer(model, default_layer(model) if layer is None else layer, method=method,
                     reshape=reshape_for(model))
