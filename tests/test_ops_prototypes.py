"""prototype_assign, prototype_pool and saliency_pool against i2x.reference and hand values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import FLOAT_DTYPES, assert_close, check_layout, dtype_id, make_layout, rand, randn

from i2x import ops
from i2x import reference

# ============================================================================================
# prototype_assign


def assign_inputs(feature_shape, k, gen, dtype=torch.float32, device="cpu", with_mean=False, with_components=False, d=5):
    c = feature_shape[1]
    features = randn(feature_shape, gen, dtype, device)
    mean = randn((c,), gen, dtype, device) * 0.5 if with_mean else None
    components = (randn((c, d), gen, dtype, device) / math.sqrt(c)) if with_components else None
    centroids = randn((k, d if with_components else c), gen, dtype, device)
    return features, centroids, mean, components


def _rows64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().double()
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.dim() == 4 else t


def assign_truth(features, centroids, mean=None, components=None):
    """float64 ground truth on the (already rounded) inputs: the full [P, K] squared-distance
    matrix by exact differences, and per position the scale of the kernel's float error: the
    |x|^2 - 2 x.c + |c|^2 expansion errs by ~eps (|x|^2 + |c|^2), and the projection
    f @ W - mean @ W by ~eps (|f| + |mean|) |W|."""
    f = _rows64(features)
    x = f.clone()
    proj_mag = f.norm(dim=1)
    if mean is not None:
        m = mean.detach().cpu().double()
        x = x - m
        proj_mag = proj_mag + m.norm()
    if components is not None:
        w = components.detach().cpu().double()
        x = x @ w
        proj_mag = proj_mag * w.norm()
    c = centroids.detach().cpu().double()
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(dim=2)
    scale = x.pow(2).sum(1) + c.pow(2).sum(1).max() + proj_mag**2
    return d2, scale


def check_assign(features, centroids, mean=None, components=None, tag="assign", max_exempt_frac=1e-3):
    """The op against the reference, exempting only near-ties.

    Indices must equal the reference's wherever the best and second-best true distances differ by
    more than the kernel's float error (REL x scale); at the exempt positions (counted, must be
    rare) the chosen centroid must still be within that error of the best. Distances are compared
    with the true squared distance to the chosen centroid.
    """
    promoted = reference.promoted_dtype(*[t for t in (features, centroids, mean, components) if t is not None])
    index, distance = ops.prototype_assign(features, centroids, mean, components, return_distances=True)
    assert torch.equal(ops.prototype_assign(features, centroids, mean, components), index)
    ref_index, ref_distance = reference.prototype_assign(features, centroids, mean, components)
    out_shape = (features.shape[0], *features.shape[2:]) if features.dim() == 4 else (features.shape[0],)
    assert index.shape == out_shape and distance.shape == out_shape
    assert index.dtype == torch.int64 and distance.dtype == promoted
    assert index.device == features.device and distance.device == features.device
    if index.numel() == 0:
        return index, distance, 0

    d2, scale = assign_truth(features, centroids, mean, components)
    rel = 1e-10 if promoted == torch.float64 else 1e-5  # the kernels compute in float64 / float32
    tau = rel * scale
    idx = index.reshape(-1).cpu()
    assert idx.min() >= 0 and idx.max() < centroids.shape[0]
    best = d2.min(dim=1).values
    if d2.shape[1] > 1:
        second = d2.topk(2, dim=1, largest=False).values[:, 1]
    else:
        second = torch.full_like(best, math.inf)
    near_tie = (second - best) <= tau
    chosen = d2.gather(1, idx[:, None])[:, 0]
    assert ((chosen - best) <= tau).all(), "a chosen centroid is farther than the float error allows"
    mismatch = (idx != ref_index.reshape(-1).cpu()) & ~near_tie
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} positions differ from the reference away from ties, first at "
        f"{int(mismatch.nonzero()[0])}: got {idx[mismatch][0].item()}, reference "
        f"{ref_index.reshape(-1).cpu()[mismatch][0].item()}"
    )
    exempt = int(near_tie.sum())
    assert exempt <= max(2, max_exempt_frac * idx.numel()), f"{exempt} near-tie positions of {idx.numel()}"

    expected_distance = chosen.reshape(out_shape).to(promoted).to(distance.device)
    assert_close(distance, expected_distance, scale=scale.reshape(out_shape).to(distance.device), tag=tag)
    # and the reference's own distances agree where the indices do
    same = (idx == ref_index.reshape(-1).cpu()).reshape(out_shape).to(distance.device)
    assert_close(distance[same], ref_distance[same], scale=scale.reshape(out_shape).to(distance.device)[same], tag=tag)
    return index, distance, exempt


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_components", [False, True], ids=["nopca", "pca"])
@pytest.mark.parametrize("with_mean", [False, True], ids=["nomean", "mean"])
def test_assign_rows(with_mean, with_components, dtype, layout, device, gen):
    f, c, m, w = assign_inputs((300, 12), 10, gen, dtype, device, with_mean, with_components)
    f = make_layout(f, layout)
    check_layout(f, layout)
    check_assign(f, c, m, w, tag="assign/rows")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_components", [False, True], ids=["nopca", "pca"])
@pytest.mark.parametrize("with_mean", [False, True], ids=["nomean", "mean"])
def test_assign_spatial(with_mean, with_components, dtype, layout, device, gen):
    f, c, m, w = assign_inputs((3, 12, 5, 7), 10, gen, dtype, device, with_mean, with_components)
    f = make_layout(f, layout)
    check_layout(f, layout)
    check_assign(f, c, m, w, tag="assign/spatial")


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_assign_strided_parameters(layout, device, gen):
    """Non-contiguous centroids, mean and components."""
    f, c, m, w = assign_inputs((2, 8, 4, 5), 6, gen, torch.float32, device, True, True, d=4)
    c, w = make_layout(c, layout), make_layout(w, layout)
    m = make_layout(m, "sliced")
    assert not c.is_contiguous() and not w.is_contiguous() and not m.is_contiguous()
    check_assign(f, c, m, w, tag="assign/spatial")
    f2, c2, _, _ = assign_inputs((40, 8), 6, gen, torch.float64, device)
    check_assign(f2, make_layout(c2, layout), tag="assign/rows")


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float16, torch.float32, None, None),
        (torch.bfloat16, torch.bfloat16, torch.float32, None),
        (torch.float32, torch.float32, torch.float32, torch.float64),
        (torch.float16, torch.bfloat16, None, torch.float16),
    ],
    ids=lambda v: "-".join("none" if d is None else dtype_id(d) for d in v),
)
def test_assign_mixed_dtypes(dtypes, device, gen):
    df, dc, dm, dw = dtypes
    f, c, m, w = assign_inputs((2, 6, 3, 4), 5, gen, torch.float64, device, dm is not None, dw is not None, d=3)
    f, c = f.to(df), c.to(dc)
    m = m.to(dm) if m is not None else None
    w = w.to(dw) if w is not None else None
    check_assign(f, c, m, w, tag="assign/mixed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_assign_single_prototype(dtype, device, gen):
    f, c, m, w = assign_inputs((2, 4, 3, 3), 1, gen, dtype, device, True, True, d=2)
    index, _, _ = check_assign(f, c, m, w, tag="assign/spatial")
    assert torch.equal(index, torch.zeros(2, 3, 3, dtype=torch.int64, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_assign_empty(dtype, device, gen):
    c = randn((4, 3), gen, dtype, device)
    index, distance = ops.prototype_assign(torch.empty(0, 3, dtype=dtype, device=device), c, return_distances=True)
    assert index.shape == (0,) and index.dtype == torch.int64 and distance.shape == (0,) and distance.dtype == dtype
    index, distance = ops.prototype_assign(torch.empty(0, 3, 5, 6, dtype=dtype, device=device), c, return_distances=True)
    assert index.shape == (0, 5, 6) and distance.shape == (0, 5, 6) and distance.dtype == dtype
    w = randn((7, 3), gen, dtype, device)
    index = ops.prototype_assign(torch.empty(0, 7, 2, 2, dtype=dtype, device=device), c, components=w)
    assert index.shape == (0, 2, 2) and index.dtype == torch.int64


def test_assign_return_distances_flag(device, gen):
    f, c, _, _ = assign_inputs((10, 3), 4, gen, device=device)
    out = ops.prototype_assign(f, c)
    assert isinstance(out, torch.Tensor)
    pair = ops.prototype_assign(f, c, return_distances=True)
    assert isinstance(pair, tuple) and len(pair) == 2
    assert torch.equal(pair[0], out)


# More positions than one 8192-row block, laid out so that blocks end mid-image and images span
# blocks, and an image larger than a block.
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((20000, 8), "contiguous"),
        ((20000, 8), "sliced"),
        ((5, 6, 45, 47), "contiguous"),  # 2115 positions per image: 3 whole images per block
        ((5, 6, 45, 47), "channels_last"),  # rows straight from NHWC: blocks cut images
        ((2, 4, 100, 91), "contiguous"),  # 9100 positions per image > 8192
        ((3, 5, 61, 67), "sliced"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_assign_many_blocks(shape, layout, device, gen):
    with_pca = len(shape) == 4 and shape[1] == 6
    f, c, m, w = assign_inputs(shape, 16, gen, torch.float32, device, with_mean=True, with_components=with_pca, d=4)
    f = make_layout(f, layout)
    index, _, _ = check_assign(f, c, m, w, tag="assign/blocks")
    # every prototype gets used somewhere: the blocks were not all written with one answer
    assert index.unique().numel() == 16


def test_assign_exact_ties_go_to_lower_index(device):
    """Duplicated centroids and equidistant ones: the lower index wins, exactly."""
    c = torch.tensor([[5.0, 5.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], device=device)
    f = torch.tensor(
        [
            [0.0, 0.0],  # 1 and 2 and 3 at distance 1 -> 1
            [0.5, 0.5],  # 1, 2, 3 at 0.5 -> 1
            [0.0, 1.0],  # exactly on 1 (== 3) -> 1
            [1.0, 0.0],  # on 2 -> 2
            [5.0, 5.0],  # on 0 (== 4) -> 0
            [4.0, 6.0],  # 0 (== 4) -> 0
        ],
        device=device,
    )
    expected = torch.tensor([1, 1, 1, 2, 0, 0], device=device)
    for dtype in FLOAT_DTYPES:
        index, distance = ops.prototype_assign(f.to(dtype), c.to(dtype), return_distances=True)
        assert torch.equal(index, expected), (dtype, index)
        assert torch.equal(distance, torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 2.0], device=device, dtype=dtype))
    # every centroid identical: always 0
    same = torch.ones(7, 3, device=device)
    index = ops.prototype_assign(torch.randn(2, 3, 4, 4, device=device), same)
    assert torch.equal(index, torch.zeros(2, 4, 4, dtype=torch.int64, device=device))


def test_assign_duplicates_across_blocks(device, gen):
    """Features drawn at duplicated centroids, over several blocks: never the higher duplicate."""
    base = randn((6, 4), gen, torch.float32, device)
    c = torch.cat([base, base[[2, 4]]])  # 6 == 2, 7 == 4
    pick = torch.randint(0, 6, (17000,), generator=gen)
    f = base.cpu()[pick].to(device) + randn((17000, 4), gen, torch.float32, device) * 0.01
    index = ops.prototype_assign(f, c)
    assert index.max() < 6
    assert torch.equal(index.cpu(), reference.prototype_assign(f, c)[0].cpu())


def test_assign_inputs_requiring_grad(device, gen):
    """Features usually come out of a model with grad on. The op has no gradient formula, so its
    distances must not carry a gradient history that silently yields no gradient: either they do not
    require grad, or their gradient is the true 2 (x - c) (checked against autograd through the
    reference)."""
    f, c, m, w = assign_inputs((2, 4, 3, 3), 5, gen, torch.float64, device, True, False)
    f.requires_grad_()
    index, distance = ops.prototype_assign(f, c, m, w, return_distances=True)
    assert not index.requires_grad
    assert torch.equal(index, ops.prototype_assign(f.detach(), c, m, w))
    if distance.requires_grad:
        (got,) = torch.autograd.grad(distance.sum(), f, allow_unused=True)
        (ref,) = torch.autograd.grad(reference.prototype_assign(f, c, m, w)[1].sum(), f)
        assert got is not None, "distances require grad but give features no gradient"
        assert_close(got, ref, tag="assign/backward")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_assign_nan_features_raise(dtype, device, gen):
    f, c, _, _ = assign_inputs((2, 4, 3, 3), 5, gen, dtype, device)
    f[1, 2, 0, 1] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.prototype_assign(f, c)
    rows = randn((50, 4), gen, dtype, device)
    rows[17, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.prototype_assign(rows, c)


@pytest.mark.parametrize("where", ["mean", "components"])
def test_assign_nan_projection_raises(where, device, gen):
    f, c, m, w = assign_inputs((2, 4, 3, 3), 5, gen, torch.float32, device, True, True, d=3)
    (m if where == "mean" else w).view(-1)[1] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.prototype_assign(f, c, m, w)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_assign_inf_features_raise(value, device, gen):
    """The docstring: "Non-finite features or centroids raise an error"."""
    f, c, _, _ = assign_inputs((30, 4), 5, gen, torch.float32, device)
    f[3, 1] = value
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.prototype_assign(f, c)


def test_assign_nan_centroid_raises(device, gen):
    """The docstring: "Non-finite features or centroids raise an error" -- a NaN in one centroid
    too, not only when every centroid is unusable."""
    f, c, _, _ = assign_inputs((30, 4), 5, gen, torch.float32, device)
    c[2, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.prototype_assign(f, c)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, threading, time
    import torch
    import i2x
    from i2x import ops
    from i2x import reference

    def rss_mib():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def peak_growth_mib(fn):
        # Resident memory sampled by a thread while fn runs (ru_maxrss lagged on these machines).
        start = rss_mib()
        peak = [start]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.001)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            result = fn()
        finally:
            done.set()
            t.join()
        return max(peak[0], rss_mib()) - start, result

    P, K, D = 200_000, 2048, 16
    g = torch.Generator().manual_seed(0)
    f = torch.randn(P, D, generator=g)
    c = torch.randn(K, D, generator=g)
    ops.prototype_assign(f[:1000], c)  # warm up allocator, BLAS and thread pool
    growth, (index, distance) = peak_growth_mib(lambda: ops.prototype_assign(f, c, return_distances=True))
    sub = torch.randint(0, P, (3000,), generator=g)
    ref_index, ref_distance = reference.prototype_assign(f[sub], c)
    agree = (index[sub] == ref_index).double().mean().item()
    dist_err = ((distance[sub] - ref_distance).abs() / (1 + ref_distance.abs())).max().item()
    # Positive control: a real [P, K] float32 matrix does show in the same measurement.
    control, _ = peak_growth_mib(lambda: torch.ones(P, K).sum())
    print(json.dumps(dict(growth=growth, control=control, agree=agree, dist_err=dist_err,
                          full_mib=P * K * 4 / 2**20, index_range=[int(index.min()), int(index.max())])))
    """
)


