"""Typed wrappers over the compiled ops ``torch.ops.i2x.*``, with their fake (meta) kernels for
``torch.compile`` and their autograd formulas.

All ops take batched tensors of float32, float64, float16 or bfloat16 (accumulating in at least
float32), strided or contiguous, and return tensors on the input's device. Errors about tensors'
shapes, dtypes and devices come from the kernels as ``RuntimeError`` naming the argument; errors
about plain Python arguments are ``ValueError``/``TypeError`` raised here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from i2x._loader import _C  # noqa: F401  (importing it registers torch.ops.i2x.*)
from i2x.reference import CAM_METHODS, GRADCAM_PLUSPLUS_EPS, XGRADCAM_EPS
from i2x.reference import opmath_dtype as _opmath
from i2x.reference import promoted_dtype as _promoted

__all__ = ["CAM_METHODS", "cam", "upsample_normalize", "prototype_assign", "prototype_pool", "saliency_pool"]


def _require_tensor(value, name: str, op: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _call(op, tensors, *args):
    """Calls ``op``, skipping the Python autograd layer when no gradient can flow.

    ``register_autograd`` puts a Python kernel in front of every call (about 10 us); when grad
    mode is off or no input requires grad, that kernel would only redispatch, so the call goes
    straight to the backend kernel. Under torch.compile or functorch transforms (whose wrapped
    tensors may hide ``requires_grad``) the op is always called normally.
    """
    if (
        (not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    ):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


# ----------------------------------------------------------------------------------------------
# Public wrappers


def cam(activations: torch.Tensor, gradients: torch.Tensor, method: str = "gradcam", relu: bool = True) -> torch.Tensor:
    """GradCAM-family class activation map.

    Args:
        activations: ``[B, C, h, w]`` the target layer's output.
        gradients: ``[B, C, h, w]`` d(target score)/d(activations).
        method: ``gradcam`` (channel weights = spatial mean of gradients), ``gradcam++``,
            ``xgradcam``, ``layercam`` (relu(grad) * act, elementwise) or ``hirescam``
            (grad * act, elementwise); weight formulas and epsilons as in pytorch-grad-cam.
        relu: apply ReLU to the channel sum.

    Returns:
        ``[B, h, w]`` in the promoted dtype of the inputs. Differentiable in both inputs.
    """
    _require_tensor(activations, "activations", "cam")
    _require_tensor(gradients, "gradients", "cam")
    if method not in CAM_METHODS:
        raise ValueError(f"cam: method must be one of {', '.join(CAM_METHODS)}; got {method!r}")
    return _call(torch.ops.i2x.cam.default, (activations, gradients), activations, gradients, method, bool(relu))


def _check_size(size) -> tuple[int | torch.SymInt, int | torch.SymInt]:
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise ValueError(f"upsample_normalize: size must be two positive ints (H, W), got {size!r}")
    out: list[int | torch.SymInt] = []
    for s in size:
        if isinstance(s, bool) or not isinstance(s, (int, torch.SymInt)) and not hasattr(s, "__index__"):
            raise TypeError(f"upsample_normalize: size must be two positive ints (H, W), got {size!r}")
        if isinstance(s, int) and s <= 0:
            raise ValueError(f"upsample_normalize: size must be two positive ints (H, W), got {size!r}")
        out.append(s if isinstance(s, torch.SymInt) else int(s))
    return out[0], out[1]


def upsample_normalize(cam: torch.Tensor, size: Sequence[int], normalize: bool = True) -> torch.Tensor:
    """Resize ``[B, h, w]`` maps to ``[B, H, W]`` and min-max them per image.

    The resize samples exactly like ``F.interpolate(mode="bilinear", align_corners=False)``; with
    ``normalize`` each image is mapped to [0, 1], and a constant image becomes all zeros (never NaN).
    A NaN in an image makes that whole image NaN. Differentiable.
    """
    _require_tensor(cam, "cam", "upsample_normalize")
    height, width = _check_size(size)
    return _call(torch.ops.i2x.upsample_normalize.default, (cam,), cam, [height, width], bool(normalize))


def prototype_assign(
    features: torch.Tensor,
    centroids: torch.Tensor,
    mean: torch.Tensor | None = None,
    components: torch.Tensor | None = None,
    return_distances: bool = False,
):
    """Nearest prototype of every feature position.

    Args:
        features: ``[B, C, h, w]`` (one C-vector per position) or ``[N, C]``.
        centroids: ``[K, D]`` prototypes, in the projected space when ``components`` is given.
        mean: optional ``[C]`` subtracted first (PCA centring).
        components: optional ``[C, D]`` projection, applied as ``(f - mean) @ components``.
        return_distances: also return the squared distance to the chosen centroid.

    Returns:
        int64 indices ``[B, h, w]`` (or ``[N]``), ties going to the lower index; with
        ``return_distances`` also the squared distances, same shape, in the promoted float dtype.
        Works in blocks: memory grows with the input, never with input x K. Non-finite features
        or centroids raise an error.
    """
    _require_tensor(features, "features", "prototype_assign")
    _require_tensor(centroids, "centroids", "prototype_assign")
    if mean is not None:
        _require_tensor(mean, "mean", "prototype_assign")
    if components is not None:
        _require_tensor(components, "components", "prototype_assign")
    index, distances = _call(
        torch.ops.i2x.prototype_assign.default, (features, centroids, mean, components),
        features, centroids, mean, components,
    )
    return (index, distances) if return_distances else index


def prototype_pool(saliency: torch.Tensor, assignment: torch.Tensor, num_prototypes: int):
    """Saliency-weighted prototype pooling.

    Args:
        saliency: ``[B, h, w]`` raw CAM grid.
        assignment: ``[B, h, w]`` int64 prototype index of each position, in ``[0, K)``.
        num_prototypes: K.

    Returns:
        ``(intensity [B, K], counts [B, K])``: the mean saliency over the positions assigned to
        each prototype (0 where the prototype is absent) and how many positions that is (int64).
        Differentiable in ``saliency``.
    """
    _require_tensor(saliency, "saliency", "prototype_pool")
    _require_tensor(assignment, "assignment", "prototype_pool")
    if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int):
        raise TypeError(f"prototype_pool: num_prototypes must be an int, got {type(num_prototypes).__name__}")
    if num_prototypes <= 0:
        raise ValueError(f"prototype_pool: num_prototypes must be a positive int (K >= 1), got {num_prototypes}")
    return _call(torch.ops.i2x.prototype_pool.default, (saliency,), saliency, assignment, num_prototypes)


def saliency_pool(features: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Saliency-weighted mean of ``[B, C, h, w]`` features over ``[B, h, w]`` -> ``[B, C]``
    (zeros where an image's saliency sums to 0). Differentiable in both inputs."""
    _require_tensor(features, "features", "saliency_pool")
    _require_tensor(saliency, "saliency", "saliency_pool")
    return _call(torch.ops.i2x.saliency_pool.default, (features, saliency), features, saliency)


