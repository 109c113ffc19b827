"""Faithfulness metrics for any saliency map: does the map point at the pixels the model uses?

- :func:`deletion_curve` / :func:`insertion_curve` and :func:`auc` (RISE, Petsiuk et al. 2018):
  the target's softmax probability as the most salient pixels are removed from / revealed on the
  image. A faithful map gives a low deletion AUC and a high insertion AUC.
- :func:`average_drop` / :func:`increase_in_confidence` (Grad-CAM++, Chattopadhay et al. 2018):
  the model's confidence on the image masked by the (min-max normalised) map.
- :func:`faithfulness_report`: all four as plain numbers.
- :func:`relevance_mass` (Arras et al. 2022, "relevance mass accuracy"): the share of a map's
  positive relevance that falls inside a ground-truth mask. With the mask on a known shortcut (the
  decoy squares of ``i2x.load_dataset("decoy-fashion-mnist")``) it is the share of the
  explanation spent on the wrong reason; :func:`wrong_reason_share` computes it for a model's
  GradCAM maps over a set of images (the "WR" score of Friedrich et al. 2023 is the same idea).

Everything is batched and runs on the images' device in plain torch (no numpy, no Python loop over
images; the only Python loop is over chunks of ``batch_size`` model inputs). The model is called
under ``torch.no_grad()`` exactly as it is: nothing calls ``eval()`` or ``train()`` on it, so the
caller chooses the mode (use eval mode: dropout in train mode makes the curves random and
batch-norm in train mode both normalises with batch statistics and updates its running stats).

Conventions shared by all functions:

- ``images`` ``[B, C, H, W]`` floating; ``saliency`` ``[B, H, W]``, or ``[B, h, w]`` which is resized
  to ``H x W`` bilinearly (``align_corners=False``); it is moved to the images' device and must be
  finite. ``targets`` ``[B]`` class indices (a tensor or a sequence of ints), or ``None`` for the
  model's predicted class (first maximal logit) on the clean images.
- The model maps ``[N, C, H, W]`` to logits ``[N, num_classes]``; probabilities are its softmax,
  computed in float32 (float64 for float64 logits) and returned in that dtype.
- An empty batch (``B == 0``) gives empty results and does not call the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from i2x._internal.checks import check_int, check_number, describe
from i2x.explain.explainer import Explainer
from i2x.reference import upsample_normalize as _upsample_normalize

__all__ = [
    "BASELINES",
    "ConfidenceChange",
    "auc",
    "average_drop",
    "deletion_curve",
    "faithfulness_report",
    "increase_in_confidence",
    "insertion_curve",
    "relevance_mass",
    "wrong_reason_share",
    "WrongReasonShare",
]

BASELINES = ("zeros", "mean", "blur")

# RISE's blur substrate (klen=11, ksig=5).
DEFAULT_BLUR_KERNEL_SIZE = 11
DEFAULT_BLUR_SIGMA = 5.0
DEFAULT_STEPS = 50
DEFAULT_BATCH_SIZE = 64

Targets = torch.Tensor | Sequence[int] | None
Baseline = str | torch.Tensor


@dataclass(frozen=True, eq=False)
class ConfidenceChange:
    """Result of :func:`average_drop` and :func:`increase_in_confidence`.

    value:            the batch aggregate in percent (a Python float; NaN for an empty batch)
    per_image:        ``[B]``: average drop: ``max(0, Y - O) / Y * 100`` (float);
                      increase in confidence: ``O > Y`` (bool)
    original_prob:    ``[B]`` Y, the target's probability on the image
    explanation_prob: ``[B]`` O, the target's probability on ``image * normalised saliency``
    """

    value: float
    per_image: torch.Tensor
    original_prob: torch.Tensor
    explanation_prob: torch.Tensor


# --------------------------------------------------------------------------------------------
# Public API


def deletion_curve(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: Targets = None,
    *,
    steps: int = DEFAULT_STEPS,
    baseline: Baseline = "zeros",
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Target probability as the most salient pixels are replaced by the baseline -> ``[B, steps + 1]``.

    Pixels are ranked per image by saliency, highest first; equal saliencies are ranked by flat
    index ``y * W + x``, lower first (a stable sort). Point ``k`` (``k = 0..steps``) is the
    probability after the top ``floor(k * H * W / steps)`` pixels (all channels of each) have been
    replaced by the baseline: point 0 is the image, point ``steps`` the baseline.

    baseline: ``"zeros"``; ``"mean"`` (per-image, per-channel mean); ``"blur"`` (Gaussian blur of
    the image, ``blur_kernel_size`` x ``blur_kernel_size``, ``blur_sigma``, replicate padding);
    or a tensor broadcastable to ``images``. ``batch_size``: model inputs per forward call.
    """
    return _curve("deletion", model, images, saliency, targets, steps, baseline, blur_kernel_size, blur_sigma,
                  batch_size)


