"""Stages 3-8 (i2x.analysis) against independent truths.

Truths: numpy's ``np.linalg.solve`` and sklearn's ``Ridge`` (ridge), a planted linear relation, a
Python loop (intensity), a direct ``sklearn.cluster.HDBSCAN`` call (groups), hand-made predictions
(confusions, separation), hand-computed scores, and a run store with planted structure: a prototype
the whole class uses, one only a variant uses, a pair that separates at a known step, a pair still
confused at the end, and saliency grids whose top positions are known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import HDBSCAN
from sklearn.linear_model import Ridge

import i2x.analysis.readings
import i2x.store.atomic
from i2x import analysis as an
from i2x.store import RunStore, RunStoreError


def _np_standardize(x: np.ndarray) -> np.ndarray:
    # Independent twin of standardize_columns: population std; columns whose values are all equal
    # -> 0 (their float64 std is rounding residue, not variance).
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    out = np.zeros_like(x)
    ok = np.ptp(x, axis=0) > 0
    out[:, ok] = (x[:, ok] - mean[ok]) / std[ok]
    return out


# ----------------------------------------------------------------------------------------------
# A run with planted structure
#
# Classes: 0 with two variants (A: 20 samples, confidence rises early; B: 30, rises late), 1 (25),
# 2 (25, of which 10 stay predicted as class 1). Grid 4x4, K = 5 prototypes:
#   0  class 0's object (positions 0-5 of every class-0 sample)          -> shared by class 0
#   1  a part only variant A has (positions 6-9 of A samples)            -> specialised (variant A)
#   2  background, constant saliency (dP = 0)                            -> neither
#   3  class 1's object, 4  class 2's object (positions 0-5)
# Object saliency = 1 + 2 * p_true (+ a zero-mean offset per position), so dP tracks dY.

H, W, K = 4, 4, 5
STEPS = [0, 10, 20, 40, 80, 160]
N_A, N_B, N_1, N_2, N_2_CONFUSED = 20, 30, 25, 25, 10
N = N_A + N_B + N_1 + N_2
BASE_A = [0.34, 0.70, 0.85, 0.90, 0.92, 0.93]
BASE_B = [0.34, 0.36, 0.40, 0.60, 0.85, 0.92]
OBJECT_OFFSETS = [0.5, 0.3, 0.1, -0.1, -0.3, -0.5]  # positions 0-5
PART_OFFSETS = [0.4, 0.2, -0.2, -0.4]  # positions 6-9
BACKGROUND = 0.5


def _planted_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    T = len(STEPS)
    labels = np.array([0] * (N_A + N_B) + [1] * N_1 + [2] * N_2)
    variant = np.array(["A"] * N_A + ["B"] * N_B + ["-"] * (N_1 + N_2))
    confused = np.zeros(N, bool)
    confused[N_A + N_B + N_1: N_A + N_B + N_1 + N_2_CONFUSED] = True
    u = rng.uniform(-1, 1, size=(T, N))
    probs = np.zeros((T, N, 3))
    for i in range(N):
        if labels[i] == 0:
            p0 = np.array(BASE_A if variant[i] == "A" else BASE_B) + 0.01 * u[:, i]
            probs[:, i] = np.stack([p0, 0.75 * (1 - p0), 0.25 * (1 - p0)], 1)
        elif labels[i] == 1:
            p1 = 0.8 + 0.01 * u[:, i]
            probs[:, i] = np.stack([np.full(T, 0.1), p1, 0.9 - p1], 1)
        elif confused[i]:
            p2 = 0.3 + 0.01 * u[:, i]
            probs[:, i] = np.stack([np.full(T, 0.1), 0.9 - p2, p2], 1)
        else:
            p2 = 0.8 + 0.01 * u[:, i]
            probs[:, i] = np.stack([np.full(T, 0.1), 0.9 - p2, p2], 1)
    assignment = np.full((N, H * W), 2, dtype=np.int64)
    saliency = np.full((T, N, H * W), BACKGROUND)
    object_proto = {0: 0, 1: 3, 2: 4}
    for i in range(N):
        c = labels[i]
        v = 1 + 2 * probs[:, i, c]  # [T]
        assignment[i, :6] = object_proto[c]
        saliency[:, i, :6] = v[:, None] + np.array(OBJECT_OFFSETS)[None]
        if variant[i] == "A":
            assignment[i, 6:10] = 1
            saliency[:, i, 6:10] = v[:, None] + np.array(PART_OFFSETS)[None]
    return {
        "labels": labels, "variant": variant, "confused": confused, "probs": probs.astype(np.float32),
        "assignment": assignment.reshape(N, H, W), "saliency": saliency.reshape(T, N, H, W).astype(np.float32),
    }


def _make_store(path: Path, probs, saliency, labels, assignment=None, k=K, steps=None, classes=None) -> RunStore:
    probs, saliency = torch.as_tensor(probs), torch.as_tensor(saliency)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    m = probs.shape[-1]
    store = RunStore.create(
        path, model={"name": "planted"}, dataset={"name": "synthetic"},
        classes=classes or [f"class{c}" for c in range(m)],
        probe_indices=torch.arange(100, 100 + labels.numel()), probe_labels=labels)
    steps = steps or list(range(0, 10 * probs.shape[0], 10))
    for t, step in enumerate(steps):
        store.write_checkpoint(step, saliency[t], probs[t], final=t == len(steps) - 1)
    if assignment is not None:
        store.write_tensors("prototypes", {"assignment": torch.as_tensor(assignment, dtype=torch.int64),
                                           "centroids": torch.randn(k, 3)})
    return store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    arrays = _planted_arrays()
    path = tmp_path_factory.mktemp("planted") / "run"
    _make_store(path, arrays["probs"], arrays["saliency"], arrays["labels"], arrays["assignment"], steps=STEPS,
                classes=["zero", "one", "two"])
    result = an.analyze(path)
    return path, arrays, result


# ----------------------------------------------------------------------------------------------
# 1-2. Intensity and changes


def test_intensity_matches_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    T, n, h, w, k = 3, 5, 3, 4, 6
    saliency = torch.rand(T, n, h, w, generator=g) * 3
    assignment = torch.randint(0, k - 1, (n, h, w), generator=g)  # prototype k-1 never occurs
    P, counts = an.prototype_intensity(saliency, assignment, k)
    assert P.dtype == torch.float32 and counts.dtype == torch.int64
    assert tuple(P.shape) == (T, n, k) and tuple(counts.shape) == (n, k)
    s, a = saliency.numpy().astype(np.float64), assignment.numpy()
    for i in range(n):
        for proto in range(k):
            where = [(r, c) for r in range(h) for c in range(w) if a[i, r, c] == proto]
            assert counts[i, proto] == len(where)
            for t in range(T):
                expected = sum(s[t, i, r, c] for r, c in where) / len(where) if where else 0.0
                assert P[t, i, proto].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert (counts[:, k - 1] == 0).all() and (P[:, :, k - 1] == 0).all()


def test_intensity_and_changes_reject_bad_input():
    sal, a = torch.rand(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"assignment: expected shape \[N, h, w\] = \[3, 4, 4\]"):
        an.prototype_intensity(sal, a[:, :3], 2)
    with pytest.raises(ValueError, match=r"assignment: expected prototype indices in \[0, 1\]"):
        an.prototype_intensity(sal, a + 2, 2)
    with pytest.raises(TypeError, match="assignment: expected an integer tensor"):
        an.prototype_intensity(sal, a.float(), 2)
    bad = sal.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="saliency: expected finite values"):
        an.prototype_intensity(bad, a, 2)
    with pytest.raises(ValueError, match="must agree in T and N"):
        an.changes(torch.rand(3, 4, 2), torch.rand(3, 5, 2))
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        an.changes(torch.rand(1, 4, 2), torch.rand(1, 4, 2))


def test_changes_are_consecutive_differences():
    P = torch.tensor([[[1.0, 2.0]], [[1.5, 1.0]], [[0.5, 4.0]]])
    Y = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]], [[0.9, 0.1]]])
    dP, dY = an.changes(P, Y)
    assert torch.allclose(dP, torch.tensor([[[0.5, -1.0]], [[-1.0, 3.0]]], dtype=torch.float64))
    assert torch.allclose(dY, torch.tensor([[[0.4, -0.4]], [[0.3, -0.3]]], dtype=torch.float64), atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 3. Ridge


def test_ridge_matches_numpy_solve_on_a_hand_built_problem():
    pi = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 0.0], [2.0, -1.0, 1.0], [0.5, 0.5, 0.5]],
                      dtype=torch.float64)
    C = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -0.2]], dtype=torch.float64)
    lam = 0.7
    expected = np.linalg.solve(pi.numpy().T @ pi.numpy() + lam * np.eye(3), pi.numpy().T @ C.numpy())
    got = an.ridge_beta(pi, C, lam, standardize=False)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [0.01, 1.0, 25.0])
def test_ridge_matches_sklearn_on_standardised_inputs(lam):
    rng = np.random.default_rng(3)
    dp = rng.normal(size=(40, 6)) * rng.uniform(0.1, 5, size=6) + rng.normal(size=6)
    dp[:, 4] = 0.37  # a constant column: standardised to zeros, its beta row must be 0
    dy = rng.normal(size=(40, 3))
    dp, dy = dp.astype(np.float32), dy.astype(np.float32)  # the float32 inputs both sides see
    expected = Ridge(alpha=lam, fit_intercept=False).fit(_np_standardize(dp.astype(np.float64)),
                                                         dy.astype(np.float64)).coef_.T
    got = an.ridge_beta(torch.from_numpy(dp), torch.from_numpy(dy), lam)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(got).all() and (got[4] == 0).all()


def test_ridge_recovers_a_planted_linear_relation():
    rng = np.random.default_rng(4)
    T1, n, k, m = 3, 200, 5, 4
    dP = rng.normal(size=(T1, n, k)) * 2 + 1
    B = rng.normal(size=(T1, k, m))
    dY = np.stack([_np_standardize(dP[t]) @ B[t] for t in range(T1)])
    beta = an.ridge_sequence(torch.tensor(dP), torch.tensor(dY), 1e-8)
    assert tuple(beta.shape) == (T1, k, m)
    np.testing.assert_allclose(beta.numpy(), B, rtol=1e-6, atol=1e-7)


def test_ridge_sequence_mask_uses_only_the_masked_samples():
    rng = np.random.default_rng(5)
    dP, dY = rng.normal(size=(2, 30, 4)), rng.normal(size=(2, 30, 3))
    mask = np.zeros(30, bool)
    mask[::3] = True
    got = an.ridge_sequence(torch.tensor(dP), torch.tensor(dY), 2.0, torch.tensor(mask))
    for t in range(2):
        expected = Ridge(alpha=2.0, fit_intercept=False).fit(_np_standardize(dP[t, mask]), dY[t, mask]).coef_.T
        np.testing.assert_allclose(got[t].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ridge_rejects_bad_input():
    x, y = torch.rand(5, 3), torch.rand(5, 2)
    with pytest.raises(ValueError, match="must share their leading dims"):
        an.ridge_beta(x, torch.rand(4, 2), 1.0)
    with pytest.raises(ValueError, match="lam: expected a positive finite number, got 0.0"):
        an.ridge_beta(x, y, 0.0)
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="pi: expected finite values"):
        an.ridge_beta(bad, y, 1.0)
    with pytest.raises(ValueError, match=r"sample_mask: expected 5 entries"):
        an.ridge_sequence(x[None], y[None], 1.0, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="sample_mask: expected a bool tensor"):
        an.ridge_sequence(x[None], y[None], 1.0, torch.ones(5))


# ----------------------------------------------------------------------------------------------
# 4. Groups


def test_groups_equal_a_direct_hdbscan_call():
    rng = np.random.default_rng(6)
    sizes = [40, 120, 8]  # min_cluster_size 5, 6, and a class too small for HDBSCAN
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    rng.shuffle(labels)
    T1, n = 4, labels.size
    centres = rng.normal(size=(3, T1)) * 0.3
    dY = rng.normal(size=(T1, n, 3)) * 0.05
    for i in range(n):  # three loose blobs per class in the true-class column
        dY[:, i, labels[i]] += centres[i % 3]
    groups = an.find_groups(torch.tensor(dY), torch.tensor(labels), 3, group_min_fraction=0.05)
    assert groups.dtype == torch.int64 and groups.shape == (n,)
    for c, size in enumerate(sizes):
        members = np.flatnonzero(labels == c)
        mcs = max(5, round(0.05 * size))
        if size < 2 * mcs:
            expected = np.zeros(size, dtype=np.int64)
        else:
            expected = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(dY[:, members, c].T)
        np.testing.assert_array_equal(groups[members].numpy(), expected)
    assert len(set(groups[labels == 1].tolist()) - {-1}) >= 2  # the blobs were found at all


def test_planted_variants_split_into_two_groups(planted):
    _, arrays, result = planted
    groups = result.groups.numpy()
    in_class = arrays["labels"] == 0
    ids = sorted(set(groups[in_class].tolist()) - {-1})
    assert len(ids) == 2
    for g in ids:  # each HDBSCAN group holds one variant only
        assert len(set(arrays["variant"][in_class & (groups == g)])) == 1
    for v in "AB":  # and each variant sits (almost) entirely in one group
        members = groups[arrays["variant"] == v]
        assert np.bincount(members[members >= 0]).max() >= 0.9 * members.size
    summary = result.data["groups"][0]
    assert summary["method"] == "hdbscan" and summary["min_cluster_size"] == 5
    assert sum(r["size"] for r in summary["groups"]) == N_A + N_B


# ----------------------------------------------------------------------------------------------
# 5-6. Presence, shared and specialised


def test_presence_counts_samples_with_the_prototype():
    counts = torch.tensor([[2, 0, 1], [0, 0, 3], [1, 0, 0], [4, 1, 0]])
    labels = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(an.presence(counts), torch.tensor([0.75, 0.25, 0.5], dtype=torch.float64))
    torch.testing.assert_close(an.class_presence(counts, labels, 3),
                               torch.tensor([[0.5, 0, 1], [1, 0.5, 0], [0, 0, 0]], dtype=torch.float64))


def test_shared_and_specialised_on_hand_made_inputs():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    shared, specialised = an.shared_and_specialised(
        class_presence_c=t([1.0, 0.4, 1.0, 0.0]),
        class_mean_beta=t([0.2, 0.1, -0.1, 0.3]),
        group_presence={0: t([1, 1, 1, 0]), 1: t([1, 0, 1, 0]), -1: t([1, 0.5, 1, 0])},
        group_mean_beta={0: t([0.1, 0.3, 0.1, 0]), 1: t([0.2, -0.1, 0, 0]), -1: None},
        shared_presence=0.5,
    )
    # 0: everywhere and positive. 1: below 0.5 in the class, carried by group 0, absent from group 1.
    # 2: negative in the class and present in every group (no variant). 3: absent.
    assert [e["prototype"] for e in shared] == [0]
    assert [e["prototype"] for e in specialised] == [1]
    entry = specialised[0]
    assert entry["variant_groups"] == [0] and entry["absent_in"] == [1]
    assert entry["presence"] == pytest.approx(0.4) and entry["mean_beta"] == pytest.approx(0.1)
    assert {g["group"]: g["mean_beta"] for g in entry["groups"]} == {-1: None, 0: pytest.approx(0.3)}


def test_planted_shared_and_specialised_prototypes(planted):
    _, arrays, result = planted
    groups = result.groups.numpy()
    group_of = lambda v: int(np.bincount(groups[(arrays["variant"] == v) & (groups >= 0)]).argmax())  # noqa: E731
    c0 = result.data["per_class"][0]
    assert [e["prototype"] for e in c0["shared"]] == [0]
    assert c0["shared"][0]["presence"] == 1.0 and c0["shared"][0]["mean_beta"] > 0
    assert [e["prototype"] for e in c0["specialised"]] == [1]
    spec = c0["specialised"][0]
    assert spec["presence"] == pytest.approx(N_A / (N_A + N_B))
    assert spec["variant_groups"] == [group_of("A")] and group_of("B") in spec["absent_in"]
    assert [e["prototype"] for e in result.data["per_class"][1]["shared"]] == [3]
    assert [e["prototype"] for e in result.data["per_class"][2]["shared"]] == [4]
    # The planted presences come back exactly.
    pres = result.tensors["presence_class"]
    assert pres[0, 0] == 1 and pres[0, 1] == pytest.approx(0.4) and pres[0, 3] == 0 and pres[1, 3] == 1


# ----------------------------------------------------------------------------------------------
# 7. Confusions and separation


def _hand_probs():
    # labels [0, 0, 1, 1, 2, 2]; predicted classes per checkpoint (0.7 on the prediction, 0.15 elsewhere)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = [[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2]]
    probs = torch.full((4, 6, 3), 0.15)
    for i, seq in enumerate(preds):
        for t, p in enumerate(seq):
            probs[t, i, p] = 0.7
    return probs, labels


def test_confusion_and_separation_on_hand_made_predictions():
    probs, labels = _hand_probs()
    hard, soft = an.confusion_matrices(probs, labels)
    assert hard.dtype == torch.int64 and tuple(hard.shape) == (4, 3, 3)
    assert hard[0].tolist() == [[0, 2, 0], [1, 1, 0], [0, 1, 1]]
    assert hard[3].tolist() == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    sizes = torch.tensor([2, 2, 2])
    e01 = an.pair_error(hard, sizes, 0, 1)
    assert e01.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert an.pair_error(soft, sizes, 0, 1)[3].item() == pytest.approx(0.6 / 4)
    assert an.separation_index(e01, 0.05) == 2
    assert an.separation_index(an.pair_error(hard, sizes, 1, 2), 0.05) is None
    assert an.separation_index(an.pair_error(hard, sizes, 0, 2), 0.05) == 0
    assert an.separation_index(torch.tensor([0.3, 0.05, 0.04]), 0.05) == 1  # <= threshold counts
    assert an.separation_index(torch.tensor([0.0, 0.1, 0.0]), 0.05) == 2  # must *stay* below

    beta = torch.zeros(3, 4, 3)
    beta[1, :, 0] = torch.tensor([0.5, -0.9, 0.2, 2.0])  # the transition into checkpoint 2
    presence = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    timeline, skipped = an.separation_timeline(hard, soft, sizes, beta, presence, [5, 6, 7, 8], 0.05, 2, 0.1,
                                               ["a", "b", "c"])
    assert skipped == []
    assert [(e["pair"], e["separated_at"], e["status"]) for e in timeline] == [
        ([0, 2], 5, "separated from the start"), ([0, 1], 7, "separated"), ([1, 2], None, "still confused")]
    protos = timeline[1]["prototypes"]  # prototype 3 is absent from the pair: excluded despite |d| = 2
    assert [(p["prototype"], p["d"]) for p in protos] == [(1, pytest.approx(-0.9)), (0, pytest.approx(0.5))]
    assert protos[0]["presence"] == pytest.approx(0.75)
    assert timeline[1]["names"] == ["a", "b"] and timeline[2]["prototypes"] == []
    assert an.most_confused_pairs(hard[-1], soft[-1], sizes, 2) == [(1, 2), (0, 1)]


def test_planted_timeline(planted):
    _, _, result = planted
    timeline = {tuple(e["pair"]): e for e in result.data["timeline"]}
    assert timeline[(0, 1)]["separated_at"] == 40 and timeline[(0, 1)]["separated_at_index"] == 3
    assert timeline[(0, 1)]["error"][:4] == pytest.approx([50 / 75, 30 / 75, 30 / 75, 0.0])
    assert timeline[(0, 2)]["separated_at"] == 0
    assert timeline[(1, 2)]["separated_at"] is None and timeline[(1, 2)]["final_error"] == pytest.approx(0.2)
    assert [e["pair"] for e in result.data["timeline"]] == [[0, 2], [0, 1], [1, 2]]  # by separation step
    protos = timeline[(0, 1)]["prototypes"]
    # The rule, applied by hand: at beta index t - 1 = 2 of the pooled regression, the 3 largest
    # |beta[k, 0] - beta[k, 1]| among prototypes present in >= 10% of the pair's samples.
    beta = result.beta_pooled[2].double()
    sizes = torch.tensor(result.data["class_sizes"], dtype=torch.float64)
    cls = result.tensors["presence_class"].double()
    pair_presence = (sizes[0] * cls[0] + sizes[1] * cls[1]) / (sizes[0] + sizes[1])
    d = beta[:, 0] - beta[:, 1]
    eligible = [k for k in range(K) if pair_presence[k] >= 0.1]
    expected = sorted(eligible, key=lambda k: -abs(float(d[k])))[:3]
    assert len(expected) >= 1
    assert [p["prototype"] for p in protos] == expected
    for p in protos:
        assert p["d"] == pytest.approx(float(d[p["prototype"]]))
        assert p["presence"] == pytest.approx(float(pair_presence[p["prototype"]]))
    assert result.tensors["confusion"][-1, 2, 1] == N_2_CONFUSED


# ----------------------------------------------------------------------------------------------
# 8. Uncertainty


@pytest.mark.parametrize("d, changes, sign_score, cancel_score", [
    ([1.0, -2.0, 0.0, 3.0], 2, 2 * 1.5, (1 - 2 / 6) * 1.5),
    ([-1.0, 1.0, -1.0, 1.0], 3, 3.0, 1.0),
    ([0.5, 0.0, 0.25], 0, 0.0, 0.0),
    ([0.0, 0.0, 0.0], 0, 0.0, 0.0),
    ([0.0, -0.4, 0.0, 0.2], 1, 0.15, (1 - 0.2 / 0.6) * 0.15),
])
def test_uncertainty_scores_hand_computed(d, changes, sign_score, cancel_score):
    assert an.sign_changes(torch.tensor(d)) == changes
    assert an.score_sign_changes(torch.tensor(d)) == pytest.approx(sign_score)
    assert an.score_cancellation(torch.tensor(d)) == pytest.approx(cancel_score)


def test_prototype_scores_by_name_and_by_callable():
    d = torch.tensor([[1.0, -1.0], [-2.0, -1.0], [0.0, 1.0], [3.0, -1.0]])  # [T-1 = 4, K = 2]
    # column 0: 2 sign changes x mean 1.5; (1 - 2/6) x 1.5.  column 1: 2 x 1; (1 - 2/4) x 1
    torch.testing.assert_close(an.prototype_scores(d, "sign_changes"), torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(an.prototype_scores(d, "cancellation"),
                               torch.tensor([1.0, 0.5], dtype=torch.float64))

    def peak(seq):
        """U = max_t |d_t|"""
        return float(seq.abs().max())

    torch.testing.assert_close(an.prototype_scores(d, peak), torch.tensor([3.0, 1.0], dtype=torch.float64))
    name, _, formula = an.resolve_uncertainty_score(peak)
    assert name.startswith("callable:") and name.endswith("peak") and formula == "U = max_t |d_t|"
    with pytest.raises(ValueError, match=r"uncertainty_score: expected one of \['cancellation', 'sign_changes'"):
        an.prototype_scores(d, "wobble")
    with pytest.raises(ValueError, match="returned nan"):
        an.prototype_scores(d, lambda s: float("nan"))


def test_register_a_named_score():
    an.register_uncertainty_score("test_peak", lambda s: float(s.abs().max()), "U = max |d|")
    try:
        assert an.uncertainty_scores()["test_peak"] == "U = max |d|"
        assert an.prototype_scores(torch.tensor([[1.0], [-4.0]]), "test_peak").item() == 4.0
        with pytest.raises(ValueError, match="already registered"):
            an.register_uncertainty_score("test_peak", abs, "x")
    finally:
        i2x.analysis.readings._SCORES.pop("test_peak", None)


def test_swing_score_hand_computed():
    assert an.score_swing(torch.tensor([0.5, -0.2, 0.3, -0.1])) == pytest.approx(0.3)  # min(0.8, 0.3)
    assert an.score_swing(torch.tensor([1.0, 2.0, 0.5])) == 0.0  # one-sided: never uncertain
    # Flips among negligible early values barely count, unlike a count of sign changes.
    noisy_start = torch.tensor([1e-4, -1e-4, 1e-4, -1e-4, 1.0, 0.9])
    assert an.score_swing(noisy_start) == pytest.approx(2e-4)
    assert an.score_sign_changes(noisy_start) == pytest.approx(4 * noisy_start.abs().mean().item())
    assert an.score_swing(torch.zeros(0)) == 0.0


def test_flag_rule():
    scores = torch.tensor([3.0, 1.0, 1.5, 0.0, 10.0], dtype=torch.float64)  # 1.5 = 0.5 x 3: flagged (>=)
    eligible = torch.tensor([True, True, True, True, False])
    assert an.flag_uncertain(scores, eligible, 0.5).tolist() == [True, False, True, False, False]
    assert an.flag_uncertain(scores, eligible, 0.0).tolist() == [True, True, True, False, False]  # U > 0 still needed
    assert not an.flag_uncertain(scores, torch.zeros(5, dtype=torch.bool), 0.5).any()
    with pytest.raises(ValueError, match=r"flag_fraction: expected a number in \[0, 1\], got 1.5"):
        an.flag_uncertain(scores, eligible, 1.5)
    res = an.pair_uncertainty(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.tensor([0.5, 0.05]), min_presence=0.1)
    assert res["eligible"].tolist() == [True, False] and res["flagged"].tolist() == [True, False]


def test_planted_uncertainty_follows_the_stored_sequences(planted):
    _, _, result = planted
    entries = result.data["uncertainty"]
    assert [e["pair"] for e in entries] == [[1, 2], [0, 1], [0, 2]]  # 10 hard confusions, then by soft
    assert entries[0]["hard_confusions"] == N_2_CONFUSED and entries[0]["regression"] == "pair"
    assert entries[0]["formula"].startswith("U_k = min(sum_t max(d_k^t, 0)")
    for e in entries:
        a, b = e["pair"]
        key = f"uncertainty.a{a}.b{b}"
        beta = result.tensors[f"beta_pair.a{a}.b{b}"]
        torch.testing.assert_close(result.tensors[f"{key}.d"], beta[:, :, a] - beta[:, :, b])
        d = result.tensors[f"{key}.d"].double()
        expected = torch.tensor([an.score_swing(d[:, k]) for k in range(K)], dtype=torch.float64)
        torch.testing.assert_close(result.tensors[f"{key}.score"], expected)
        # Candidates must be present in both classes of the pair (uncertainty_presence="both_classes").
        both = torch.minimum(result.tensors["presence_class"][a], result.tensors["presence_class"][b])
        torch.testing.assert_close(result.tensors[f"{key}.presence"], both.float())
        assert result.tensors[f"{key}.eligible"].tolist() == (both >= 0.1).tolist()
        flagged = result.tensors[f"{key}.flagged"]
        assert [f["prototype"] for f in e["flagged"]] == sorted(
            flagged.nonzero().flatten().tolist(), key=lambda k: -float(expected[k]))


def test_decisive_reading_on_hand_made_sequences():
    # Prototype 0 pushes towards a all along (a shortcut): no swing, the largest |mean d|.
    # Prototype 1 swings both ways and cancels out; prototype 2 pushes towards b a little;
    # prototype 3 would be the most decisive but is present in too few of the pair's samples.
    d = torch.tensor([[0.4, 0.5, -0.1, 2.0], [0.6, -0.5, -0.1, 2.0], [0.5, 0.5, -0.1, 2.0]])
    presence = torch.tensor([0.45, 0.9, 0.8, 0.01])
    res = an.pair_decisive(d, presence, min_presence=0.05, flag_fraction=0.5)
    torch.testing.assert_close(res["score"], torch.tensor([0.5, 0.5 / 3, 0.1, 2.0], dtype=torch.float64))
    assert res["direction"].tolist() == [1, 1, -1, 1]
    assert res["eligible"].tolist() == [True, True, True, False]
    assert res["flagged"].tolist() == [True, False, False, False]  # 0.5 * 0.5 = 0.25 > 1/6 and 0.1
    assert an.score_swing(d[:, 0]) == 0.0  # what the ambivalent reading sees of it: nothing
    with pytest.raises(ValueError, match=r"pair_presence: expected \[4\]"):
        an.pair_decisive(d, presence[:3])


def test_planted_decisive_entries_follow_the_stored_sequences(planted):
    _, _, result = planted
    for e in result.data["uncertainty"]:
        a, b = e["pair"]
        key = f"uncertainty.a{a}.b{b}"
        d = result.tensors[f"{key}.d"].double()
        expected = d.mean(0).abs()
        torch.testing.assert_close(result.tensors[f"{key}.decisive_score"], expected)
        pc = result.tensors["presence_class"].double()
        n = torch.tensor(result.data["class_sizes"], dtype=torch.float64)
        pair_share = (n[a] * pc[a] + n[b] * pc[b]) / (n[a] + n[b])
        eligible = pair_share >= an.DEFAULTS["decisive_presence"]
        top = expected[eligible].max()
        flagged = eligible & (expected > 0) & (expected >= an.DEFAULTS["decisive_fraction"] * top)
        assert result.tensors[f"{key}.decisive_flagged"].tolist() == flagged.tolist()
        assert [p["prototype"] for p in e["decisive"]] == sorted(flagged.nonzero().flatten().tolist(),
                                                                 key=lambda k: -float(expected[k]))
        for p in e["decisive"]:
            towards = a if float(d[:, p["prototype"]].sum()) >= 0 else b
            assert p["towards"] == towards and p["reason"].startswith("decisive: pushed towards")
        listed = result.flagged_prototypes(a, b)
        assert [p["prototype"] for p in listed[:len(e["flagged"])]] == [p["prototype"] for p in e["flagged"]]
        assert len({p["prototype"] for p in listed}) == len(listed)


def test_explicit_pairs_are_analysed_beside_the_most_confused(tmp_path):
    arr = _planted_arrays(seed=2)
    store = _make_store(tmp_path / "run", arr["probs"], arr["saliency"], arr["labels"], arr["assignment"])
    result = an.analyze(store, n_pairs=1, pairs=[[2, 0]])
    assert [e["pair"] for e in result.data["uncertainty"]] == [[1, 2], [0, 2]]
    assert result.options["pairs"] == [[0, 2]]
    with pytest.raises(ValueError, match="pairs: a pair needs two different classes"):
        an.analyze(store, pairs=[[1, 1]])
    with pytest.raises(ValueError, match=r"pairs: \(0, 7\) is not a pair of the run's 3 classes"):
        an.analyze(store, pairs=[[0, 7]])


# ----------------------------------------------------------------------------------------------
# 9. analyze / load_analysis: files, atomic rewrites, errors


def _same_analysis(x: an.Analysis, y: an.Analysis) -> None:
    assert x.data == y.data
    assert sorted(x.tensors) == sorted(y.tensors)
    for key in x.tensors:
        assert x.tensors[key].dtype == y.tensors[key].dtype, key
        assert torch.equal(x.tensors[key], y.tensors[key]), key


def test_analyze_writes_files_that_load_back_identically(planted):
    path, _, result = planted
    loaded = an.load_analysis(path)
    _same_analysis(result, loaded)
    on_disk = json.loads((path / "analysis.json").read_text())
    assert on_disk["options"] == an.DEFAULTS and on_disk["schema_version"] == an.SCHEMA_VERSION
    assert on_disk["steps"] == STEPS and on_disk["classes"] == ["zero", "one", "two"]
    T, M = len(STEPS), 3
    shapes = {"intensity": (T, N, K), "counts": (N, K), "beta_pooled": (T - 1, K, M), "beta_class": (M, T - 1, K, M),
              "groups": (N,), "confusion": (T, M, M)}
    for key, shape in shapes.items():
        assert tuple(loaded.tensors[key].shape) == shape, key
    for c, summary in enumerate(on_disk["groups"]):
        for row in summary["groups"]:
            assert (f"beta_group.c{c}.g{row['group']}" in loaded.tensors) == (row["regression"] == "fitted")
    assert RunStore.open(path).stage("analysis")["options"] == an.DEFAULTS


def test_rerun_overwrites_atomically(tmp_path, monkeypatch):
    a = _planted_arrays(seed=1)
    path = tmp_path / "run"
    _make_store(path, a["probs"], a["saliency"], a["labels"], a["assignment"], steps=STEPS)
    first = an.analyze(path)
    second = an.analyze(path, ridge_lambda=0.25, uncertainty_score="cancellation", uncertainty_regression="pooled")
    loaded = an.load_analysis(path)
    _same_analysis(second, loaded)
    assert loaded.options["ridge_lambda"] == 0.25 and loaded.options["uncertainty_score"] == "cancellation"
    assert not any("beta_pair" in key for key in loaded.tensors)  # the earlier run's extra keys are gone
    assert not list(path.glob(".i2x-tmp-*"))

    # A crash while writing the tensors leaves the previous analysis whole.
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(i2x.store.atomic, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        an.analyze(path)
    monkeypatch.undo()
    _same_analysis(second, an.load_analysis(path))
    assert not list(path.glob(".i2x-tmp-*"))

    # A crash between the two files leaves a pair that is refused, never silently mixed.
    monkeypatch.setattr(RunStore, "write_json", broken_save)
    with pytest.raises(OSError):
        an.analyze(path, ridge_lambda=3.0)
    monkeypatch.undo()
    with pytest.raises(RunStoreError, match="does not belong to analysis.json"):
        an.load_analysis(path)
    _same_analysis(first, an.analyze(path))


def test_analyze_errors(tmp_path):
    a = _planted_arrays()
    one = _make_store(tmp_path / "one", a["probs"][:1], a["saliency"][:1], a["labels"], a["assignment"])
    with pytest.raises(ValueError, match="at least 2 finished checkpoints"):
        an.analyze(one)
    bare = _make_store(tmp_path / "bare", a["probs"][:2], a["saliency"][:2], a["labels"])
    with pytest.raises(FileNotFoundError, match="has no prototypes"):
        an.analyze(bare)
    with pytest.raises(FileNotFoundError, match=r"run `i2x analyze RUN` \(i2x.analyze\) first"):
        an.load_analysis(bare)
    wrong = _make_store(tmp_path / "wrong", a["probs"][:2], a["saliency"][:2], a["labels"],
                        a["assignment"][:, :, :3])
    with pytest.raises(ValueError, match=r"assignment has shape \[100, 4, 3\], but the run's probe and grid give \[100, 4, 4\]"):
        an.analyze(wrong)
    ok = _make_store(tmp_path / "ok", a["probs"][:2], a["saliency"][:2], a["labels"], a["assignment"])
    with pytest.raises(ValueError, match=r"shared_presence: expected a number in \[0, 1\], got 1.5"):
        an.analyze(ok, shared_presence=1.5)
    with pytest.raises(ValueError, match=r"min_presence: expected a number in \[0, 1\], got -0.1"):
        an.analyze(ok, min_presence=-0.1)
    with pytest.raises(ValueError, match="uncertainty_regression: expected one of"):
        an.analyze(ok, uncertainty_regression="global")
    with pytest.raises(ValueError, match="uncertainty_score: expected one of"):
        an.analyze(ok, uncertainty_score="entropy")
    with pytest.raises(ValueError, match="ridge_lambda: expected a positive finite number"):
        an.analyze(ok, ridge_lambda=float("nan"))
    with pytest.raises(TypeError, match=r"unknown options \['ridge'\]"):
        an.analyze(ok, ridge=1.0)
    with pytest.raises(TypeError, match="run: expected a run folder path or a RunStore"):
        an.analyze(42)
    assert not (tmp_path / "ok" / "analysis.json").exists()  # nothing was written by refused calls


def test_analyze_with_a_custom_score_and_two_checkpoints(tmp_path):
    a = _planted_arrays()
    store = _make_store(tmp_path / "run", a["probs"][:2], a["saliency"][:2], a["labels"], a["assignment"])

    def total_swing(d):
        """U = sum_t |d_t|"""
        return float(d.abs().sum())

    result = an.analyze(store, uncertainty_score=total_swing, uncertainty_regression="class_a", n_pairs=1)
    assert result.options["uncertainty_score"].endswith("total_swing")
    entry = result.data["uncertainty"][0]
    assert entry["formula"] == "U = sum_t |d_t|" and entry["regression"] == "class_a"
    a_, b_ = entry["pair"]
    beta = result.beta_class[a_]
    torch.testing.assert_close(result.tensors[f"uncertainty.a{a_}.b{b_}.d"], beta[:, :, a_] - beta[:, :, b_])
    # One transition: the trajectories are 1-D, which HDBSCAN still clusters (one beta per scope).
    assert result.groups.shape == (N,) and tuple(result.beta_pooled.shape) == (1, K, 3)

    # The prototypes are re-run afterwards: explaining from the stale analysis is refused.
    store.write_tensors("prototypes", {"assignment": torch.as_tensor(a["assignment"]).flip(2),
                                       "centroids": torch.randn(K, 3)})
    with pytest.raises(RunStoreError, match="prototypes changed since the analysis; re-run analyze"):
        an.explain_sample(store, 0)


# ----------------------------------------------------------------------------------------------
# 10. explain_sample


def test_explain_sample_returns_the_planted_positions_and_prototypes(planted):
    path, arrays, result = planted
    ex = an.explain_sample(path, 0, top=5)  # a variant-A sample of class 0, correctly predicted
    assert (ex.true_class, ex.predicted_class, ex.step, ex.dataset_index) == (0, 0, STEPS[-1], 100)
    # Offsets: +0.5 (0,0) proto 0, +0.4 (1,2) proto 1, +0.3 (0,1) proto 0, +0.2 (1,3) proto 1, +0.1 (0,2) proto 0
    assert [(p["row"], p["col"], p["prototype"]) for p in ex.positions] == [
        (0, 0, 0), (1, 2, 1), (0, 1, 0), (1, 3, 1), (0, 2, 0)]
    expected_sal = torch.tensor(arrays["saliency"][-1, 0]).half().float()
    assert [p["saliency"] for p in ex.positions] == [float(expected_sal[p["row"], p["col"]]) for p in ex.positions]
    assert [e.prototype for e in ex.prototypes] == [0, 1]
    assert ex.prototypes[0].positions == [[0, 0], [0, 1], [0, 2]]
    beta = an.load_analysis(path).beta_pooled
    assert ex.prototypes[1].beta_true_now == float(beta[-1, 1, 0])
    assert ex.prototypes[1].beta_true == [float(v) for v in beta[:, 1, 0]]

    confused = N_A + N_B + N_1  # the first class-2 sample still predicted as class 1
    ex2 = an.explain_sample(path, confused, top=5)
    assert (ex2.true_class, ex2.predicted_class) == (2, 1) and ex2.predicted_name == "one"
    assert [(p["row"], p["col"]) for p in ex2.positions] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert [e.prototype for e in ex2.prototypes] == [4]
    e4 = ex2.prototypes[0]
    assert e4.beta_predicted_now == float(beta[-1, 4, 1]) and e4.beta_true_now == float(beta[-1, 4, 2])
    expected_pairs = [u["pair"] for u in result.data["uncertainty"]
                      if {1, 2} & set(u["pair"]) and 4 in result.uncertain_prototypes(*u["pair"])]
    assert e4.uncertain_pairs == expected_pairs
    d = ex2.to_dict()
    assert json.loads(json.dumps(d)) == d and d["prototypes"][0]["prototype"] == 4
    text = str(ex2)
    assert "predicted 'one'" in text and "prototype 4" in text and "WRONG" in text


def test_explain_sample_errors(planted):
    path, _, _ = planted
    with pytest.raises(IndexError, match=rf"probe size {N}"):
        an.explain_sample(path, N)
    with pytest.raises(IndexError, match="probe size"):
        an.explain_sample(path, -1)
    with pytest.raises(TypeError, match="index: expected an int"):
        an.explain_sample(path, 1.0)
    with pytest.raises(ValueError, match="top: expected a positive int"):
        an.explain_sample(path, 0, top=0)
    assert len(an.explain_sample(path, 0, top=100).positions) == H * W  # at most the whole grid