# ----------------------------------------------------------------------------------------------
# Fake kernels: output metadata only, for torch.compile and FakeTensor tracing.


@torch.library.register_fake("i2x::cam")
def _cam_fake(activations, gradients, method="gradcam", relu=True):
    torch._check(activations.dim() == 4, lambda: "cam: activations must be [B, C, h, w]")
    torch._check(activations.shape == gradients.shape, lambda: "cam: activations and gradients must match")
    b, _, h, w = activations.shape
    return activations.new_empty((b, h, w), dtype=_promoted(activations, gradients))


@torch.library.register_fake("i2x::upsample_normalize")
def _upsample_normalize_fake(cam, size, normalize=True):
    torch._check(cam.dim() == 3, lambda: "upsample_normalize: cam must be [B, h, w]")
    return cam.new_empty((cam.shape[0], size[0], size[1]))


@torch.library.register_fake("i2x::prototype_assign")
def _prototype_assign_fake(features, centroids, mean=None, components=None):
    torch._check(features.dim() in (2, 4), lambda: "prototype_assign: features must be [B, C, h, w] or [N, C]")
    shape = (features.shape[0], features.shape[2], features.shape[3]) if features.dim() == 4 else (features.shape[0],)
    dtype = _promoted(*[t for t in (features, centroids, mean, components) if t is not None])
    return features.new_empty(shape, dtype=torch.int64), features.new_empty(shape, dtype=dtype)


