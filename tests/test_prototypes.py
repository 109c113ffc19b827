"""i2x.track.prototypes against independent truths.

- PCA: ``numpy.linalg.eigh`` of the explicitly centred data's covariance (float64).
- k-means: planted, well-separated Gaussian blobs (the partition is known), scikit-learn's
  ``KMeans`` inertia on the very same projected vectors, and brute-force float64 distances from
  every projected position to every centroid (assignments, distances, exemplars).
- layer features: the layer's output computed by running the model's own submodules by hand.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import nn

from _models import RaisesAfter, TwoHeads, tiny_cnn, tiny_input
from i2x.track.prototypes import Prototypes, _update_centroids, discover_prototypes, fit_prototypes, layer_features

# ----------------------------------------------------------------------------------------------
# Data


def planted(sizes, channels=32, grid=(4, 4), spread=12.0, seed=0):
    """Gaussian blobs (unit variance per channel) around centres ``spread`` apart per channel,
    laid out as ``[N, C, h, w]`` features; ``sizes[j]`` positions belong to blob ``j``.

    Returns ``(features [N, C, h, w] float32, labels [N, h, w] int64)``; positions are shuffled.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    total = sum(sizes)
    assert total % (h * w) == 0
    centres = torch.randn(len(sizes), channels, generator=gen, dtype=torch.float64) * spread
    labels = torch.cat([torch.full((s,), j) for j, s in enumerate(sizes)])
    labels = labels[torch.randperm(total, generator=gen)]
    rows = centres[labels] + torch.randn(total, channels, generator=gen, dtype=torch.float64)
    n = total // (h * w)
    features = rows.reshape(n, h, w, channels).permute(0, 3, 1, 2).contiguous().float()
    return features, labels.reshape(n, h, w)


def batches_of(features, sizes=(7, 3, 11)):
    """A callable returning a fresh list of batches of cycling sizes (uneven on purpose)."""
    parts, start, i = [], 0, 0
    while start < features.shape[0]:
        step = sizes[i % len(sizes)]
        parts.append(features[start : start + step])
        start, i = start + step, i + 1
    return lambda: list(parts)


def rows64(features):
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()


def projected64(features, proto):
    """Brute-force projection with the fitted mean/components, float64 ``[P, d]``."""
    return (rows64(features) - proto.mean.double()) @ proto.components.double()


def all_distances(features, proto):
    """Brute-force squared distances ``[P, K]`` float64 (the truth; small P only)."""
    return torch.cdist(projected64(features, proto), proto.centroids.double()).pow(2)


SIZES = [160, 96, 128, 64, 112, 80]  # 640 positions = 40 samples x 4 x 4


@pytest.fixture(scope="module")
def blobs():
    features, labels = planted(SIZES)
    proto = fit_prototypes(batches_of(features), n_prototypes=6, pca_dim=8, n_init=3)
    return features, labels, proto


# ----------------------------------------------------------------------------------------------
# PCA


