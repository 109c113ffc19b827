"""Bad inputs: each must raise the documented exception type with a message that names the op and
the offending argument (tensor checks come from the kernels as RuntimeError; plain-Python
argument checks from the wrappers as ValueError / TypeError).

Cross-device cases need a second real device: a "meta" tensor does not reach the kernels' device
check (the dispatcher routes any call holding a meta tensor to the fake kernel, which returns a
result without checking devices), so they run on CUDA only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from i2x import ops

F32 = torch.float32


def t(*shape, dtype=F32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


def idx(*shape, value=0, dtype=torch.int64):
    return torch.full(shape, value, dtype=dtype)


A4 = t(2, 3, 4, 5)

# (id, thunk, exception, substrings that must all appear in the message)
CASES = [
    # ---------------------------------------------------------------- cam
    ("cam/activations-3d", lambda: ops.cam(t(3, 4, 5), t(3, 4, 5)), RuntimeError, ["cam", "activations", "4-D"]),
    ("cam/activations-5d", lambda: ops.cam(t(1, 2, 3, 4, 5), t(1, 2, 3, 4, 5)), RuntimeError, ["cam", "activations", "4-D"]),
    ("cam/gradients-3d", lambda: ops.cam(A4, t(3, 4, 5)), RuntimeError, ["cam", "gradients", "4-D"]),
    ("cam/shape-mismatch", lambda: ops.cam(A4, t(2, 3, 4, 6)), RuntimeError, ["cam", "activations", "gradients", "same shape", "[2, 3, 4, 6]"]),
    ("cam/channel-mismatch", lambda: ops.cam(A4, t(2, 4, 4, 5)), RuntimeError, ["cam", "activations", "gradients", "same shape"]),
    ("cam/int-activations", lambda: ops.cam(A4.int(), A4), RuntimeError, ["cam", "activations", "float32"]),
    ("cam/long-gradients", lambda: ops.cam(A4, A4.long()), RuntimeError, ["cam", "gradients", "float32"]),
    ("cam/bool-activations", lambda: ops.cam(A4.bool(), A4), RuntimeError, ["cam", "activations", "float32"]),
    ("cam/complex-gradients", lambda: ops.cam(A4, A4.to(torch.complex64)), RuntimeError, ["cam", "gradients", "float32"]),
    ("cam/unknown-method", lambda: ops.cam(A4, A4, "scorecam"), ValueError, ["cam", "method", "scorecam", "gradcam++"]),
    ("cam/method-case", lambda: ops.cam(A4, A4, "GradCAM"), ValueError, ["cam", "method", "GradCAM"]),
    ("cam/unknown-method-op", lambda: torch.ops.i2x.cam(A4, A4, "scorecam", True), RuntimeError, ["cam", "method", "scorecam"]),
    ("cam/list-activations", lambda: ops.cam([[1.0]], A4), TypeError, ["cam", "activations", "Tensor"]),
    ("cam/numpy-gradients", lambda: ops.cam(A4, np.ones((2, 3, 4, 5), np.float32)), TypeError, ["cam", "gradients", "Tensor"]),
    ("cam/none-gradients", lambda: ops.cam(A4, None), TypeError, ["cam", "gradients"]),
    # ---------------------------------------------------------------- upsample_normalize
    ("upsample/cam-4d", lambda: ops.upsample_normalize(A4, (8, 8)), RuntimeError, ["upsample_normalize", "cam", "3-D"]),
    ("upsample/cam-2d", lambda: ops.upsample_normalize(t(4, 5), (8, 8)), RuntimeError, ["upsample_normalize", "cam", "3-D"]),
    ("upsample/cam-int", lambda: ops.upsample_normalize(t(2, 4, 5, dtype=torch.int32), (8, 8)), RuntimeError, ["upsample_normalize", "cam", "float32"]),
    ("upsample/cam-empty-grid", lambda: ops.upsample_normalize(t(2, 0, 5), (8, 8)), RuntimeError, ["upsample_normalize", "cam", "[2, 0, 5]"]),
    ("upsample/cam-list", lambda: ops.upsample_normalize([[[1.0]]], (8, 8)), TypeError, ["upsample_normalize", "cam", "Tensor"]),
    ("upsample/size-zero", lambda: ops.upsample_normalize(t(2, 4, 5), (0, 5)), ValueError, ["upsample_normalize", "size", "(0, 5)"]),
    ("upsample/size-negative", lambda: ops.upsample_normalize(t(2, 4, 5), (-1, 4)), ValueError, ["upsample_normalize", "size", "(-1, 4)"]),
    ("upsample/size-one-int", lambda: ops.upsample_normalize(t(2, 4, 5), (5,)), ValueError, ["upsample_normalize", "size", "(5,)"]),
    ("upsample/size-three", lambda: ops.upsample_normalize(t(2, 4, 5), (5, 5, 5)), ValueError, ["upsample_normalize", "size"]),
    ("upsample/size-str", lambda: ops.upsample_normalize(t(2, 4, 5), "ab"), ValueError, ["upsample_normalize", "size", "'ab'"]),
    ("upsample/size-int", lambda: ops.upsample_normalize(t(2, 4, 5), 7), ValueError, ["upsample_normalize", "size"]),
    ("upsample/size-float", lambda: ops.upsample_normalize(t(2, 4, 5), (2.5, 3)), TypeError, ["upsample_normalize", "size", "2.5"]),
    ("upsample/size-bool", lambda: ops.upsample_normalize(t(2, 4, 5), (True, 3)), TypeError, ["upsample_normalize", "size"]),
    ("upsample/size-zero-op", lambda: torch.ops.i2x.upsample_normalize(t(2, 4, 5), [0, 5], True), RuntimeError, ["upsample_normalize", "size", "[0, 5]"]),
    ("upsample/size-negative-op", lambda: torch.ops.i2x.upsample_normalize(t(2, 4, 5), [-1, 4], True), RuntimeError, ["upsample_normalize", "size"]),
    ("upsample/size-short-op", lambda: torch.ops.i2x.upsample_normalize(t(2, 4, 5), [5], True), RuntimeError, ["upsample_normalize", "size"]),
    # ---------------------------------------------------------------- prototype_assign
    ("assign/features-3d", lambda: ops.prototype_assign(t(2, 3, 4), t(5, 3)), RuntimeError, ["prototype_assign", "features", "[N, C]", "3-D"]),
    ("assign/features-1d", lambda: ops.prototype_assign(t(3), t(5, 3)), RuntimeError, ["prototype_assign", "features", "1-D"]),
    ("assign/centroids-1d", lambda: ops.prototype_assign(t(4, 3), t(3)), RuntimeError, ["prototype_assign", "centroids", "2-D"]),
    ("assign/centroids-width", lambda: ops.prototype_assign(t(4, 3), t(5, 4)), RuntimeError, ["prototype_assign", "centroids", "D = 3", "[5, 4]"]),
    ("assign/centroids-width-4d", lambda: ops.prototype_assign(A4, t(5, 4)), RuntimeError, ["prototype_assign", "centroids", "D = 3"]),
    ("assign/centroids-empty", lambda: ops.prototype_assign(t(4, 3), t(0, 3)), RuntimeError, ["prototype_assign", "centroids", "K >= 1"]),
    ("assign/centroids-vs-components", lambda: ops.prototype_assign(t(4, 3), t(5, 3), components=t(3, 2)), RuntimeError, ["prototype_assign", "centroids", "D = 2", "components"]),
    ("assign/mean-shape", lambda: ops.prototype_assign(t(4, 3), t(5, 3), mean=t(4)), RuntimeError, ["prototype_assign", "mean", "[C] = [3]", "[4]"]),
    ("assign/mean-2d", lambda: ops.prototype_assign(t(4, 3), t(5, 3), mean=t(1, 3)), RuntimeError, ["prototype_assign", "mean", "[1, 3]"]),
    ("assign/components-rows", lambda: ops.prototype_assign(t(4, 3), t(5, 2), components=t(4, 2)), RuntimeError, ["prototype_assign", "components", "C = 3", "[4, 2]"]),
    ("assign/components-1d", lambda: ops.prototype_assign(t(4, 3), t(5, 2), components=t(3)), RuntimeError, ["prototype_assign", "components"]),
    ("assign/int-features", lambda: ops.prototype_assign(t(4, 3, dtype=torch.int64), t(5, 3)), RuntimeError, ["prototype_assign", "features", "float32"]),
    ("assign/int-centroids", lambda: ops.prototype_assign(t(4, 3), t(5, 3, dtype=torch.int32)), RuntimeError, ["prototype_assign", "centroids", "float32"]),
    ("assign/int-mean", lambda: ops.prototype_assign(t(4, 3), t(5, 3), mean=t(3, dtype=torch.int64)), RuntimeError, ["prototype_assign", "mean", "float32"]),
    ("assign/int-components", lambda: ops.prototype_assign(t(4, 3), t(5, 2), components=t(3, 2, dtype=torch.uint8)), RuntimeError, ["prototype_assign", "components", "float32"]),
    ("assign/list-features", lambda: ops.prototype_assign([[1.0, 2.0, 3.0]], t(5, 3)), TypeError, ["prototype_assign", "features", "Tensor"]),
    ("assign/numpy-centroids", lambda: ops.prototype_assign(t(4, 3), np.ones((5, 3))), TypeError, ["prototype_assign", "centroids", "Tensor"]),
    ("assign/list-mean", lambda: ops.prototype_assign(t(4, 3), t(5, 3), mean=[0.0, 0.0, 0.0]), TypeError, ["prototype_assign", "mean", "Tensor"]),
    ("assign/float-components", lambda: ops.prototype_assign(t(4, 3), t(5, 3), components=1.0), TypeError, ["prototype_assign", "components", "Tensor"]),
    # ---------------------------------------------------------------- prototype_pool
    ("pool/saliency-2d", lambda: ops.prototype_pool(t(4, 5), idx(4, 5), 3), RuntimeError, ["prototype_pool", "saliency", "3-D"]),
    ("pool/saliency-4d", lambda: ops.prototype_pool(t(1, 2, 4, 5), idx(1, 2, 4, 5), 3), RuntimeError, ["prototype_pool", "saliency", "3-D"]),
    ("pool/saliency-int", lambda: ops.prototype_pool(t(2, 4, 5, dtype=torch.int64), idx(2, 4, 5), 3), RuntimeError, ["prototype_pool", "saliency", "float32"]),
    ("pool/assignment-float", lambda: ops.prototype_pool(t(2, 4, 5), t(2, 4, 5), 3), RuntimeError, ["prototype_pool", "assignment", "int64"]),
    ("pool/assignment-int16", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5, dtype=torch.int16), 3), RuntimeError, ["prototype_pool", "assignment", "int64"]),
    ("pool/shape-mismatch", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 5, 4), 3), RuntimeError, ["prototype_pool", "saliency", "assignment", "same shape", "[2, 5, 4]"]),
    ("pool/assignment-2d", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 20), 3), RuntimeError, ["prototype_pool", "saliency", "assignment"]),
    ("pool/k-zero", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5), 0), ValueError, ["prototype_pool", "num_prototypes", "K >= 1", "0"]),
    ("pool/k-negative", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5), -3), ValueError, ["prototype_pool", "num_prototypes", "-3"]),
    ("pool/k-zero-op", lambda: torch.ops.i2x.prototype_pool(t(2, 4, 5), idx(2, 4, 5), 0), RuntimeError, ["prototype_pool", "num_prototypes", "0"]),
    ("pool/k-float", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5), 3.0), TypeError, ["prototype_pool", "num_prototypes", "float"]),
    ("pool/k-bool", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5), True), TypeError, ["prototype_pool", "num_prototypes", "bool"]),
    ("pool/k-tensor", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5), torch.tensor(3)), TypeError, ["prototype_pool", "num_prototypes"]),
    ("pool/assignment-minus-one", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5, value=-1), 3), RuntimeError, ["prototype_pool", "assignment", "[0, 3)", "-1"]),
    ("pool/assignment-equals-k", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5, value=3), 3), RuntimeError, ["prototype_pool", "assignment", "[0, 3)", "got 3"]),
    ("pool/assignment-k-int32", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5, value=3, dtype=torch.int32), 3), RuntimeError, ["prototype_pool", "assignment", "got 3"]),
    ("pool/assignment-huge", lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5, value=2**40), 3), RuntimeError, ["prototype_pool", "assignment"]),
    ("pool/list-saliency", lambda: ops.prototype_pool([[[1.0]]], idx(1, 1, 1), 3), TypeError, ["prototype_pool", "saliency", "Tensor"]),
    ("pool/list-assignment", lambda: ops.prototype_pool(t(1, 1, 1), [[[0]]], 3), TypeError, ["prototype_pool", "assignment", "Tensor"]),
    # ---------------------------------------------------------------- saliency_pool
    ("saliency_pool/features-3d", lambda: ops.saliency_pool(t(3, 4, 5), t(3, 4, 5)), RuntimeError, ["saliency_pool", "features", "4-D"]),
    ("saliency_pool/saliency-4d", lambda: ops.saliency_pool(A4, t(2, 1, 4, 5)), RuntimeError, ["saliency_pool", "saliency", "3-D"]),
    ("saliency_pool/grid-mismatch", lambda: ops.saliency_pool(A4, t(2, 5, 4)), RuntimeError, ["saliency_pool", "saliency", "[2, 4, 5]", "[2, 5, 4]"]),
    ("saliency_pool/batch-mismatch", lambda: ops.saliency_pool(A4, t(3, 4, 5)), RuntimeError, ["saliency_pool", "saliency", "[2, 4, 5]", "[3, 4, 5]"]),
    ("saliency_pool/int-features", lambda: ops.saliency_pool(A4.long(), t(2, 4, 5)), RuntimeError, ["saliency_pool", "features", "float32"]),
    ("saliency_pool/int-saliency", lambda: ops.saliency_pool(A4, t(2, 4, 5, dtype=torch.int32)), RuntimeError, ["saliency_pool", "saliency", "float32"]),
    ("saliency_pool/list-features", lambda: ops.saliency_pool([[[[1.0]]]], t(1, 1, 1)), TypeError, ["saliency_pool", "features", "Tensor"]),
    ("saliency_pool/numpy-saliency", lambda: ops.saliency_pool(A4, np.ones((2, 4, 5))), TypeError, ["saliency_pool", "saliency", "Tensor"]),
]


@pytest.mark.parametrize("thunk,exc,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(thunk, exc, needles):
    with pytest.raises(Exception) as info:
        thunk()
    # exactly the documented type (not merely something raised)
    assert type(info.value) is exc, f"raised {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"message lacks {missing}: {message!r}"


def test_case_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# -------------------------------------------------------------------------------------------
# Inputs on different devices (needs CUDA: see the module docstring)


def _cross_device_cases(dev):
    c = lambda *s, **k: t(*s, device=dev, **k)  # noqa: E731
    return [
        (lambda: ops.cam(A4, c(2, 3, 4, 5)), ["cam", "activations", "gradients", "same device"]),
        (lambda: ops.cam(c(2, 3, 4, 5), A4), ["cam", "activations", "gradients", "same device"]),
        (lambda: ops.prototype_assign(t(4, 3), c(5, 3)), ["prototype_assign", "features", "centroids", "same device"]),
        (lambda: ops.prototype_assign(c(4, 3), t(5, 3)), ["prototype_assign", "features", "centroids", "same device"]),
        (lambda: ops.prototype_assign(t(4, 3), t(5, 3), mean=c(3)), ["prototype_assign", "mean", "same device"]),
        (lambda: ops.prototype_assign(t(4, 3), t(5, 2), components=c(3, 2)), ["prototype_assign", "components", "same device"]),
        (lambda: ops.prototype_pool(t(2, 4, 5), idx(2, 4, 5).to(dev), 3), ["prototype_pool", "saliency", "assignment", "same device"]),
        (lambda: ops.prototype_pool(c(2, 4, 5), idx(2, 4, 5), 3), ["prototype_pool", "saliency", "assignment", "same device"]),
        (lambda: ops.saliency_pool(A4, c(2, 4, 5)), ["saliency_pool", "features", "saliency", "same device"]),
        (lambda: ops.saliency_pool(c(2, 3, 4, 5), t(2, 4, 5)), ["saliency_pool", "features", "saliency", "same device"]),
    ]


@pytest.mark.parametrize("case", range(10))
def test_inputs_on_different_devices(case, cuda_device):
    thunk, needles = _cross_device_cases(cuda_device)[case]
    with pytest.raises(RuntimeError) as info:
        thunk()
    message = str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"message lacks {missing}: {message!r}"


def test_assignment_out_of_range_on_other_images_too():
    """An out-of-range index anywhere (last image, last position) is caught, not just at [0, 0]."""
    a = idx(3, 4, 5)
    a[2, 3, 4] = 7
    with pytest.raises(RuntimeError, match=r"prototype_pool: assignment.*got 7"):
        ops.prototype_pool(t(3, 4, 5), a, 7)
    a[2, 3, 4] = 6
    intensity, counts = ops.prototype_pool(t(3, 4, 5), a, 7)
    assert counts[2, 6] == 1