@torch.library.register_fake("i2x::prototype_pool")
def _prototype_pool_fake(saliency, assignment, num_prototypes):
    b = saliency.shape[0]
    return (
        saliency.new_empty((b, num_prototypes)),
        saliency.new_empty((b, num_prototypes), dtype=torch.int64),
    )


@torch.library.register_fake("i2x::saliency_pool")
def _saliency_pool_fake(features, saliency):
    torch._check(features.dim() == 4, lambda: "saliency_pool: features must be [B, C, h, w]")
    return features.new_empty((features.shape[0], features.shape[1]), dtype=_promoted(features, saliency))


# ----------------------------------------------------------------------------------------------
# Autograd. Closed-form backward formulas in torch ops (so they trace under torch.compile),
# computed in float32 / float64 and cast back to each input's dtype.


def _cam_setup_context(ctx, inputs, output):
    activations, gradients, method, relu = inputs
    ctx.save_for_backward(activations, gradients, output)
    ctx.method = method
    ctx.relu = relu


def _cam_backward(ctx, grad_out):
    activations, gradients, output = ctx.saved_tensors
    compute = _opmath(_promoted(activations, gradients))
    a = activations.to(compute)
    g = gradients.to(compute)
    gs = grad_out.to(compute)
    if ctx.relu:
        gs = gs * (output > 0).to(compute)
    gs4 = gs[:, None]
    method = ctx.method
    if method == "hirescam":
        grad_a, grad_g = gs4 * g, gs4 * a
    elif method == "layercam":
        grad_a, grad_g = gs4 * g.clamp(min=0), gs4 * a * (g > 0).to(compute)
    else:
        # Weighted-sum methods: map = sum_c w_c A_c, so d/dA picks up w directly, and the weights'
        # own dependence on A and G goes through r_c = sum_p gs_p A_cp.
        r = torch.einsum("bhw,bchw->bc", gs, a)[:, :, None, None]
        if method == "gradcam":
            w = g.mean(dim=(2, 3), keepdim=True)
            positions = g.shape[2] * g.shape[3]
            grad_a = gs4 * w
            grad_g = (r / positions).expand_as(g)
        elif method == "xgradcam":
            den = a.sum(dim=(2, 3), keepdim=True) + XGRADCAM_EPS
            w = (g * a).sum(dim=(2, 3), keepdim=True) / den
            grad_a = gs4 * w + r * (g - w) / den
            grad_g = r * a / den
        else:  # gradcam++
            sum_a = a.sum(dim=(2, 3), keepdim=True)
            g2 = g * g
            g3 = g2 * g
            den = 2 * g2 + sum_a * g3 + GRADCAM_PLUSPLUS_EPS
            nonzero = g != 0
            zero = torch.zeros_like(g)
            aij = torch.where(nonzero, g2 / den, zero)
            daij_dg = torch.where(nonzero, (2 * g * den - g2 * (4 * g + 3 * sum_a * g2)) / (den * den), zero)
            daij_dsum = torch.where(nonzero, -(g2 * g3) / (den * den), zero)
            relu_g = g.clamp(min=0)
            w = (relu_g * aij).sum(dim=(2, 3), keepdim=True)
            k = (relu_g * daij_dsum).sum(dim=(2, 3), keepdim=True)
            grad_a = gs4 * w + r * k
            grad_g = r * ((g > 0).to(compute) * aij + relu_g * daij_dg)
    return grad_a.to(activations.dtype), grad_g.to(gradients.dtype), None, None


torch.library.register_autograd("i2x::cam", _cam_backward, setup_context=_cam_setup_context)


def _upsample_setup_context(ctx, inputs, output):
    cam, size, normalize = inputs
    ctx.save_for_backward(cam)
    ctx.size = list(size)
    ctx.normalize = normalize