def insertion_curve(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: Targets = None,
    *,
    steps: int = DEFAULT_STEPS,
    baseline: Baseline = "blur",
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Target probability as the most salient pixels are revealed on the baseline -> ``[B, steps + 1]``.

    The mirror of :func:`deletion_curve` (same ranking, tie rule and pixel counts): point ``k`` is
    the baseline with the top ``floor(k * H * W / steps)`` pixels copied from the image, so point 0
    is the baseline and point ``steps`` the image. The default baseline is a blur, as in RISE.
    """
    return _curve("insertion", model, images, saliency, targets, steps, baseline, blur_kernel_size, blur_sigma,
                  batch_size)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under ``curve`` ``[B, S + 1]`` sampled uniformly on x in [0, 1] -> ``[B]``.

    Any leading shape works (``[..., S + 1]`` -> ``[...]``); at least 2 points are needed.
    """
    if not isinstance(curve, torch.Tensor):
        raise TypeError(f"auc: curve must be a torch.Tensor, got {type(curve).__name__}")
    if curve.dim() < 1 or curve.shape[-1] < 2:
        raise ValueError(f"auc: curve must be [B, S + 1] with at least 2 points, got shape {tuple(curve.shape)}")
    if curve.is_complex():
        raise TypeError(f"auc: curve must be real, got {curve.dtype}")
    if not curve.is_floating_point():
        curve = curve.to(torch.get_default_dtype())
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)


