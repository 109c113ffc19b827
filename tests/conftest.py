"""Shared fixtures and helpers for the compiled-op tests.

Truths the ops are compared against: ``i2x.reference`` (pure-torch twins computed on the same
inputs), hand-computed values, and plain ``F.interpolate``. Tolerances are per dtype and follow
from how the kernels compute (see ``TOL``); every comparison also checks dtype, shape and device.
"""

from __future__ import annotations

import pathlib
import sys
from collections import defaultdict

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def _prefer_installed_package() -> None:
    # `python -m pytest` run from the repository root puts the root on sys.path, so `import i2x`
    # would find the unbuilt source package (no _C, no _build_config) before the installed one.
    # These tests are about the compiled package, so drop the source tree from the path unless it
    # has been built in place.
    if (REPO / "i2x" / "_build_config.py").exists():
        return
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != REPO]


_prefer_installed_package()

# --------------------------------------------------------------------------------------------
# Devices

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available on this machine")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA_SKIP])]


def _skip_if_no_cuda_kernels(device: str) -> None:
    if device == "cuda":
        import i2x

        if not i2x.build_info()["cuda"]:
            pytest.skip("i2x was built without its CUDA kernels (I2X_CUDA=1 was not set)")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    _skip_if_no_cuda_kernels(request.param)
    return request.param


@pytest.fixture
def cuda_device() -> str:
    """For tests that need a second device (cross-device errors)."""
    if not HAS_CUDA:
        pytest.skip("CUDA is not available on this machine")
    _skip_if_no_cuda_kernels("cuda")
    return "cuda"


# --------------------------------------------------------------------------------------------
# Random inputs

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS.get(dtype, str(dtype).replace("torch.", ""))


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(20240611)


def randn(shape, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal samples drawn in float64 on the CPU (device independent), then cast and moved."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype).to(device)


def rand(shape, gen: torch.Generator, dtype=torch.float32, device="cpu", low=0.0, high=1.0) -> torch.Tensor:
    x = torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * (high - low) + low
    return x.to(dtype).to(device)


# --------------------------------------------------------------------------------------------
# Layouts: the same values with other strides.

LAYOUTS_4D = ("contiguous", "channels_last", "transposed", "sliced")
LAYOUTS_ND = ("contiguous", "transposed", "sliced")


def _gap_fill(dtype: torch.dtype):
    # What the skipped elements of a sliced tensor hold: NaN for floats (a kernel that reads them
    # produces NaN), a huge value for indices (out of range).
    return float("nan") if dtype.is_floating_point else 2**30


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout.

    contiguous     row-major copy
    channels_last  4-D only: NHWC storage
    transposed     the last two dims stored column-major (transpose, copy, transpose back)
    sliced         every other element of dim 1 and of the last dim of a larger buffer (step 2),
                   the skipped elements set to NaN / an out-of-range index
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        assert t.dim() == 4, "channels_last needs a 4-D tensor"
        out = t.contiguous(memory_format=torch.channels_last)
        return out
    if layout == "transposed":
        assert t.dim() >= 2
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        dims = sorted({1, t.dim() - 1}) if t.dim() >= 2 else [0]
        big_shape = list(t.shape)
        for d in dims:
            big_shape[d] = 2 * t.shape[d]
        big = torch.full(big_shape, _gap_fill(t.dtype), dtype=t.dtype, device=t.device)
        index = [slice(None)] * t.dim()
        for d in dims:
            index[d] = slice(None, None, 2)
        view = big[tuple(index)]
        view.copy_(t)
        return view
    raise ValueError(layout)


def check_layout(t: torch.Tensor, layout: str) -> None:
    """Guards the helper itself: the layouts really are what they claim (when the shape allows)."""
    if layout == "channels_last" and t.numel() > 0 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1:
        assert not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    if layout in ("transposed", "sliced") and t.shape[-1] > 1 and t.shape[-2] > 1:
        assert not t.is_contiguous()


# --------------------------------------------------------------------------------------------
# Tolerances
#
# Every comparison asserts, elementwise, |actual - expected| <= rtol * |expected| + atol * scale,
# where ``scale`` is the magnitude of the terms the result was summed from (computed by each test
# in float64), so that ``atol`` is a relative accumulation error and does not depend on the data's
# magnitude:
#   float64: both sides accumulate in float64 in different orders: ~ n * 1.1e-16.
#   float32: both sides accumulate in float32 in different orders: ~ n * 6e-8 (n up to 2048).
#   float16 / bfloat16: the ops compute in float32 and round once to the output dtype, as the
#       reference does, so the two can differ by the float32 error plus one rounding step of the
#       output: 1 ulp = 2^-10 (float16) / 2^-7 (bfloat16) of the value, hence rtol just above that.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-5),
    torch.float16: dict(rtol=1.0e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8.0e-3, atol=1e-5),
}

