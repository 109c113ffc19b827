"""Pure-torch twins of the compiled ops: the specification the kernels are tested against.

Each function computes in float32 (float64 for float64 inputs) and returns the dtype the compiled
op returns. They are written for clarity, not speed: several materialise ``[B, C, h, w]``
temporaries or the full ``[positions, K]`` distance matrix, which the kernels avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")

# pytorch-grad-cam's epsilons, so that maps match it.
GRADCAM_PLUSPLUS_EPS = 1e-6
XGRADCAM_EPS = 1e-7


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op returns: the promotion of its float inputs."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in: float64 for float64, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _opmath(*tensors: torch.Tensor) -> torch.dtype:
    return opmath_dtype(promoted_dtype(*tensors))


def cam_channel_weights(activations: torch.Tensor, gradients: torch.Tensor, method: str) -> torch.Tensor:
    """Channel weights ``[B, C]`` of the weighted-sum methods (gradcam, gradcam++, xgradcam)."""
    a, g = activations, gradients
    if method == "gradcam":
        return g.mean(dim=(2, 3))
    if method == "gradcam++":
        g2 = g * g
        g3 = g2 * g
        sum_a = a.sum(dim=(2, 3), keepdim=True)
        aij = g2 / (2 * g2 + sum_a * g3 + GRADCAM_PLUSPLUS_EPS)
        aij = torch.where(g != 0, aij, torch.zeros_like(aij))
        return (g.clamp(min=0) * aij).sum(dim=(2, 3))
    if method == "xgradcam":
        sum_a = a.sum(dim=(2, 3), keepdim=True)
        return (g * a / (sum_a + XGRADCAM_EPS)).sum(dim=(2, 3))
    raise ValueError(f"method {method!r} has no channel weights")


def cam(activations: torch.Tensor, gradients: torch.Tensor, method: str = "gradcam", relu: bool = True) -> torch.Tensor:
    """``[B, C, h, w]`` activations and gradients -> ``[B, h, w]`` class activation map."""
    if method not in CAM_METHODS:
        raise ValueError(f"cam: method must be one of {CAM_METHODS}, got {method!r}")
    out_dtype = promoted_dtype(activations, gradients)
    compute = _opmath(activations, gradients)
    a = activations.to(compute)
    g = gradients.to(compute)
    if method == "layercam":
        m = (g.clamp(min=0) * a).sum(dim=1)
    elif method == "hirescam":
        m = (g * a).sum(dim=1)
    else:
        w = cam_channel_weights(a, g, method)
        m = (w[:, :, None, None] * a).sum(dim=1)
    if relu:
        m = m.clamp(min=0)
    return m.to(out_dtype)


def upsample_normalize(cam: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, H, W]``: bilinear (align_corners=False), then per-image min-max to
    [0, 1]. A constant map becomes all zeros; a map holding a NaN becomes all NaN."""
    compute = _opmath(cam)
    x = cam.to(compute)
    up = F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    if normalize and up.numel() > 0:
        lo = up.amin(dim=(1, 2), keepdim=True)
        hi = up.amax(dim=(1, 2), keepdim=True)
        rng = hi - lo
        # A constant input map is constant after resizing too (bar rounding ripples of
        # interpolation weights that do not sum to exactly 1), so it is decided on the input.
        flat = x.reshape(x.shape[0], -1)
        constant = (flat.amax(dim=1) == flat.amin(dim=1))[:, None, None]
        live = (rng > 0) & ~constant
        up = torch.where(live, (up - lo) / torch.where(live, rng, torch.ones_like(rng)), torch.zeros_like(up))
        has_nan = torch.isnan(flat).any(dim=1)[:, None, None]
        up = torch.where(has_nan, torch.full_like(up, float("nan")), up)
    return up.to(cam.dtype)


def _flatten_positions(features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return features


def project(
    features: torch.Tensor, mean: torch.Tensor | None = None, components: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``[N, C]`` (or ``[B, C, h, w]`` flattened to rows) -> ``(f - mean) @ components``."""
    tensors = [t for t in (features, mean, components) if t is not None]
    compute = _opmath(*tensors)
    x = _flatten_positions(features).to(compute)
    if mean is not None:
        x = x - mean.to(compute)
    if components is not None:
        x = x @ components.to(compute)
    return x


def prototype_assign(
    features: torch.Tensor,
    centroids: torch.Tensor,
    mean: torch.Tensor | None = None,
    components: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per position (ties to the lower index) and its squared distance.

    features ``[B, C, h, w]`` or ``[N, C]``; centroids ``[K, D]``; returns ``[B, h, w]`` / ``[N]``
    int64 indices and squared distances in the inputs' promoted dtype.
    """
    tensors = [t for t in (features, centroids, mean, components) if t is not None]
    out_dtype = promoted_dtype(*tensors)
    x = project(features, mean, components)
    c = centroids.to(x.dtype)
    # Exact differences, not the |x|^2 - 2 x.c + |c|^2 expansion: this is the ground truth.
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(dim=2)
    best, index = d2.min(dim=1)  # min returns the first (lowest) index among equal values
    if features.dim() == 4:
        b, _, h, w = features.shape
        best, index = best.reshape(b, h, w), index.reshape(b, h, w)
    return index, best.to(out_dtype)


def prototype_pool(
    saliency: torch.Tensor, assignment: torch.Tensor, num_prototypes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean saliency over the positions assigned to each prototype ``[B, K]`` (0 where absent),
    and the number of those positions ``[B, K]`` (int64)."""
    b = saliency.shape[0]
    compute = _opmath(saliency)
    s = saliency.reshape(b, -1).to(compute)
    a = assignment.reshape(b, -1).long()
    sums = torch.zeros(b, num_prototypes, dtype=compute, device=saliency.device).scatter_add_(1, a, s)
    counts = torch.zeros(b, num_prototypes, dtype=torch.int64, device=saliency.device).scatter_add_(
        1, a, torch.ones_like(a)
    )
    intensity = sums / counts.clamp(min=1).to(compute)
    return intensity.to(saliency.dtype), counts


def saliency_pool(features: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Saliency-weighted mean of the features ``[B, C]``; zeros where the saliency sums to 0."""
    out_dtype = promoted_dtype(features, saliency)
    compute = _opmath(features, saliency)
    f = features.to(compute)
    s = saliency.to(compute)
    total = s.sum(dim=(1, 2))
    weighted = torch.einsum("bchw,bhw->bc", f, s)
    safe = torch.where(total != 0, total, torch.ones_like(total))
    out = torch.where((total != 0)[:, None], weighted / safe[:, None], torch.zeros_like(weighted))
    return out.to(out_dtype)