def average_drop(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: Targets = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ConfidenceChange:
    """Grad-CAM++'s average drop: mean over images of ``max(0, Y - O) / Y * 100``.

    Y: the target's probability on the image; O: on ``E = image * s``, where ``s`` is the saliency
    resized to ``H x W`` and then min-max normalised per image to [0, 1] (a constant map becomes all
    zeros, as in :func:`i2x.reference.upsample_normalize`). An image with ``Y == 0`` counts as a
    drop of 0. Lower is better.
    """
    y, o = _confidence("average_drop", model, images, saliency, targets, batch_size)
    drop = _drop(y, o)
    return ConfidenceChange(float(drop.mean()), drop, y, o)


def increase_in_confidence(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: Targets = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ConfidenceChange:
    """Grad-CAM++'s increase in confidence: percentage of images with ``O > Y`` (strictly).

    Y and O as in :func:`average_drop`; ``per_image`` is the bool ``O > Y``. Higher is better.
    """
    y, o = _confidence("increase_in_confidence", model, images, saliency, targets, batch_size)
    increased = o > y
    return ConfidenceChange(float(increased.to(y.dtype).mean() * 100), increased, y, o)


def faithfulness_report(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: Targets = None,
    *,
    steps: int = DEFAULT_STEPS,
    deletion_baseline: Baseline = "zeros",
    insertion_baseline: Baseline = "blur",
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, float]:
    """All four metrics as batch means: ``{"deletion_auc", "insertion_auc", "average_drop",
    "increase_in_confidence"}`` -> float (the last two in percent; NaN for an empty batch).

    ``targets=None`` is resolved once (the predicted class on the clean images) and shared.
    """
    fname = "faithfulness_report"
    _check_model(model, fname)
    images = _check_images(images, fname)
    batch_size = check_int(batch_size, f"{fname}: batch_size")
    targets = _check_targets(targets, images.shape[0], images.device, fname)
    if targets is None:
        with torch.no_grad():
            targets = _predict(model, images, batch_size, fname)
    deletion = deletion_curve(
        model, images, saliency, targets, steps=steps, baseline=deletion_baseline,
        blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma, batch_size=batch_size,
    )
    insertion = insertion_curve(
        model, images, saliency, targets, steps=steps, baseline=insertion_baseline,
        blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma, batch_size=batch_size,
    )
    y, o = _confidence(fname, model, images, saliency, targets, batch_size)
    drop = _drop(y, o)
    return {
        "deletion_auc": float(auc(deletion).mean()),
        "insertion_auc": float(auc(insertion).mean()),
        "average_drop": float(drop.mean()),
        "increase_in_confidence": float((o > y).to(y.dtype).mean() * 100),
    }


class WrongReasonShare(NamedTuple):
    """Result of :func:`wrong_reason_share`: ``value`` the mean over images (a Python float) and
    ``per_image`` ``[B]`` each image's :func:`relevance_mass` inside its mask."""

    value: float
    per_image: torch.Tensor


def relevance_mass(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the share of the map's positive relevance that lies inside the mask -> ``[B]``.

    ``R_in / R_all`` with ``R_in`` the sum of ``max(s, 0)`` over the pixels where the mask is True
    and ``R_all`` the same sum over every pixel (Arras et al. 2022's relevance mass accuracy).
    Negative relevance is ignored (it is evidence against the class, not a place the model
    looks); an image whose map has no positive relevance gives 0 (no mass anywhere, so none in
    the mask). The value is in [0, 1]: 1 when all of it is inside, 0 when none is.

    saliency: ``[B, H, W]`` or ``[B, 1, H, W]`` real, finite, at the masks' size (resize maps to
              the image first: ``Explainer.explain(x, size="input")``)
    masks:    ``[B, H, W]`` or ``[B, 1, H, W]`` bool (``ImageDataset.masks``)

    Returns float32 ``[B]`` (float64 for a float64 map) on the saliency's device.
    """
    fname = "relevance_mass"
    sal = _as_maps(saliency, "saliency", fname)
    mask = _as_maps(masks, "masks", fname)
    if sal.is_complex() or sal.dtype == torch.bool:
        raise TypeError(f"{fname}: saliency: expected a real tensor, got {describe(saliency)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{fname}: masks: expected a bool tensor, got {describe(masks)}")
    if sal.shape != mask.shape:
        raise ValueError(f"{fname}: masks: expected the saliency's shape {list(sal.shape)} (one mask per map, at "
                         f"the same size), got {list(mask.shape)}")
    sal = sal.to(_prob_dtype(sal.dtype))
    if not bool(torch.isfinite(sal).all()):
        raise ValueError(f"{fname}: saliency: expected finite values, but it holds NaN or inf")
    positive = sal.clamp(min=0).flatten(1)
    inside = (positive * mask.to(sal.device).flatten(1)).sum(dim=1)
    total = positive.sum(dim=1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def wrong_reason_share(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    layer=None,
    targets: Targets = None,
    *,
    method: str = "gradcam",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> WrongReasonShare:
    """The model's GradCAM relevance inside ``masks``: :func:`relevance_mass` of its maps, per image
    and on average.

    The maps are :class:`i2x.Explainer`'s (``method``, at ``layer``; None: the last layer with a
    spatial grid) for ``targets`` (None: the predicted class), upsampled to the images' size and
    not min-max normalised (GradCAM's ReLU already makes them non-negative; a min-max would move
    mass between pixels). With the masks on a shortcut (``ImageDataset.masks`` of a decoy
    dataset) the value is the share of the explanation spent on the wrong reason: near 1 for a
    model that reads only the shortcut, near 0 for one that ignores it.

    images: ``[B, C, H, W]`` floating, finite, on the model's device, ``B >= 1``
    masks:  ``[B, H, W]`` or ``[B, 1, H, W]`` bool at the images' size
    batch_size: images per explain call (memory only; the result does not depend on it)

    The model is used as it is (put it in eval mode first, as for the other metrics).
    """
    fname = "wrong_reason_share"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fname}: model: expected a torch.nn.Module, got {describe(model)}")
    images = _check_images(images, fname)
    batch_size = check_int(batch_size, f"{fname}: batch_size")
    B, _, H, W = images.shape
    if B == 0:
        raise ValueError(f"{fname}: images: expected at least one image, got an empty batch {list(images.shape)}")
    mask = _as_maps(masks, "masks", fname)
    if mask.dtype != torch.bool:
        raise TypeError(f"{fname}: masks: expected a bool tensor, got {describe(masks)}")
    if tuple(mask.shape) != (B, H, W):
        raise ValueError(f"{fname}: masks: expected [{B}, 1, {H}, {W}] or [{B}, {H}, {W}] (one mask per image, at "
                         f"the images' size), got {list(masks.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{fname}: images: expected finite values, but they hold NaN or inf")
    targets = _check_targets(targets, B, images.device, fname)
    explainer = Explainer(model, layer, method=method)
    shares = []
    for first in range(0, B, batch_size):
        chunk = slice(first, first + batch_size)
        maps = explainer.explain(images[chunk], None if targets is None else targets[chunk], size="input",
                                 normalize=False)
        shares.append(relevance_mass(maps, mask[chunk].to(maps.device)))
    per_image = torch.cat(shares)
    return WrongReasonShare(float(per_image.mean()), per_image)


# --------------------------------------------------------------------------------------------
# The work


def _curve(mode, model, images, saliency, targets, steps, baseline, blur_kernel_size, blur_sigma, batch_size):
    fname = f"{mode}_curve"
    _check_model(model, fname)
    images = _check_images(images, fname)
    steps = check_int(steps, f"{fname}: steps")
    batch_size = check_int(batch_size, f"{fname}: batch_size")
    sal = _check_saliency(saliency, images, fname)
    targets = _check_targets(targets, images.shape[0], images.device, fname)
    B, _, H, W = images.shape
    with torch.no_grad():
        base = _baseline(images, baseline, blur_kernel_size, blur_sigma, fname)
        if B == 0:
            return torch.empty((0, steps + 1), dtype=_prob_dtype(images.dtype), device=images.device)
        if targets is None:
            targets = _predict(model, images, batch_size, fname)
        rank = _pixel_rank(_resize(sal, (H, W)))  # [B, H*W]
        # Pixels changed at point k: floor(k * N / steps), exact in integers (0 at k=0, N at k=steps).
        counts = torch.arange(steps + 1, device=images.device) * (H * W) // steps
        start, end = (images, base) if mode == "deletion" else (base, images)

        def build(j: torch.Tensor):
            # Model input j is image b = j % B at point k = j // B, so chunks are full even when B
            # is small and the curve long; the output reshapes to [steps + 1, B].
            b, k = j % B, j // B
            changed = (rank[b] < counts[k, None]).view(-1, 1, H, W)
            return torch.where(changed, end[b], start[b]), b

        probs = _evaluate(model, (steps + 1) * B, build, targets, batch_size, fname)
    return probs.view(steps + 1, B).t().contiguous()


def _confidence(fname, model, images, saliency, targets, batch_size):
    """``(Y, O)``, each ``[B]``: target probabilities on the images and on ``image * saliency01``."""
    _check_model(model, fname)
    images = _check_images(images, fname)
    batch_size = check_int(batch_size, f"{fname}: batch_size")
    sal = _check_saliency(saliency, images, fname)
    targets = _check_targets(targets, images.shape[0], images.device, fname)
    B, _, H, W = images.shape
    if B == 0:
        empty = torch.empty(0, dtype=_prob_dtype(images.dtype), device=images.device)
        return empty, empty.clone()
    with torch.no_grad():
        if targets is None:
            targets = _predict(model, images, batch_size, fname)
        # Resize first, then min-max, so the map spans exactly [0, 1] on the image grid.
        sal01 = _upsample_normalize(sal, (H, W))
        explanation = images * sal01[:, None].to(images.dtype)
        both = torch.cat([images, explanation])  # inputs 0..B-1 the images, B..2B-1 the explanations
        probs = _evaluate(model, 2 * B, lambda j: (both[j], j % B), targets, batch_size, fname)
    return probs[:B], probs[B:]


def _drop(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``max(0, Y - O) / Y * 100`` per image; 0 where ``Y == 0`` (then ``Y - O <= 0`` anyway)."""
    return torch.clamp(y - o, min=0) / torch.where(y > 0, y, torch.ones_like(y)) * 100


def _evaluate(model, n, build, targets, batch_size, fname) -> torch.Tensor:
    """``[n]``: softmax probability of ``targets[b_j]`` for model inputs ``j = 0..n-1``.

    ``build(j) -> (inputs [len(j), C, H, W], b [len(j)])`` makes one chunk of ``batch_size``.
    """
    out = []
    for first in range(0, n, batch_size):
        j = torch.arange(first, min(first + batch_size, n), device=targets.device)
        x, b = build(j)
        logits = _logits(model, x, fname)
        if first == 0:
            _check_target_range(targets, logits.shape[1], fname)
        probs = torch.softmax(logits, dim=1, dtype=_prob_dtype(logits.dtype))
        out.append(probs.gather(1, targets[b].to(probs.device)[:, None])[:, 0])
    return torch.cat(out)


def _predict(model, images, batch_size, fname) -> torch.Tensor:
    """``[B]`` int64: the model's predicted class (first maximal logit) on ``images``."""
    out = [_logits(model, images[i:i + batch_size], fname).argmax(dim=1) for i in range(0, images.shape[0], batch_size)]
    if not out:
        return torch.empty(0, dtype=torch.int64, device=images.device)
    return torch.cat(out).to(images.device)


def _logits(model, x, fname) -> torch.Tensor:
    logits = model(x)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fname}: model must return a logits tensor [N, num_classes], got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] == 0:
        raise ValueError(
            f"{fname}: model must return logits [N, num_classes] for input [N, C, H, W]; for input shape "
            f"{tuple(x.shape)} it returned shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"{fname}: model must return floating logits, got {logits.dtype}")
    return logits


def _prob_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resize(sal: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, H, W]``, bilinear, align_corners=False (unchanged when already that size)."""
    if tuple(sal.shape[1:]) == tuple(size):
        return sal
    x = sal.to(_prob_dtype(sal.dtype))
    return F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _pixel_rank(sal: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` -> ``[B, H*W]`` int64: each pixel's rank, 0 = most salient.

    Ties go to the lower flat index: a stable descending sort keeps equal keys in index order.
    """
    flat = sal.reshape(sal.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _baseline(images, baseline, kernel_size, sigma, fname) -> torch.Tensor:
    """The replacement image(s), broadcast (possibly as an expanded view) to ``images``' shape."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(images)
        if baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        if baseline == "blur":
            return _gaussian_blur(images, kernel_size, sigma, fname)
        raise ValueError(f"{fname}: baseline must be one of {BASELINES} or a tensor, got {baseline!r}")
    if isinstance(baseline, torch.Tensor):
        try:
            out = torch.broadcast_to(baseline, images.shape)
        except RuntimeError:
            raise ValueError(
                f"{fname}: baseline tensor of shape {tuple(baseline.shape)} does not broadcast to images "
                f"{tuple(images.shape)}"
            ) from None
        return out.to(device=images.device, dtype=images.dtype)
    raise TypeError(f"{fname}: baseline must be one of {BASELINES} or a tensor, got {type(baseline).__name__}")


def _gaussian_blur(images, kernel_size, sigma, fname) -> torch.Tensor:
    """Separable Gaussian blur as two depthwise conv2d passes, replicate padding (any image size)."""
    if check_int(kernel_size, f"{fname}: blur_kernel_size") % 2 == 0:
        raise ValueError(f"{fname}: blur_kernel_size: expected a positive odd int, got {kernel_size!r}")
    check_number(sigma, f"{fname}: blur_sigma", 0, low_open=True)
    kernel_size = int(kernel_size)
    C = images.shape[1]
    compute = _prob_dtype(images.dtype)  # conv2d has no half kernels on every CPU build
    x = images.to(compute)
    offsets = torch.arange(kernel_size, dtype=compute, device=images.device) - (kernel_size - 1) / 2
    g = torch.exp(-offsets * offsets / (2 * float(sigma) ** 2))
    g = g / g.sum()
    r = kernel_size // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)
    return x.to(images.dtype)


# --------------------------------------------------------------------------------------------
# Checks: messages name the function, the argument, what was expected and what came.


def _as_maps(x, arg: str, fname: str) -> torch.Tensor:
    """``[B, H, W]`` or ``[B, 1, H, W]`` -> ``[B, H, W]`` (a view), with at least one map of at
    least one pixel."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fname}: {arg}: expected a tensor [B, H, W] or [B, 1, H, W], got {describe(x)}")
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{fname}: {arg}: expected a tensor [B, H, W] or [B, 1, H, W], got shape {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{fname}: {arg}: expected at least one map of at least one pixel, got shape "
                         f"{list(x.shape)}")
    return x


def _check_model(model, fname) -> None:
    if not callable(model):
        raise TypeError(f"{fname}: model must be callable (an nn.Module or a function), got {type(model).__name__}")


def _check_images(images, fname) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{fname}: images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{fname}: images must be [B, C, H, W] (4-D), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{fname}: images must be a floating tensor, got {images.dtype}")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{fname}: images must have H, W >= 1, got shape {tuple(images.shape)}")
    return images