# Largest |actual - expected| / (rtol |expected| + atol scale) and largest |actual - expected| seen,
# per (tag, dtype): printed in the terminal summary so the tolerances can be judged.
MEASURED: dict = defaultdict(lambda: [0.0, 0.0])


# Tolerances of explainer map comparisons (float32; tests/test_cam.py, test_cam_peers.py and
# test_timm.py), measured over tests/test_cam.py (see the terminal summary printed below, tags "cam:*"):
#   raw maps: |diff| <= CAM_RAW_RTOL |expected| + CAM_RAW_ATOL max|expected|. The compiled op and the twin
#       sum the same C products in different orders (C <= 256 here): measured worst 0.055 of this
#       tolerance, i.e. about 1e-6 of max|expected| (resnet18 layer3, gradcam++; max |diff| 4.8e-6
#       on a tiny-CNN gradcam++ map of max ~100).
#   normalised maps in [0, 1]: |diff| <= CAM_NORM_ATOL. The min-max divides the raw error by the
#       map's range (>= 1e-3 max, asserted by assert_not_degenerate): measured worst 1.1e-6.
# The explainer's own activations and gradients are bit-identical to the full-graph ones in every
# case measured (the differences above all come from compiled op vs twin).
CAM_RAW_RTOL, CAM_RAW_ATOL = 1e-5, 1e-5
CAM_NORM_ATOL = 2e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, scale=None, tag: str = "", rtol=None,
                 atol=None, check_dtype=True) -> None:
    """Asserts ``actual`` matches ``expected`` (dtype, shape, device, NaN pattern, values).

    ``scale``: tensor broadcastable to ``expected`` (or a number) giving the magnitude of the summed
    terms; defaults to max |expected| (at least 1e-30).
    """
    assert isinstance(actual, torch.Tensor), type(actual)
    if check_dtype:
        assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.device == expected.device, f"device {actual.device} != expected {expected.device}"
    tol = TOL.get(expected.dtype, TOL[torch.float32])
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if e.numel() == 0:
        return
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"NaN pattern differs: {int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} in expected"
    )
    if scale is None:
        scale = max(float(e[~nan_e].abs().max()) if (~nan_e).any() else 0.0, 1e-30)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to("cpu", torch.float64)
    bound = rtol * e.abs() + atol * scale
    bound = torch.broadcast_to(bound, e.shape)
    ok = ~nan_e
    err = (a - e).abs()
    both_inf = torch.isinf(e) & (a == e)
    err = torch.where(both_inf | nan_e, torch.zeros_like(err), err)
    ratio = torch.where(ok, err / bound.clamp_min(1e-300), torch.zeros_like(err))
    key = (tag, DTYPE_IDS.get(expected.dtype, str(expected.dtype)))
    worst = float(ratio.max())
    MEASURED[key][0] = max(MEASURED[key][0], worst)
    MEASURED[key][1] = max(MEASURED[key][1], float(err.max()))
    if worst > 1.0:
        i = int(ratio.argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), e.shape))
        bad = int((ratio > 1).sum())
        raise AssertionError(
            f"{bad} of {e.numel()} elements out of tolerance (rtol={rtol}, atol={atol} x scale); worst at "
            f"{idx}: actual {a[idx].item()!r}, expected {e[idx].item()!r}, |diff| {err[idx].item():.3e}, "
            f"allowed {bound[idx].item():.3e} ({worst:.2f}x the tolerance)"
        )


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("i2x: worst error seen per comparison (fraction of the tolerance, max |diff|)")
    for (tag, dt), (ratio, err) in sorted(MEASURED.items()):
        terminalreporter.write_line(f"{tag or '-':<32} {dt:<5} {ratio:8.3f} of tol   max|diff| {err:.3e}")
