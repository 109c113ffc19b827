"""i2x.ops.upsample_normalize against i2x.reference.upsample_normalize and F.interpolate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FLOAT_DTYPES, assert_close, check_layout, dtype_id, make_layout, randn

from i2x import ops
from i2x import reference


def up_scale(cam: torch.Tensor, size, normalize: bool) -> torch.Tensor:
    """[B, 1, 1] error scale: bilinear mixes values up to max |x|; normalising divides the
    error of (u - min) by the image's range."""
    x = cam.double().cpu()
    mag = x.abs().amax(dim=(1, 2), keepdim=True)
    if not normalize:
        return mag.to(cam.device)
    up = F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    rng = up.amax(dim=(1, 2), keepdim=True) - up.amin(dim=(1, 2), keepdim=True)
    live = rng > CONSTANT_RTOL * mag  # a constant image must come out exactly 0: no slack
    return torch.where(live, mag / torch.where(live, rng, torch.ones_like(rng)), torch.ones_like(rng)).to(cam.device)


# F.interpolate is not exact on constant input: a 1x1 map resized comes back with 1-ulp ripples
# (float32: up to 3e-8 on 0.3). A range that small is a constant image, which must normalise to 0.
CONSTANT_RTOL = 1e-12


def interpolate64(cam: torch.Tensor, size, normalize: bool) -> torch.Tensor:
    """Independent truth: F.interpolate in float64, then a per-image min-max written out here."""
    up = F.interpolate(cam.double().cpu()[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    if normalize:
        out = torch.zeros_like(up)
        for i in range(up.shape[0]):
            lo, hi = up[i].min(), up[i].max()
            if hi - lo > CONSTANT_RTOL * up[i].abs().max():
                out[i] = (up[i] - lo) / (hi - lo)
        up = out
    return up


SIZES = [
    ((1, 1), (1, 1)),
    ((1, 1), (4, 6)),
    ((3, 5), (7, 11)),  # upsample, odd
    ((7, 7), (224, 224)),  # the usual CAM -> image resize
    ((2, 3), (2, 3)),  # identity
    ((8, 8), (3, 3)),  # downsample
    ((16, 12), (5, 17)),  # down in h, up in w
    ((7, 4), (4, 9)),
    ((16, 16), (1, 1)),
    ((1, 9), (6, 2)),
]


def size_id(v):
    return f"{v[0][0]}x{v[0][1]}to{v[1][0]}x{v[1][1]}"


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_upsample_matches_reference(normalize, dtype, layout, device, gen):
    cam = make_layout(randn((3, 5, 7), gen, dtype, device), layout)
    check_layout(cam, layout)
    before = cam.clone()
    out = ops.upsample_normalize(cam, (11, 13), normalize)
    expected = reference.upsample_normalize(cam, (11, 13), normalize)
    assert out.shape == (3, 11, 13) and out.dtype == dtype and out.device == cam.device
    assert_close(out, expected, scale=up_scale(cam, (11, 13), normalize), tag=f"upsample/{'norm' if normalize else 'raw'}")
    assert torch.equal(cam, before)


@pytest.mark.parametrize("sizes", SIZES, ids=size_id)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_upsample_sizes(sizes, normalize, device, gen):
    (h, w), size = sizes
    for dtype in (torch.float32, torch.float64):
        cam = randn((2, h, w), gen, dtype, device)
        out = ops.upsample_normalize(cam, size, normalize)
        if normalize and h * w == 1:
            # The reference min-maxes F.interpolate's rounding ripples on a constant 1x1 map and
            # returns 0.5 / 1.0 instead of the all-zeros its docstring promises; the spec wins.
            expected = torch.zeros(2, *size, dtype=dtype, device=device)
        else:
            expected = reference.upsample_normalize(cam, size, normalize)
        assert_close(out, expected, scale=up_scale(cam, size, normalize), tag=f"upsample/{'norm' if normalize else 'raw'}")


@pytest.mark.parametrize("sizes", SIZES, ids=size_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_upsample_vs_interpolate(sizes, dtype, device, gen):
    """Against F.interpolate(bilinear, align_corners=False) in float64 directly, not the reference.
    The op computes in float32 (float64 for float64) and rounds once to the output dtype."""
    (h, w), size = sizes
    cam = randn((2, h, w), gen, dtype, device)
    for normalize in (False, True):
        out = ops.upsample_normalize(cam, size, normalize)
        truth = interpolate64(cam, size, normalize)
        tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}.get(
            dtype, None
        )
        # half outputs: the op's float32 result rounded once
        tol = tol or dict(rtol=torch.finfo(dtype).eps, atol=1e-6)
        assert out.dtype == dtype
        assert_close(
            out.double(), truth.to(out.device), scale=up_scale(cam, size, normalize), tag=f"upsample/interpolate-{dtype_id(dtype)}", **tol
        )


def test_upsample_size_forms(device, gen):
    """size as a tuple, a list, a torch.Size or numpy ints: the same result."""
    import numpy as np

    cam = randn((2, 3, 4), gen, torch.float32, device)
    want = ops.upsample_normalize(cam, (6, 5))
    for size in ([6, 5], torch.Size([6, 5]), (np.int64(6), np.int32(5))):
        assert torch.equal(ops.upsample_normalize(cam, size), want)
    assert want.shape == (2, 6, 5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_upsample_empty_batch(normalize, dtype, device):
    out = ops.upsample_normalize(torch.empty(0, 4, 5, dtype=dtype, device=device), (8, 3), normalize)
    assert out.shape == (0, 8, 3) and out.dtype == dtype and out.device.type == device


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_upsample_constant_maps_become_zeros(dtype, device, gen):
    cam = torch.empty(4, 3, 5, dtype=dtype, device=device)
    cam[0] = 3.75
    cam[1] = 0.0
    cam[2] = -2.5
    cam[3] = randn((3, 5), gen, dtype, device)  # a live image beside the constant ones
    out = ops.upsample_normalize(cam, (9, 7))
    assert not torch.isnan(out).any()
    assert torch.equal(out[:3], torch.zeros(3, 9, 7, dtype=dtype, device=device))
    assert out[3].min() == 0 and out[3].max() > 0.99
    raw = ops.upsample_normalize(cam, (9, 7), normalize=False)
    for i, v in enumerate((3.75, 0.0, -2.5)):
        assert torch.equal(raw[i], torch.full((9, 7), v, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_upsample_single_pixel(dtype, device):
    """A 1x1 map is constant: normalised it is all zeros, raw it is its value everywhere."""
    cam = torch.tensor([[[0.5]], [[-7.0]]], dtype=dtype, device=device)
    assert torch.equal(ops.upsample_normalize(cam, (5, 3)), torch.zeros(2, 5, 3, dtype=dtype, device=device))
    raw = ops.upsample_normalize(cam, (5, 3), normalize=False)
    assert torch.equal(raw, cam.expand(2, 5, 3))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", [(7, 7), (224, 160), (3, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_upsample_normalized_range(size, dtype, device, gen):
    """Each non-constant image spans exactly [0, 1]: min 0, max 1 ((max - min) / (max - min) is
    exactly 1 in IEEE arithmetic), nothing outside."""
    cam = randn((5, 7, 7), gen, dtype, device) * torch.tensor([1.0, 1e-3, 1e3, 1.0, 50.0], device=device).to(dtype)[:, None, None]
    cam[3] = cam[3] - 100.0
    out = ops.upsample_normalize(cam, size)
    assert out.dtype == dtype
    assert (out >= 0).all() and (out <= 1).all()
    flat = out.reshape(5, -1)
    assert torch.equal(flat.amin(dim=1), torch.zeros(5, dtype=dtype, device=device))
    assert torch.equal(flat.amax(dim=1), torch.ones(5, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_upsample_nan_image_is_all_nan(dtype, device, gen):
    """A NaN in one image makes that whole (normalised) image NaN; the others are unaffected."""
    cam = randn((3, 4, 5), gen, dtype, device)
    cam[1, 2, 3] = float("nan")
    out = ops.upsample_normalize(cam, (8, 10))
    assert torch.isnan(out[1]).all(), f"{int(torch.isnan(out[1]).sum())} of 80 NaN"
    clean = ops.upsample_normalize(cam[[0, 2]], (8, 10))
    assert torch.equal(out[[0, 2]], clean)
    assert not torch.isnan(clean).any()
    assert_close(out[[0, 2]], reference.upsample_normalize(cam[[0, 2]], (8, 10)),
                 scale=up_scale(cam[[0, 2]], (8, 10), True), tag="upsample/norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_upsample_nan_raw_spreads_like_interpolate(dtype, device, gen):
    """Without normalisation a NaN reaches the output pixels F.interpolate samples it into."""
    cam = randn((2, 4, 5), gen, dtype, device)
    cam[1, 2, 3] = float("nan")
    out = ops.upsample_normalize(cam, (8, 10), normalize=False)
    truth = interpolate64(cam, (8, 10), False).to(dtype).to(device)
    assert torch.isnan(out[1]).any() and not torch.isnan(out[1]).all()
    assert_close(out, truth, scale=up_scale(torch.nan_to_num(cam), (8, 10), False), tag="upsample/raw")


# --------------------------------------------------------------------------------------------
# Gradients


def _unique_extrema(cam: torch.Tensor, size) -> bool:
    up = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False).reshape(cam.shape[0], -1)
    s = up.sort(dim=1).values
    return bool(((s[:, 1] - s[:, 0]) > 1e-3).all() and ((s[:, -1] - s[:, -2]) > 1e-3).all())


@pytest.mark.parametrize("shapes", [((2, 3, 4), (5, 7)), ((2, 6, 5), (3, 4)), ((1, 2, 3), (4, 5))],
                         ids=lambda v: f"{v[0][1]}x{v[0][2]}to{v[1][0]}x{v[1][1]}")
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_upsample_gradcheck(normalize, shapes):
    shape, size = shapes
    gen = torch.Generator().manual_seed(5)
    for _ in range(100):
        cam = torch.randn(shape, generator=gen, dtype=torch.float64)
        if _unique_extrema(cam, size):  # min/max at a unique position: differentiable there
            break
    else:
        raise AssertionError("no input with unique extrema")
    cam.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.upsample_normalize(x, size, normalize), (cam,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_upsample_backward_matches_reference_autograd(normalize, device, gen):
    cam = randn((3, 4, 6), gen, torch.float64, device).requires_grad_()
    w = randn((3, 9, 11), gen, torch.float64, device)
    (got,) = torch.autograd.grad((ops.upsample_normalize(cam, (9, 11), normalize) * w).sum(), cam)
    (ref,) = torch.autograd.grad((reference.upsample_normalize(cam, (9, 11), normalize) * w).sum(), cam)
    assert_close(got, ref, tag="upsample/backward")
