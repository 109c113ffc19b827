"""The label diagnosis (i2x.analysis.labels) against planted truths: labels flipped on purpose.

Truths: which labels were flipped (cleanlab's issues must be them), pairs with no flipped label
(few or no issues), and the verdict's rule applied by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cleanlab")

from i2x.analysis.labels import (  # noqa: E402
    ISSUE_SHARE_OVERLAP,
    cross_fitted_probabilities,
    label_issues,
    verdict,
)

CLASSES = ["a", "b", "c", "d"]


def blobs(n_per_class: int = 150, seed: int = 0, flip: float = 0.1):
    """Four well separated Gaussian classes in 8-D; ``flip`` of class 0's and of class 1's labels
    swapped to the other class of the pair (0, 1). Returns features, noisy labels, flipped mask."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (4, 8))
    centres *= 6 / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), n_per_class)
    features = centres[labels] + rng.normal(0, 1, (labels.size, 8))
    noisy = labels.copy()
    flipped = np.zeros(labels.size, dtype=bool)
    for c, other in ((0, 1), (1, 0)):
        idx = np.flatnonzero(labels == c)
        chosen = rng.choice(idx, int(round(flip * idx.size)), replace=False)
        noisy[chosen] = other
        flipped[chosen] = True
    return features, noisy, flipped


def test_flipped_labels_are_found_in_their_pair_and_nowhere_else():
    features, noisy, flipped = blobs()
    probs = cross_fitted_probabilities(features, noisy, 4, folds=5, seed=0)
    assert probs.shape == (600, 4) and np.allclose(probs.sum(1), 1)
    result = label_issues(probs, noisy, [(0, 1), (2, 3)], CLASSES)
    pair, clean = result["pairs"]
    found = np.zeros(600, dtype=bool)
    found[pair["issue_positions"]] = True
    precision = (found & flipped).sum() / max(1, found.sum())
    recall = (found & flipped).sum() / flipped.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert pair["images"] == 300 and pair["issues"] == int(found.sum())
    assert pair["issue_share"] == pytest.approx(found.sum() / 300)
    assert pair["exemplars"] == pair["issue_positions"][:12]
    assert pair["overlap"] > 0 and pair["overlapping"] > 0
    assert clean["issues"] <= 2 and clean["issue_share"] < ISSUE_SHARE_OVERLAP  # no flip in (2, 3)
    # most likely mislabelled first: the given label's out-of-sample probability rises along the list
    conf = probs[pair["issue_positions"], noisy[pair["issue_positions"]]]
    assert np.all(np.diff(conf) >= 0)


def test_positions_map_back_to_the_dataset():
    features, noisy, flipped = blobs(seed=1)
    rows = np.arange(600) * 3 + 7  # the diagnosis read every third image of a larger set
    probs = cross_fitted_probabilities(features, noisy, 4, seed=1)
    pair = label_issues(probs, noisy, [(0, 1)], CLASSES, indices=rows)["pairs"][0]
    assert set(pair["issue_positions"]) <= set(rows[flipped].tolist()) | set(rows.tolist())
    assert all((p - 7) % 3 == 0 for p in pair["issue_positions"])


def test_the_verdict_rule_by_hand():
    entry = {"names": ["T-shirt", "Shirt"], "issue_share": 0.08, "overlap": 0.012}
    kind, line = verdict(entry, [])
    assert kind == "overlap" and line.startswith("T-shirt vs Shirt: overlapping classes, about 8.0%")
    assert "the loop is not expected to help" in line
    # A flag and many likely label issues: both explanations, neither hiding the other.
    kind, line = verdict(entry, [4, 7])
    assert kind == "both" and "prototypes 4, 7 flagged" in line and "about 8.0%" in line
    kind, line = verdict({**entry, "issue_share": ISSUE_SHARE_OVERLAP / 2}, [4])
    assert kind == "shortcut" and "prototype 4 flagged" in line
    kind, _ = verdict({**entry, "issue_share": ISSUE_SHARE_OVERLAP / 2}, [])
    assert kind == "unclear"


def test_too_few_samples_per_class_for_the_folds_is_refused():
    features, noisy, _ = blobs(n_per_class=3)
    with pytest.raises(ValueError, match="every class needs at least 5 samples for 5-fold"):
        cross_fitted_probabilities(features, noisy, 4, folds=5)
