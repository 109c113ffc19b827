"""Classifiers for small images whose target layer still holds a spatial grid.

ImageNet networks shrink a 28 x 28 image to 1 x 1 by their last stage, which leaves GradCAM and the
prototype assignment nothing to localise. :class:`SmallResNet` is a CIFAR-style ResNet (He et al.
2016, section 4.2): a 3 x 3 stem at stride 1, no max-pool, stages of BasicBlocks at strides
1 / 2 / 2 (/ 2), then global average pooling and a linear head. Its last stage keeps a grid:

==========  ==========  ==========
input       ``layer3``  ``layer4`` (4 widths)
==========  ==========  ==========
28 x 28     7 x 7       4 x 4
32 x 32     8 x 8       4 x 4
==========  ==========  ==========

:func:`build_model` builds it or torchvision's ResNet-50 (the network the I2X paper used) by name
and returns the default target layer with it: the last stage, the layer GradCAM is usually taken
at. With a global-average-pool + linear head GradCAM there equals CAM / (h * w).

Weights are drawn from torch's global generator: call ``torch.manual_seed`` first for the same
initial weights.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from i2x._internal.checks import check_int

__all__ = ["BasicBlock", "MODEL_NAMES", "SmallResNet", "build_model", "default_layer", "rebuild_model"]

MODEL_NAMES = ("small-resnet", "resnet50")
DEFAULT_WIDTHS = (16, 32, 64)
_STAGE_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or a strided 1 x 1 conv + BN where the shape changes (ResNet
    "option B"). ``[B, in, H, W]`` -> ``[B, out, ceil(H / stride), ceil(W / stride)]``. The ReLUs
    are not in place, so a hook on the block's output sees a tensor nothing later overwrites.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet for 28-32 px images.

    num_classes:      outputs of the linear head
    in_channels:      1 (MNIST, Fashion-MNIST, digits) or 3 (CIFAR-10)
    widths:           channels per stage, 3 or 4 stages (``layer1`` .. ``layer4``); default (16, 32, 64)
    blocks_per_stage: BasicBlocks per stage (default 1: 8 conv layers for 3 stages, cheap on a CPU)
    zero_init_residual: start each block's last BN at gamma = 0 (each block the identity at init;
                      Goyal et al. 2017); default False, the plain ResNet initialisation

    Modules: ``stem`` (3x3 conv stride 1 - BN - ReLU), ``layer1`` .. ``layer<len(widths)>``
    (strides 1, 2, 2, 2), ``pool`` (global average), ``fc``. ``[B, in_channels, H, W]`` ->
    logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS,
                 blocks_per_stage: int = 1, zero_init_residual: bool = False):
        super().__init__()
        check_int(num_classes, "num_classes")
        check_int(in_channels, "in_channels")
        check_int(blocks_per_stage, "blocks_per_stage")
        widths = tuple(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else widths
        if not isinstance(widths, tuple) or len(widths) not in (3, 4):
            raise ValueError(f"widths: expected 3 or 4 channel counts (one per stage), got {widths!r}")
        for w in widths:
            check_int(w, "widths")
        self.widths = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        previous = widths[0]
        for i, (width, stride) in enumerate(zip(widths, _STAGE_STRIDES, strict=False), start=1):  # 3 or 4 stages
            blocks = [BasicBlock(previous, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(int(blocks_per_stage) - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            previous = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, int(num_classes))
        self._init_weights(bool(zero_init_residual))

    @property
    def last_layer(self) -> str:
        """Name of the last stage (the default GradCAM target): ``layer3`` or ``layer4``."""
        return f"layer{len(self.widths)}"

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He (fan_out) for convs as in torchvision's ResNet; BN as the identity; the linear head
        # keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W]`` -> the last stage's map ``[B, widths[-1], h, w]``."""
        x = self.stem(x)
        for i in range(1, len(self.widths) + 1):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _resnet50(num_classes: int, in_channels: int, small_input: bool = False) -> nn.Module:
    """torchvision's ResNet-50, untrained (``weights=None``), head resized to ``num_classes``.

    in_channels != 3: ``conv1`` is replaced by a conv of the same shape taking ``in_channels``.
    small_input:      replace the 7 x 7 stride-2 ``conv1`` + max-pool by a 3 x 3 stride-1 conv and
                      no pooling (CIFAR-style), so ``layer4`` is 4 x 4 at 28 or 32 px instead of
                      1 x 1. Default False: the network as the paper used it (then give it large
                      images, e.g. ``load_dataset(..., size=224)``).
    """
    from torchvision.models import resnet50

    check_int(in_channels, "in_channels")
    model = resnet50(weights=None, num_classes=int(num_classes))
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(name: str, num_classes: int, in_channels: int = 1, **options) -> tuple[nn.Module, str]:
    """A fresh model by name and the dotted name of its default target layer.

    ``"small-resnet"``: :class:`SmallResNet` (options: ``widths``, ``blocks_per_stage``,
    ``zero_init_residual``); default layer ``"layer3"`` (``"layer4"`` with 4 widths).
    ``"resnet50"``: torchvision's ResNet-50 with ``weights=None`` (options: ``small_input``);
    default layer ``"layer4"``.

    Raises ValueError for an unknown name, TypeError for an option the model does not take.
    """
    _check_name(name)
    check_int(num_classes, "num_classes")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"options: {name!r} takes {list(allowed)}, got unknown {unknown}")
    model: nn.Module
    if name == "small-resnet":
        small = SmallResNet(num_classes=num_classes, in_channels=in_channels, **options)
        model, layer = small, small.last_layer
    else:
        model, layer = _resnet50(num_classes, in_channels, **options), "layer4"
    # How to rebuild it (a run records this, so `i2x curate` / `i2x experiment` can load weights).
    spec = {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels),
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    # nn.Module.__setattr__ stores any value; torch's stub types it as Tensor | Module only.
    model.i2x_spec = spec  # type: ignore[assignment]
    return model, layer


def default_layer(name: str, **options) -> str:
    """The default target layer of :func:`build_model`'s ``name`` with these options, without
    building it."""
    _check_name(name)
    if name == "small-resnet":
        return f"layer{len(tuple(options.get('widths', DEFAULT_WIDTHS)))}"
    return "layer4"


_OPTIONS = {
    "small-resnet": ("widths", "blocks_per_stage", "zero_init_residual"),
    "resnet50": ("small_input",),
}


def _check_name(name) -> None:
    if name not in MODEL_NAMES:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"name: expected one of {list(MODEL_NAMES)}, got {name!r}{hint}")


def rebuild_model(spec: dict) -> tuple[nn.Module, str]:
    """The model a run's manifest describes (``model["build"]``, recorded when :func:`build_model`
    made it), freshly initialised: load the run's weights into it."""
    if not isinstance(spec, dict) or "name" not in spec or "num_classes" not in spec:
        raise ValueError(f"model spec: expected {{'name', 'num_classes', 'in_channels', 'options'}}, got {spec!r}")
    options = dict(spec.get("options") or {})
    if "widths" in options:
        options["widths"] = tuple(options["widths"])
    return build_model(spec["name"], int(spec["num_classes"]), int(spec.get("in_channels", 1)), **options)