@pytest.mark.slow
def test_assign_memory_does_not_grow_with_positions_times_k(tmp_path):
    """200k positions x K=2048 would be a 1.6 GB distance matrix; the blocked op must peak far
    below that (peak RSS measured in a fresh process; a real [P, K] allocation is the control)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["growth"]
    assert r["control"] > 0.6 * r["full_mib"], f"the measurement cannot see a full matrix: {r}"
    assert growth < 0.2 * r["full_mib"], f"peak RSS grew {growth:.0f} MiB for a {r['full_mib']:.0f} MiB matrix: {r}"
    assert r["agree"] > 0.999 and r["dist_err"] < 1e-4, r
    assert r["index_range"][0] >= 0 and r["index_range"][1] < 2048


# ============================================================================================
# prototype_pool


def pool_scale(saliency, assignment, k):
    """[B, K] error scale of a group mean: mean |s| over the group."""
    s = saliency.detach().double().cpu().abs()
    a = assignment.cpu()
    return reference.prototype_pool(s, a, k)[0].to(saliency.device)


def check_pool(saliency, assignment, k, tag="pool"):
    intensity, counts = ops.prototype_pool(saliency, assignment, k)
    ref_intensity, ref_counts = reference.prototype_pool(saliency, assignment, k)
    assert counts.dtype == torch.int64 and intensity.dtype == saliency.dtype
    assert intensity.shape == (saliency.shape[0], k) and counts.shape == (saliency.shape[0], k)
    assert torch.equal(counts, ref_counts)
    assert int(counts.sum()) == saliency.numel()
    assert_close(intensity, ref_intensity, scale=pool_scale(saliency, assignment, k), tag=tag)
    assert (intensity[counts == 0] == 0).all()
    return intensity, counts


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_pool_matches_reference(dtype, index_dtype, layout, device, gen):
    k = 9
    s = randn((3, 5, 7), gen, dtype, device)
    a = torch.randint(0, k - 2, (3, 5, 7), generator=gen).to(index_dtype).to(device)  # 7 and 8 absent
    s, a = make_layout(s, layout), make_layout(a, layout)
    check_layout(s, layout)
    _, counts = check_pool(s, a, k, tag="pool")
    assert (counts[:, 7:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_pool_larger(dtype, device, gen):
    s = randn((4, 56, 56), gen, dtype, device)
    a = torch.randint(0, 300, (4, 56, 56), generator=gen).to(device)
    check_pool(s, a, 300, tag="pool")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_pool_single_prototype(dtype, device, gen):
    s = randn((2, 3, 4), gen, dtype, device)
    intensity, counts = check_pool(s, torch.zeros(2, 3, 4, dtype=torch.int64, device=device), 1)
    assert torch.equal(counts, torch.full((2, 1), 12, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_pool_empty_batch(dtype, device):
    intensity, counts = ops.prototype_pool(
        torch.empty(0, 3, 3, dtype=dtype, device=device), torch.empty(0, 3, 3, dtype=torch.int64, device=device), 5
    )
    assert intensity.shape == (0, 5) and intensity.dtype == dtype
    assert counts.shape == (0, 5) and counts.dtype == torch.int64


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_pool_hand_values(dtype, device):
    # image 0: k0 <- {1, 2}, k1 <- {3, 4, 5}, k3 <- {6}; k2 absent: mean (1.5, 4, 0, 6), counts (2, 3, 0, 1)
    # image 1: k0 <- {0}, k2 <- {-1, 0.5, 2, 0, 7} (sum 8.5 / 5 = 1.7); k1, k3 absent
    s = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[-1.0, 0.5, 2.0], [0.0, 0.0, 7.0]]], dtype=dtype, device=device)
    a = torch.tensor([[[0, 0, 1], [1, 1, 3]], [[2, 2, 2], [2, 0, 2]]], device=device)
    intensity, counts = ops.prototype_pool(s, a, 4)
    assert torch.equal(counts, torch.tensor([[2, 3, 0, 1], [1, 0, 5, 0]], device=device))
    expected = torch.tensor([[1.5, 4.0, 0.0, 6.0], [0.0, 0.0, 1.7, 0.0]], dtype=dtype, device=device)
    assert_close(intensity, expected, scale=6.0, tag="pool/hand")


def test_pool_counts_exact_beyond_float_precision():
    """Counts are int64: exact even where a float32 counter stops (2^24 positions in one image)."""
    h = w = 4097  # 16_785_409 positions > 2^24 = 16_777_216
    s = torch.ones(1, h, w)
    a = torch.zeros(1, h, w, dtype=torch.int32)
    intensity, counts = ops.prototype_pool(s, a, 2)
    assert counts.tolist() == [[h * w, 0]]
    assert abs(intensity[0, 0].item() - 1.0) < 1e-3 and intensity[0, 1].item() == 0.0


def test_pool_gradcheck(gen):
    s = randn((2, 3, 4), gen, torch.float64).requires_grad_()
    a = torch.tensor([0, 2, 2, 1, 0, 2, 2, 2, 0, 1, 1, 2] * 2).reshape(2, 3, 4)
    a[1, 0, :] = 4  # prototype 3 absent in both images; 4 only in image 1
    assert torch.autograd.gradcheck(lambda x: ops.prototype_pool(x, a, 5)[0], (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_pool_backward_matches_reference_autograd(dtype, device, gen):
    s = randn((2, 4, 5), gen, dtype, device).requires_grad_()
    a = torch.randint(0, 6, (2, 4, 5), generator=gen).to(device)
    g = randn((2, 6), gen, torch.float32, device)
    (got,) = torch.autograd.grad((ops.prototype_pool(s, a, 6)[0].float() * g).sum(), s)
    (ref,) = torch.autograd.grad((reference.prototype_pool(s, a, 6)[0].float() * g).sum(), s)
    assert got.dtype == dtype
    assert_close(got, ref, scale=g.abs().max(), tag="pool/backward")


# ============================================================================================
# saliency_pool


def saliency_pool_scale(features, saliency):
    """[B, C] error scale: sum |f s| / |sum s| (the weighted sum's magnitude over the total)."""
    f = features.detach().double().cpu()
    s = saliency.detach().double().cpu()
    total = s.sum(dim=(1, 2)).abs()
    num = torch.einsum("bchw,bhw->bc", f.abs(), s.abs())
    return (num / torch.where(total > 0, total, torch.ones_like(total))[:, None]).to(features.device)


def check_saliency_pool(f, s, tag="saliency_pool"):
    out = ops.saliency_pool(f, s)
    expected = reference.saliency_pool(f, s)
    assert out.shape == (f.shape[0], f.shape[1])
    assert out.dtype == torch.promote_types(f.dtype, s.dtype) and out.device == f.device
    assert_close(out, expected, scale=saliency_pool_scale(f, s), tag=tag)
    return out


@pytest.mark.parametrize(
    "layouts",
    [("contiguous", "contiguous"), ("channels_last", "contiguous"), ("sliced", "transposed"), ("transposed", "sliced")],
    ids=lambda v: f"{v[0]}-{v[1]}",
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_saliency_pool_matches_reference(dtype, layouts, device, gen):
    f = make_layout(randn((3, 6, 5, 7), gen, dtype, device), layouts[0])
    s = make_layout(rand((3, 5, 7), gen, dtype, device), layouts[1])  # a saliency map: >= 0
    check_layout(f, layouts[0])
    check_saliency_pool(f, s)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (2, 3, 1, 1), (2, 1, 4, 3), (2, 256, 7, 7), (1, 2048, 7, 7)], ids=lambda s: "x".join(map(str, s))
)
def test_saliency_pool_shapes(shape, device, gen):
    for dtype in (torch.float32, torch.float64):
        f = randn(shape, gen, dtype, device)
        s = rand((shape[0], shape[2], shape[3]), gen, dtype, device, low=0.1)
        check_saliency_pool(f, s)
        # signed saliency whose total stays away from 0
        check_saliency_pool(f, s - 0.3)


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float64, torch.float32)],
    ids=lambda v: "-".join(dtype_id(d) for d in v),
)
def test_saliency_pool_mixed_dtypes(dtypes, device, gen):
    f = randn((2, 4, 3, 5), gen, dtypes[0], device)
    s = rand((2, 3, 5), gen, dtypes[1], device)
    out = check_saliency_pool(f, s)
    assert out.dtype == torch.promote_types(*dtypes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_saliency_pool_zero_saliency(dtype, device, gen):
    f = randn((3, 4, 3, 3), gen, dtype, device)
    s = rand((3, 3, 3), gen, dtype, device)
    s[1] = 0
    out = check_saliency_pool(f, s)
    assert torch.equal(out[1], torch.zeros(4, dtype=dtype, device=device))
    assert not torch.isnan(out).any()
    # the other images are unaffected by the empty one
    assert torch.equal(out[[0, 2]], ops.saliency_pool(f[[0, 2]], s[[0, 2]]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_saliency_pool_empty_batch(dtype, device):
    out = ops.saliency_pool(torch.empty(0, 5, 3, 3, dtype=dtype, device=device), torch.empty(0, 3, 3, dtype=dtype, device=device))
    assert out.shape == (0, 5) and out.dtype == dtype


def test_saliency_pool_hand_values(device):
    # features channel 0 = [[1, 2], [3, 4]], channel 1 = [[0, 0], [0, 8]]; saliency [[1, 0], [0, 3]]:
    # total 4, channel 0: (1*1 + 4*3) / 4 = 13/4, channel 1: (8*3) / 4 = 6
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]], device=device)
    s = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]], device=device)
    assert_close(ops.saliency_pool(f, s), torch.tensor([[3.25, 6.0]], device=device), scale=8.0, tag="saliency_pool/hand")


@pytest.mark.parametrize("seed", [0, 1])
def test_saliency_pool_gradcheck(seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    s = (0.2 + torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(ops.saliency_pool, (f, s), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_saliency_pool_backward_matches_reference_autograd(device, gen):
    f = randn((2, 3, 4, 5), gen, torch.float64, device).requires_grad_()
    s = rand((2, 4, 5), gen, torch.float64, device, low=-0.2).requires_grad_()
    s.data[1] = 0.0  # an empty image: zero output, zero gradient
    g = randn((2, 3), gen, torch.float64, device)
    got = torch.autograd.grad((ops.saliency_pool(f, s) * g).sum(), (f, s))
    ref = torch.autograd.grad((reference.saliency_pool(f, s) * g).sum(), (f, s))
    for x, y in zip(got, ref):
        assert_close(x, y, tag="saliency_pool/backward")
