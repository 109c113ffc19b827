"""i2x.ops.cam against i2x.reference.cam, hand-computed maps and numerical gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    FLOAT_DTYPES,
    assert_close,
    check_layout,
    dtype_id,
    make_layout,
    randn,
)

from i2x import ops
from i2x import reference

METHODS = reference.CAM_METHODS
assert METHODS == ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def cam_inputs(shape, gen, dtype=torch.float32, grad_dtype=None, device="cpu", method="gradcam"):
    """Activations and gradients like a CNN's: gradients of both signs with some exact zeros (the
    ``g != 0`` branch of gradcam++); activations with some exact zeros, and non-negative for
    gradcam++ / xgradcam (post-ReLU maps) whose weights divide by the activations' spatial sum and
    are ill-conditioned where that sum is near 0."""
    a = randn(shape, gen, torch.float64)
    g = randn(shape, gen, torch.float64)
    if method in ("gradcam++", "xgradcam"):
        a = a.abs()
    a = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.15, torch.zeros_like(a), a)
    g = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.10, torch.zeros_like(g), g)
    return a.to(dtype).to(device), g.to(grad_dtype or dtype).to(device)


def cam_scale(a: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """[B, h, w] magnitude of the terms the map sums (float64): the scale of its rounding error."""
    a64, g64 = a.double().cpu(), g.double().cpu()
    if method == "layercam":
        terms = g64.clamp(min=0) * a64
    elif method == "hirescam":
        terms = g64 * a64
    else:
        if method == "gradcam":
            w = g64.abs().mean(dim=(2, 3))  # the mean's own error scales with mean |g|
        elif method == "xgradcam":
            w = (g64 * a64).abs().sum(dim=(2, 3)) / (a64.sum(dim=(2, 3)).abs() + reference.XGRADCAM_EPS)
        else:
            w = reference.cam_channel_weights(a64, g64, method).abs()
        terms = w[:, :, None, None] * a64
    return terms.abs().sum(dim=1).to(a.device)


def check_cam(a, g, method, relu, tag="cam"):
    a_before, g_before = a.clone(), g.clone()
    out = ops.cam(a, g, method, relu)
    expected = reference.cam(a, g, method, relu)
    assert_close(out, expected, scale=cam_scale(a, g, method), tag=tag)
    # inputs untouched
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(a_before))
    assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(g_before))
    if relu:
        assert (out >= 0).all()
    return out


# --------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("method", METHODS)
def test_cam_matches_reference(method, relu, dtype, layout, device, gen):
    a, g = cam_inputs((2, 6, 3, 5), gen, dtype, device=device, method=method)
    a, g = make_layout(a, layout), make_layout(g, layout)
    check_layout(a, layout)
    out = check_cam(a, g, method, relu, tag=f"cam/{method}")
    assert out.shape == (2, 3, 5) and out.dtype == dtype and out.device.type == device
    if not relu and method != "gradcam++":
        # the maps are not trivially non-negative, so relu=False is really exercised (gradcam++
        # maps of non-negative activations are non-negative: its weights are)
        assert (out < 0).any()


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (3, 4, 1, 1), (2, 1, 3, 5), (2, 3, 1, 7), (2, 3, 6, 1), (3, 16, 14, 14), (1, 2048, 7, 7)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("method", METHODS)
def test_cam_shapes(method, shape, device, gen):
    for dtype in (torch.float32, torch.float64):
        a, g = cam_inputs(shape, gen, dtype, device=device, method=method)
        for relu in (True, False):
            out = check_cam(a, g, method, relu, tag=f"cam/{method}")
            assert out.shape == (shape[0], shape[2], shape[3])


@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "sliced"), ("sliced", "channels_last")])
@pytest.mark.parametrize("method", METHODS)
def test_cam_mixed_layouts(method, layouts, device, gen):
    a, g = cam_inputs((3, 5, 4, 6), gen, torch.float32, device=device, method=method)
    check_cam(make_layout(a, layouts[0]), make_layout(g, layouts[1]), method, False, tag=f"cam/{method}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("method", METHODS)
def test_cam_empty_batch(method, dtype, device):
    a = torch.empty(0, 4, 3, 5, dtype=dtype, device=device)
    out = ops.cam(a, a.clone(), method)
    assert out.shape == (0, 3, 5)
    assert out.dtype == dtype and out.device == a.device


@pytest.mark.parametrize(
    "dtypes,expected",
    [
        ((torch.float16, torch.float32), torch.float32),
        ((torch.float32, torch.float16), torch.float32),
        ((torch.bfloat16, torch.float32), torch.float32),
        ((torch.bfloat16, torch.float16), torch.float32),
        ((torch.float32, torch.float64), torch.float64),
        ((torch.float16, torch.float16), torch.float16),
        ((torch.bfloat16, torch.bfloat16), torch.bfloat16),
    ],
    ids=lambda v: "-".join(dtype_id(d) for d in v) if isinstance(v, tuple) else dtype_id(v),
)
@pytest.mark.parametrize("method", METHODS)
def test_cam_dtype_promotion(method, dtypes, expected, device, gen):
    a, g = cam_inputs((2, 5, 3, 4), gen, dtypes[0], grad_dtype=dtypes[1], device=device, method=method)
    out = check_cam(a, g, method, True, tag=f"cam/{method}")
    assert out.dtype == expected


# --------------------------------------------------------------------------------------------
# Hand-computed maps. B=1, C=2, 2x2:
#   A0 = [[1, 2], [3, 4]]   G0 = [[ 1, 1], [1,  1]]
#   A1 = [[2, 1], [1, 0]]   G1 = [[-2, 0], [0, -2]]
# gradcam:   w = mean(G) = (1, -1)          -> A0 - A1 = [[-1, 1], [2, 4]]
# hirescam:  sum_c G*A = [[1-4, 2], [3, 4]]  = [[-3, 2], [3, 4]]
# layercam:  sum_c relu(G)*A = A0            = [[ 1, 2], [3, 4]]
# xgradcam:  w_c = sum(G*A) / (sum A + 1e-7): w0 = 10 / (10 + 1e-7), w1 = -4 / (4 + 1e-7)
#            -> w0 A0 + w1 A1 ~ [[-1, 1], [2, 4]]
# gradcam++: channel 0: g = 1, sum A = 10: alpha = 1 / (2 + 10 + 1e-6) at each of 4 positions,
#            w0 = 4 / (12 + 1e-6); channel 1: relu(G1) = 0 -> w1 = 0. -> w0 A0 ~ A0 / 3
# relu=True zeroes the negative entries.

_A0 = [[1.0, 2.0], [3.0, 4.0]]
_A1 = [[2.0, 1.0], [1.0, 0.0]]
_W_XGRAD = (10 / (10 + 1e-7), -4 / (4 + 1e-7))
_W_PP = 4 / (12 + 1e-6)
HAND = {
    "gradcam": [[-1.0, 1.0], [2.0, 4.0]],
    "hirescam": [[-3.0, 2.0], [3.0, 4.0]],
    "layercam": [[1.0, 2.0], [3.0, 4.0]],
    "xgradcam": [[_W_XGRAD[0] * a0 + _W_XGRAD[1] * a1 for a0, a1 in zip(r0, r1)] for r0, r1 in zip(_A0, _A1)],
    "gradcam++": [[_W_PP * a0 for a0 in r0] for r0 in _A0],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("method", METHODS)
def test_cam_hand_values(method, relu, dtype, device):
    a = torch.tensor([[_A0, _A1]], dtype=dtype, device=device)
    g = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, 0.0], [0.0, -2.0]]]], dtype=dtype, device=device)
    expected = torch.tensor([HAND[method]], dtype=dtype, device=device)
    if relu:
        expected = expected.clamp(min=0)
    out = ops.cam(a, g, method, relu)
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert_close(out, expected, rtol=tol, atol=tol, scale=4.0, tag="cam/hand")


# --------------------------------------------------------------------------------------------
# Gradients


def gradcheck_inputs(method, relu, seed):
    """float64 inputs away from the non-differentiable points: gradients away from 0 (relu(g) in
    gradcam++ and layercam), activations' spatial sums (which gradcam++ and xgradcam divide by)
    away from 0 and from gradcam++'s poles, and, with relu, every map value away from 0 (the ReLU
    kink) with both signs present."""
    gen = torch.Generator().manual_seed(1000 + seed)
    shape = (2, 3, 2, 3)
    for _ in range(500):
        a = torch.randn(shape, generator=gen, dtype=torch.float64)
        if method in ("gradcam++", "xgradcam"):
            a = a + 1.0  # mostly positive, some negative entries: maps of both signs
            if a.sum(dim=(2, 3)).min() < 1.0:
                continue
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.sign(g) * (0.25 + g.abs())
        m = reference.cam(a, g, method, relu=False)
        if method == "gradcam++":
            s = a.sum(dim=(2, 3), keepdim=True)
            den = 2 * g * g + s * g**3
            if den.abs().min() < 0.1:
                continue
        if not relu or m.abs().min() > 0.02:
            if relu and not ((m > 0).any() and (m < 0).any()):
                continue  # want both sides of the kink represented
            return a.requires_grad_(), g.requires_grad_()
    raise AssertionError("could not draw inputs away from the kinks")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("method", METHODS)
def test_cam_gradcheck(method, relu, seed):
    a, g = gradcheck_inputs(method, relu, seed)
    assert torch.autograd.gradcheck(lambda x, y: ops.cam(x, y, method, relu), (a, g), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_cam_backward_matches_reference_autograd(method, device):
    """The analytic backward against autograd through the reference (float64), on the device."""
    a, g = gradcheck_inputs(method, True, 7)
    a, g = a.detach().to(device).requires_grad_(), g.detach().to(device).requires_grad_()
    w = torch.randn(a.shape[0], a.shape[2], a.shape[3], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = w.to(device)
    ga, gg = torch.autograd.grad((ops.cam(a, g, method) * w).sum(), (a, g))
    ra, rg = torch.autograd.grad((reference.cam(a, g, method) * w).sum(), (a, g))
    assert_close(ga, ra, tag="cam/backward")
    assert_close(gg, rg, tag="cam/backward")


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)],
                         ids=lambda v: "-".join(dtype_id(d) for d in v))
@pytest.mark.parametrize("method", METHODS)
def test_cam_backward_dtypes(method, dtypes, device, gen):
    """Gradients come back in each input's own dtype, finite, close to the float64 gradient."""
    a64, g64 = gradcheck_inputs(method, True, 3)
    a = a64.detach().to(dtypes[0]).to(device).requires_grad_()
    g = g64.detach().to(dtypes[1]).to(device).requires_grad_()
    out = ops.cam(a, g, method)
    assert out.dtype == torch.promote_types(*dtypes)
    out.sum().backward()
    assert a.grad.dtype == dtypes[0] and g.grad.dtype == dtypes[1]
    # float64 gradient at the same (rounded) inputs
    a_r = a.detach().double().cpu().requires_grad_()
    g_r = g.detach().double().cpu().requires_grad_()
    ra, rg = torch.autograd.grad(reference.cam(a_r, g_r, method).sum(), (a_r, g_r))
    for got, ref, dt in ((a.grad, ra, dtypes[0]), (g.grad, rg, dtypes[1])):
        # one rounding of a float32 gradient to the input's dtype (half an ulp), plus float32 error
        rel = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}[dt]
        assert torch.isfinite(got).all()
        err = (got.double().cpu() - ref).abs().max().item()
        assert err <= rel * max(ref.abs().max().item(), 1.0), (err, rel)