def _linear_resize_matrix(n_in, n_out, dtype, device) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of 1-D linear interpolation with align_corners=False."""
    eye = torch.eye(n_in, dtype=dtype, device=device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].t()


def _upsample_backward(ctx, grad_out):
    (cam,) = ctx.saved_tensors
    compute = _opmath(cam.dtype)
    x = cam.to(compute)
    gy = grad_out.to(compute)
    b, h, w = x.shape
    if ctx.normalize and gy.numel() > 0:
        up = F.interpolate(x[:, None], size=ctx.size, mode="bilinear", align_corners=False).reshape(b, -1)
        lo, lo_idx = up.min(dim=1, keepdim=True)
        hi, hi_idx = up.max(dim=1, keepdim=True)
        rng = hi - lo
        flat = x.reshape(b, -1)
        live = (rng > 0) & (flat.amax(dim=1, keepdim=True) > flat.amin(dim=1, keepdim=True))  # as the kernel
        inv = torch.where(live, 1.0 / torch.where(live, rng, torch.ones_like(rng)), torch.zeros_like(rng))
        y = (up - lo) * inv
        gyf = gy.reshape(b, -1)
        # y = (u - min) / (max - min): besides the direct 1/range term, the positions holding the
        # min and the max receive the gradient that flows through the range.
        gu = gyf * inv
        gu = gu.scatter_add(1, lo_idx, (gyf * (y - 1)).sum(dim=1, keepdim=True) * inv)
        gu = gu.scatter_add(1, hi_idx, -(gyf * y).sum(dim=1, keepdim=True) * inv)
        gy = gu.reshape(grad_out.shape)
    # Bilinear resizing is separable and linear: up = Ry @ x @ Rx^T with 1-D interpolation matrices,
    # so the gradient is Ry^T @ g @ Rx. The matrices come from 1-D linear interpolation of the
    # identity (the same sampling per axis), which also traces with symbolic sizes.
    ry = _linear_resize_matrix(h, ctx.size[0], compute, cam.device)
    rx = _linear_resize_matrix(w, ctx.size[1], compute, cam.device)
    grad = torch.einsum("Hh,bHW,Ww->bhw", ry, gy, rx)
    return grad.to(cam.dtype), None, None


torch.library.register_autograd("i2x::upsample_normalize", _upsample_backward, setup_context=_upsample_setup_context)


def _prototype_assign_setup_context(ctx, inputs, output):
    # Indices are discrete and the distances are a by-product for inspection: neither carries a
    # gradient, so inputs that require grad (features straight from a model) give outputs that
    # do not, instead of outputs whose backward silently drops the features' gradient.
    ctx.mark_non_differentiable(*output)


def _prototype_assign_backward(ctx, grad_index, grad_distance):
    return None, None, None, None


torch.library.register_autograd(
    "i2x::prototype_assign", _prototype_assign_backward, setup_context=_prototype_assign_setup_context
)


def _prototype_pool_setup_context(ctx, inputs, output):
    saliency, assignment, _ = inputs
    _, counts = output
    ctx.save_for_backward(assignment, counts)
    ctx.saliency_dtype = saliency.dtype
    ctx.saliency_shape = saliency.shape


def _prototype_pool_backward(ctx, grad_intensity, _grad_counts):
    assignment, counts = ctx.saved_tensors
    compute = _opmath(ctx.saliency_dtype)
    b = assignment.shape[0]
    per_position = grad_intensity.to(compute) / counts.clamp(min=1).to(compute)
    grad = torch.gather(per_position, 1, assignment.reshape(b, -1).long()).reshape(ctx.saliency_shape)
    return grad.to(ctx.saliency_dtype), None, None


torch.library.register_autograd(
    "i2x::prototype_pool", _prototype_pool_backward, setup_context=_prototype_pool_setup_context
)


def _saliency_pool_setup_context(ctx, inputs, output):
    features, saliency = inputs
    ctx.save_for_backward(features, saliency, output)


def _saliency_pool_backward(ctx, grad_out):
    features, saliency, output = ctx.saved_tensors
    compute = _opmath(_promoted(features, saliency))
    f = features.to(compute)
    s = saliency.to(compute)
    g = grad_out.to(compute)
    total = s.sum(dim=(1, 2))
    live = total != 0
    inv = torch.where(live, 1.0 / torch.where(live, total, torch.ones_like(total)), torch.zeros_like(total))
    grad_f = g[:, :, None, None] * (s * inv[:, None, None])[:, None]
    grad_s = ((torch.einsum("bc,bchw->bhw", g, f) - (g * output.to(compute)).sum(dim=1)[:, None, None])
              * inv[:, None, None])
    return grad_f.to(features.dtype), grad_s.to(saliency.dtype)


torch.library.register_autograd("i2x::saliency_pool", _saliency_pool_backward,
                                setup_context=_saliency_pool_setup_context)