def anisotropic(n_rows=1200, channels=12, offset=50.0, seed=3):
    """Rows with distinct variances along a random rotation and a large common offset."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
    scales = torch.linspace(6.0, 0.5, channels, dtype=torch.float64)
    rows = (torch.randn(n_rows, channels, generator=gen, dtype=torch.float64) * scales) @ q.t() + offset
    features = rows.reshape(n_rows // 4, 2, 2, channels).permute(0, 3, 1, 2).contiguous()
    return features


def numpy_pca(features):
    x = rows64(features).numpy()
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / (x.shape[0] - 1)
    values, vectors = np.linalg.eigh(cov)
    return x.mean(axis=0), values[::-1], vectors[:, ::-1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pca_matches_numpy_eigh(dtype):
    features = anisotropic().to(dtype)
    proto = fit_prototypes(batches_of(features, (50, 13, 77)), n_prototypes=3, pca_dim=5)
    mean, values, vectors = numpy_pca(features.double())
    np.testing.assert_allclose(proto.mean.numpy(), mean, rtol=1e-6)
    assert proto.components.shape == (12, 5) and proto.components.dtype == torch.float32
    # Distinct eigenvalues: each component is determined up to sign.
    np.testing.assert_allclose(np.abs(proto.components.numpy()), np.abs(vectors[:, :5]), atol=2e-6)
    np.testing.assert_allclose(proto.explained_variance_ratio.numpy(), values[:5] / values.sum(), rtol=1e-9)
    gram = proto.components.double().numpy().T @ vectors[:, :5]
    np.testing.assert_allclose(np.abs(gram), np.eye(5), atol=2e-6)
    # The sign rule: each component's entry of largest magnitude is positive.
    comps = proto.components
    assert bool((comps[comps.abs().argmax(dim=0), torch.arange(5)] > 0).all())


def test_pca_dim_is_clipped_to_channels():
    features = anisotropic(channels=6)
    proto = fit_prototypes(batches_of(features), n_prototypes=2, pca_dim=64)
    assert proto.components.shape == (6, 6) and proto.pca_dim == 6
    assert abs(float(proto.explained_variance_ratio.sum()) - 1.0) < 1e-12
    # A full rotation keeps distances: projected distances equal the raw ones.
    x = rows64(features)
    p = projected64(features, proto)
    torch.testing.assert_close(torch.cdist(p[:50], p[50:90]), torch.cdist(x[:50], x[50:90]), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# k-means


def test_planted_partition_recovered(blobs):
    features, labels, proto = blobs
    assert proto.assignment.shape == labels.shape and proto.assignment.dtype == torch.int64
    assert adjusted_rand_score(labels.flatten().numpy(), proto.assignment.flatten().numpy()) == 1.0
    assert sorted(proto.counts().tolist()) == sorted(SIZES)


def test_inertia_matches_sklearn_on_planted(blobs):
    features, _, proto = blobs
    x = projected64(features, proto).float().numpy()
    sk = KMeans(n_clusters=6, init="k-means++", n_init=3, random_state=0).fit(x)
    assert abs(proto.inertia - sk.inertia_) <= 0.01 * sk.inertia_
    # Inertia is the objective on the fitted positions: here all of them.
    assert proto.inertia == pytest.approx(float(proto.distances.double().sum()), rel=1e-6)


def test_inertia_on_unstructured_data_is_no_worse_than_sklearn():
    # Uniform noise has many local optima: the initialisation and Lloyd loop must be as good as
    # scikit-learn's (within 1%), not just lucky on easy blobs.
    gen = torch.Generator().manual_seed(5)
    features = torch.rand(250, 8, 4, 3, generator=gen)
    proto = fit_prototypes(batches_of(features, (64,)), n_prototypes=10, pca_dim=8, n_init=3)
    x = projected64(features, proto).float().numpy()
    sk = KMeans(n_clusters=10, init="k-means++", n_init=3, random_state=0).fit(x)
    assert proto.inertia <= 1.01 * sk.inertia_


def test_best_of_n_init_by_inertia(monkeypatch):
    import i2x.track.prototypes as module

    runs = []
    lloyd = module._lloyd

    def recording(*args):
        result = lloyd(*args)
        runs.append(result)
        return result

    monkeypatch.setattr(module, "_lloyd", recording)
    features = torch.rand(250, 8, 4, 3, generator=torch.Generator().manual_seed(5))
    proto = fit_prototypes(batches_of(features, (64,)), n_prototypes=10, pca_dim=8, n_init=4)
    inertias = [inertia for _, inertia in runs]
    assert len(runs) == 4 and len(set(inertias)) > 1  # the starts really differ
    best = min(range(4), key=inertias.__getitem__)
    assert proto.inertia == inertias[best] and torch.equal(proto.centroids, runs[best][0])


def test_same_seed_is_identical_other_seed_still_recovers(blobs):
    features, labels, proto = blobs
    again = fit_prototypes(batches_of(features), n_prototypes=6, pca_dim=8, n_init=3)
    for name in ("mean", "components", "centroids", "assignment", "distances", "exemplars", "exemplar_distances"):
        assert torch.equal(getattr(again, name), getattr(proto, name)), name
    assert again.inertia == proto.inertia
    other = fit_prototypes(batches_of(features), n_prototypes=6, pca_dim=8, n_init=3, seed=17)
    assert adjusted_rand_score(labels.flatten().numpy(), other.assignment.flatten().numpy()) == 1.0


def test_assignment_and_distances_equal_brute_force(blobs):
    features, _, proto = blobs
    d2 = all_distances(features, proto)
    best, index = d2.min(dim=1)
    # Near-ties would make the argmin float-dependent; planted blobs have none, which is asserted.
    second = d2.topk(2, dim=1, largest=False).values[:, 1]
    assert bool(((second - best) > 1e-3 * (second + 1)).all())
    assert torch.equal(proto.assignment.flatten(), index)
    torch.testing.assert_close(proto.distances.flatten().double(), best, rtol=1e-4, atol=1e-4)


def test_subsampled_fit_assigns_every_position():
    features, labels = planted([192, 192, 256], channels=16, seed=1)
    proto = fit_prototypes(batches_of(features), n_prototypes=3, pca_dim=4, max_fit_positions=100)
    assert proto.options["max_fit_positions"] == 100
    assert adjusted_rand_score(labels.flatten().numpy(), proto.assignment.flatten().numpy()) == 1.0
    assert torch.equal(proto.assignment.flatten(), all_distances(features, proto).argmin(dim=1))
    # The objective was taken on the 100 fitted positions only, a subset of all 640.
    assert 0 < proto.inertia < float(proto.distances.double().sum())


def test_empty_cluster_takes_the_farthest_position():
    # Hand-computed: all four points in cluster 0, cluster 1 empty. The point farthest from
    # centroid 0 (x = 10) moves to cluster 1; cluster 0 becomes the mean of the other three.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    centroids = torch.tensor([[1.0, 0.0], [50.0, 50.0]])
    labels = torch.zeros(4, dtype=torch.int64)
    distance = (x - centroids[0]).pow(2).sum(dim=1)
    updated = _update_centroids(x, labels, distance, centroids)
    torch.testing.assert_close(updated, torch.tensor([[1.0, 0.0], [10.0, 0.0]], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Exemplars


def check_exemplars(features, proto):
    d2 = all_distances(features, proto)
    assigned = proto.assignment.flatten()
    nearest = d2.gather(1, assigned[:, None])[:, 0]
    n, h, w = proto.assignment.shape
    e = proto.exemplars.shape[1]
    for k in range(proto.n_prototypes):
        members = (assigned == k).nonzero().flatten()
        truth = nearest[members].sort().values[:e]
        m = truth.numel()
        rows = proto.exemplars[k, :m]
        flat = rows[:, 0] * h * w + rows[:, 1] * w + rows[:, 2]
        assert bool((rows >= 0).all()) and bool((assigned[flat] == k).all())
        # Up to ties, the kept positions are the nearest: their true distances are the m smallest.
        torch.testing.assert_close(nearest[flat], truth, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(proto.exemplar_distances[k, :m].double(), truth, rtol=1e-4, atol=1e-4)
        assert bool((proto.exemplars[k, m:] == -1).all())
        assert bool(torch.isinf(proto.exemplar_distances[k, m:]).all())


def test_exemplars_are_the_nearest_assigned_positions(blobs):
    features, _, proto = blobs
    assert proto.exemplars.shape == (6, 8, 3) and proto.exemplars.dtype == torch.int64
    assert proto.exemplar_distances.shape == (6, 8)
    check_exemplars(features, proto)
    # Nearest first.
    assert bool((proto.exemplar_distances.diff(dim=1) >= 0).all())


def test_exemplar_padding_small_cluster():
    # 3 positions form their own, far-away blob: its prototype has 3 exemplars, then padding.
    features, labels = planted([301, 300, 3], channels=16, grid=(2, 2), seed=2)
    proto = fit_prototypes(batches_of(features), n_prototypes=3, pca_dim=6, n_exemplars=8)
    assert adjusted_rand_score(labels.flatten().numpy(), proto.assignment.flatten().numpy()) == 1.0
    small = int(proto.counts().argmin())
    assert int(proto.counts()[small]) == 3
    check_exemplars(features, proto)
    assert bool((proto.exemplars[small, 3:] == -1).all()) and bool((proto.exemplars[small, :3] >= 0).all())
    assert bool(torch.isinf(proto.exemplar_distances[small, 3:]).all())
    none = fit_prototypes(batches_of(features), n_prototypes=3, pca_dim=6, n_exemplars=0)
    assert none.exemplars.shape == (3, 0, 3) and none.exemplar_distances.shape == (3, 0)


# ----------------------------------------------------------------------------------------------
# The Prototypes object


def test_assign_new_features_equals_stored(blobs):
    features, _, proto = blobs
    index, distance = proto.assign(features, return_distances=True)
    assert torch.equal(index, proto.assignment)
    torch.testing.assert_close(distance, proto.distances, rtol=1e-4, atol=1e-4)
    # Channels-last and float64 inputs give the same assignment.
    assert torch.equal(proto.assign(features.double().contiguous(memory_format=torch.channels_last)), proto.assignment)
    with pytest.raises(ValueError, match=r"Prototypes.assign: features must be \[B, 32, h, w\]"):
        proto.assign(features[:, :5])
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        proto.assign(features.numpy())


def test_safetensors_round_trip(blobs, tmp_path):
    _, _, proto = blobs
    path = tmp_path / "prototypes.safetensors"
    save_file(proto.to_tensors(), str(path))
    options = json.loads(json.dumps(proto.options))
    back = Prototypes.from_tensors(load_file(str(path)), options)
    for name in ("mean", "components", "explained_variance_ratio", "centroids", "assignment", "distances",
                 "exemplars", "exemplar_distances"):
        a, b = getattr(back, name), getattr(proto, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.inertia == proto.inertia
    assert back.options == proto.options == {
        "n_prototypes": 6, "pca_dim": 8, "seed": 0, "max_fit_positions": 200_000, "n_init": 3,
        "max_iter": 100, "tol": 1e-4, "n_exemplars": 8,
    }
    assert repr(back) == repr(proto)


def test_from_tensors_rejects_incomplete_or_inconsistent(blobs):
    _, _, proto = blobs
    tensors = proto.to_tensors()
    with pytest.raises(ValueError, match=r"lacks \['centroids'\]"):
        Prototypes.from_tensors({k: v for k, v in tensors.items() if k != "centroids"})
    with pytest.raises(ValueError, match=r"tensors\['centroids'\] has shape \(6, 7\), expected \(6, 8\)"):
        Prototypes.from_tensors({**tensors, "centroids": tensors["centroids"][:, :7]})
    with pytest.raises(ValueError, match=r"tensors\['assignment'\] must have 3 dimension"):
        Prototypes.from_tensors({**tensors, "assignment": tensors["assignment"].flatten()})
    with pytest.raises(TypeError, match=r"tensors\['assignment'\] must be int64, got torch.float32"):
        Prototypes.from_tensors({**tensors, "assignment": tensors["assignment"].float()})
    with pytest.raises(TypeError, match="options must be a dict"):
        Prototypes.from_tensors(tensors, options="x")


# ----------------------------------------------------------------------------------------------
# Layer features


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_features_equal_the_layer_output_and_leave_the_model_as_it_was():
    model = tiny_cnn(inplace=True)  # the ReLU after features.3 overwrites its output in place
    model.train()
    model.features[1].eval()  # a submodule the user froze: must stay frozen
    running_mean = model.features[1].running_mean.clone()
    x = tiny_input(batch=10)
    out = list(layer_features(model, "features.3", x, batch_size=4))
    assert [b.shape[0] for b in out] == [4, 4, 2]
    with torch.no_grad():
        truth = model.features[3](model.features[2](model.features[1].eval()(model.features[0](x)).clone()))
    torch.testing.assert_close(torch.cat(out), truth)
    assert bool((torch.cat(out) < 0).any())  # pre-ReLU values: the in-place ReLU did not reach them
    assert model.training and model.features[0].training and not model.features[1].training
    assert torch.equal(model.features[1].running_mean, running_mean)
    assert no_hooks(model)


def test_layer_features_dataset_module_wrapper_and_layer_search():
    model = tiny_cnn().eval()
    x = tiny_input(batch=5)

    def truth(fn, batch_size):
        # Per batch of the same size: a conv over another batch size may round differently.
        with torch.no_grad():
            return torch.cat([fn(x[i : i + batch_size]) for i in range(0, 5, batch_size)])

    dataset = [(x[i], i % 2) for i in range(5)]
    by_dataset = torch.cat(list(layer_features(model, model.features, dataset, batch_size=2)))
    torch.testing.assert_close(by_dataset, truth(model.features, 2))
    wrapped = nn.DataParallel(model)  # on a CPU-only machine it just calls the module
    by_wrapper = torch.cat(list(layer_features(wrapped, "features", x, batch_size=3)))
    torch.testing.assert_close(by_wrapper, truth(model.features, 3))
    by_search = torch.cat(list(layer_features(model, None, x)))  # the last layer with a spatial output
    torch.testing.assert_close(by_search, truth(model.features, 256))
    flat = torch.cat(list(layer_features(model, "fc", x, batch_size=2, reshape=lambda t: t[:, :, None, None])))
    torch.testing.assert_close(flat[:, :, 0, 0], truth(model, 2))
    assert no_hooks(model)


def test_layer_features_errors_leave_no_hooks():
    model = tiny_cnn()
    model.train()
    raising = RaisesAfter(model)
    with pytest.raises(RuntimeError, match="boom after the layer"):
        next(layer_features(raising, "inner.features.3", tiny_input()))
    assert no_hooks(raising) and raising.training and model.features[1].training
    with pytest.raises(ValueError, match=r"not a 4-D \[B, C, h, w\] grid"):
        next(layer_features(model, "fc", tiny_input()))
    two = TwoHeads()
    with pytest.raises(ValueError, match="'shared' ran 2 times"):
        next(layer_features(two, "shared", tiny_input()))
    with pytest.raises(ValueError, match="'unused' did not run"):
        next(layer_features(two, "unused", tiny_input()))
    with pytest.raises(ValueError, match="returns tuple, not a tensor"):
        next(layer_features(two, "pair", tiny_input()))
    assert no_hooks(two)
    with pytest.raises(ValueError, match="'feature.3' is not a submodule"):
        layer_features(model, "feature.3", tiny_input())
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        layer_features(model, "features", tiny_input(), batch_size=0)
    with pytest.raises(TypeError, match="images must be a"):
        layer_features(model, "features", 3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        layer_features(lambda x: x, "features", tiny_input())
    with pytest.raises(TypeError, match=r"images\[1\] must be an image tensor"):
        next(layer_features(model, "features", [tiny_input(1)[0], "cat"]))


def test_discover_prototypes_end_to_end():
    model = tiny_cnn().train()
    x = tiny_input(batch=24)
    proto = discover_prototypes(model, "features.5", x, batch_size=10, n_prototypes=4, pca_dim=8, n_exemplars=3)
    feats = torch.cat(list(layer_features(model, "features.5", x)))
    assert proto.assignment.shape == (24, 8, 8)
    assert torch.equal(proto.assign(feats), proto.assignment)
    torch.testing.assert_close(proto.mean, rows64(feats).mean(dim=0).float(), rtol=1e-5, atol=1e-6)
    assert proto.options["n_prototypes"] == 4 and proto.options["n_exemplars"] == 3
    assert model.training and no_hooks(model)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_clusters'"):
        discover_prototypes(model, "features.5", x, n_clusters=4)


class _ItemsOnlyImages(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


@pytest.mark.parametrize("wrap", ["tensor-dataset", "items-only"])
def test_discover_prototypes_from_a_torch_dataset_equals_the_tensor(wrap):
    """A Dataset is read through a DataLoader, one per pass: the same prototypes as the tensor."""
    model = tiny_cnn()
    x = tiny_input(batch=24)
    data = torch.utils.data.TensorDataset(x, torch.zeros(24)) if wrap == "tensor-dataset" else _ItemsOnlyImages(x)
    options = dict(batch_size=10, n_prototypes=4, pca_dim=8, n_exemplars=3)
    ref = discover_prototypes(model, "features.5", x, **options)
    got = discover_prototypes(model, "features.5", data, **options)
    for name in ("mean", "components", "centroids", "distances"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.assignment, ref.assignment) and torch.equal(got.exemplars, ref.exemplars)


# ----------------------------------------------------------------------------------------------
# Bad input


def small_features():
    return torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(n_prototypes=0), ValueError, r"n_prototypes: expected a positive int, got 0"),
        (dict(n_prototypes=True), TypeError, "n_prototypes: expected a positive int, got bool"),
        (dict(n_prototypes=2.5), TypeError, "n_prototypes: expected a positive int, got float"),
        (dict(pca_dim=0), ValueError, "pca_dim: expected a positive int"),
        (dict(max_fit_positions=0), ValueError, "max_fit_positions: expected a positive int"),
        (dict(n_init=0), ValueError, "n_init: expected a positive int"),
        (dict(max_iter=-1), ValueError, "max_iter: expected a positive int"),
        (dict(tol=-1e-3), ValueError, "tol: expected a finite number >= 0"),
        (dict(tol=float("nan")), ValueError, "tol: expected a finite number >= 0"),
        (dict(n_exemplars=-1), ValueError, "n_exemplars: expected an int >= 0"),
        (dict(progress="yes"), TypeError, "progress must be a bool"),
        (dict(n_prototypes=25), ValueError, r"n_prototypes=25 is more than the 24 positions"),
        (dict(n_prototypes=6, max_fit_positions=5), ValueError, r"n_prototypes=6 is more than the 5 positions .*max_fit_positions=5"),
    ],
)
def test_bad_options(options, error, message):
    features = small_features()
    with pytest.raises(error, match=message):
        fit_prototypes(lambda: [features], **{"n_prototypes": 2, **options})


def with_bad(index, value):
    """Batches of good features with ``value`` as batch ``index``."""
    good = small_features()
    return lambda: [good] * index + [value, good]


def one_nan_one_inf():
    x = small_features().clone()
    x[1, 2, 0, 1] = float("nan")
    x[3, 0, 1, 1] = float("-inf")
    return x


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: [], ValueError, "yielded no feature positions"),
        (lambda: iter([torch.zeros(0, 4, 2, 2)]), ValueError, "yielded no feature positions"),
        (with_bad(1, torch.zeros(6, 4, 4)), ValueError, r"feature batch 1 \(covariance\) must be 4-D \[B, C, h, w\], got shape \(6, 4, 4\)"),
        (with_bad(2, torch.full((2, 4, 2, 2), float("nan"))), ValueError, r"feature batch 2 \(covariance\) contains 32 NaN/inf"),
        (with_bad(1, one_nan_one_inf()), ValueError, r"feature batch 1 \(covariance\) contains 2 NaN/inf"),
        (with_bad(1, torch.zeros(6, 5, 2, 2)), ValueError, r"feature batch 1 .*C, h, w = \(5, 2, 2\), earlier batches \(4, 2, 2\)"),
        (with_bad(1, torch.zeros(6, 4, 2, 3)), ValueError, r"C, h, w = \(4, 2, 3\), earlier batches \(4, 2, 2\)"),
        (with_bad(1, torch.zeros(6, 4, 2, 2, dtype=torch.int64)), TypeError, "feature batch 1 .*floating-point tensor, got torch.int64"),
        (with_bad(1, np.zeros((6, 4, 2, 2))), TypeError, "feature batch 1 .*must be a torch.Tensor"),
        (lambda: 5, TypeError, "feature_batches\\(\\) must return an iterable"),
    ],
)
def test_bad_feature_batches(make, error, message):
    with pytest.raises(error, match=message):
        fit_prototypes(make, n_prototypes=2)


def test_feature_batches_must_be_a_fresh_callable():
    features = small_features()
    with pytest.raises(TypeError, match="feature_batches must be a zero-argument callable"):
        fit_prototypes([features], n_prototypes=2)
    once = iter([features, features])  # the second call finds the iterator spent
    with pytest.raises(ValueError, match=r"gave 48 positions \(12 samples\) on the first pass and 0 on the second"):
        fit_prototypes(lambda: once, n_prototypes=2)
    # Data that changes shape between the passes is caught on the second pass too.
    calls = []

    def changing():
        calls.append(1)
        return [features] if len(calls) == 1 else [features[:, :3]]

    with pytest.raises(ValueError, match=r"feature batch 0 \(projection\) has C, h, w = \(3, 2, 2\)"):
        fit_prototypes(changing, n_prototypes=2)


def test_progress_bars(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    fit_prototypes(lambda: [small_features()], n_prototypes=2, progress=True)
    err = term.getvalue()
    assert "prototypes: covariance" in err and "prototypes: projection" in err and "prototypes: k-means" in err
    # Off a terminal (pytest's captured stderr) the same call draws nothing.
    monkeypatch.undo()
    fit_prototypes(lambda: [small_features()], n_prototypes=2, progress=True)
    assert "prototypes:" not in capsys.readouterr().err