def _check_saliency(saliency, images, fname) -> torch.Tensor:
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"{fname}: saliency must be a torch.Tensor [B, h, w], got {type(saliency).__name__}")
    if saliency.dim() != 3:
        raise ValueError(f"{fname}: saliency must be [B, h, w] (3-D), got shape {tuple(saliency.shape)}")
    if saliency.shape[0] != images.shape[0]:
        raise ValueError(
            f"{fname}: saliency batch {saliency.shape[0]} does not match images batch {images.shape[0]} "
            f"(saliency {tuple(saliency.shape)}, images {tuple(images.shape)})"
        )
    if saliency.shape[1] == 0 or saliency.shape[2] == 0:
        raise ValueError(
            f"{fname}: saliency {tuple(saliency.shape)} has an empty spatial dim and cannot be resized to the "
            f"images' {tuple(images.shape[2:])}"
        )
    if saliency.is_complex():
        raise TypeError(f"{fname}: saliency must be real, got {saliency.dtype}")
    sal = saliency.to(images.device)
    if not sal.is_floating_point():
        sal = sal.to(torch.float64)  # exact for bool and for ints up to 2**53
    if not bool(torch.isfinite(sal).all()):
        raise ValueError(f"{fname}: saliency must be finite, but it holds NaN or inf")
    return sal


def _check_targets(targets, batch, device, fname) -> torch.Tensor | None:
    """``[B]`` int64 on ``device`` (or None); the upper bound is checked once the model has answered."""
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{fname}: targets must be None, an int tensor [B] or a sequence of ints, got "
                f"{type(targets).__name__}"
            ) from None
        if targets.numel() == 0:
            targets = targets.to(torch.int64)  # torch.as_tensor([]) is float
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{fname}: targets must hold integer class indices, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(f"{fname}: targets must be [B] = [{batch}] class indices, got shape {tuple(targets.shape)}")
    targets = targets.to(device=device, dtype=torch.int64)
    if batch > 0 and int(targets.min()) < 0:
        raise ValueError(f"{fname}: targets must be >= 0, got {int(targets.min())}")
    return targets


def _check_target_range(targets, num_classes, fname) -> None:
    top = int(targets.max())
    if top >= num_classes:
        raise ValueError(f"{fname}: targets must be < num_classes = {num_classes} (the model's output), got {top}")
