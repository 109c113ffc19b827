"""Shortcut or class overlap? A label diagnosis of the most confused pairs, with cleanlab.

A pair a model confuses is not always a shortcut the loop can repair: some images would be
labelled either way by people (T-shirt/top against Shirt), and no fine-tuning fixes that. This
module measures the second explanation and sets it beside the first:

- **Out-of-sample probabilities.** The model's own pooled features at the run's layer (the input
  of its classifier for the small ResNet) for a stratified sample of the training set, and a
  logistic regression on them, cross-fitted (``folds``-fold: every image's probabilities come from
  the fold that did not see it). The network itself saw every training image, so its own softmax
  is not out of sample; the cross-fitted head is, given those features (stated in the result as
  ``probabilities``).
- **cleanlab** (``cleanlab.filter.find_label_issues``, ``cleanlab.dataset.find_overlapping_classes``)
  on those probabilities: which images are likely mislabelled, and how much each pair of classes
  overlaps (the estimated joint probability of "labelled a, truly b" and the reverse).
- **Per pair:** the share of the pair's images that are likely label issues whose suggested label
  is the other class, the overlap score, the images most likely mislabelled, and the shortcut
  evidence the analysis already holds (prototypes the model-wide reading flags for either class).
  The verdict (:func:`verdict`) names the stronger explanation.

Needs the optional ``cleanlab`` package (``pip install "i2x[labels]"``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from i2x._internal.checks import check_int, describe
from i2x.data import labels_of, stratified_subset
from i2x.track.prototypes import layer_features

__all__ = ["diagnose_labels", "cross_fitted_probabilities", "label_issues", "verdict", "pooled_features",
           "overlap_line", "LabelOverlapWarning", "ISSUE_SHARE_OVERLAP", "EXEMPLARS", "LABELS_SCHEMA"]

#: A pair whose likely label issues (suggested label: the other class) exceed this share of its
#: images, with no shortcut evidence, is called overlapping.
ISSUE_SHARE_OVERLAP = 0.02
#: Images listed per pair as the most likely mislabelled.
EXEMPLARS = 12


def _cleanlab():
    try:
        import cleanlab.dataset
        import cleanlab.filter
    except ImportError:
        raise ImportError("the label diagnosis needs cleanlab: pip install 'i2x[labels]' (or pip install cleanlab)") \
            from None
    return cleanlab


def pooled_features(model: nn.Module, layer, images, batch_size=None, device=None, reshape=None,
                    memory_budget=None) -> np.ndarray:
    """``[N, C]`` float64: the layer's output averaged over its grid, for each image."""
    out = [f.float().mean(dim=(2, 3)).cpu() for f in layer_features(model, layer, images, batch_size=batch_size,
                                                                     device=device, reshape=reshape,
                                                                     memory_budget=memory_budget)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


def cross_fitted_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5,
                               seed: int = 0) -> np.ndarray:
    """``[N, M]``: each sample's class probabilities from a standardised logistic regression fit
    on the other folds (stratified, seeded). Every class needs at least ``folds`` samples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_int(folds, "folds", 2)
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < folds:
        raise ValueError(f"labels: every class needs at least {folds} samples for {folds}-fold cross-fitting; "
                         f"class {int(counts.argmin())} has {int(counts.min())}")
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(head, features, labels, cv=cv, method="predict_proba")


def label_issues(probs: np.ndarray, labels: np.ndarray, pairs, classes: list[str],
                 indices: np.ndarray | None = None) -> dict:
    """cleanlab's reading of ``probs`` (out of sample, ``[N, M]``) for ``pairs``.

    Returns ``{"issues": share of all images, "pairs": [...]}``; per pair ``{"pair", "names",
    "images", "issues" (likely mislabelled, suggested label the other class), "issue_share",
    "overlap" (joint probability of the pair, both directions), "overlapping" (cleanlab's count),
    "issue_positions" (dataset positions of those issues, most likely mislabelled first),
    "exemplars" (the first :data:`EXEMPLARS` of them)}``. ``indices``: the dataset
    positions of the rows (default ``0..N-1``)."""
    cl = _cleanlab()
    n, m = probs.shape
    positions = np.arange(n) if indices is None else np.asarray(indices)
    # n_jobs=1: cleanlab's default forks a multiprocessing pool from this process, which holds
    # torch's threads (a fork of a threaded process may deadlock) and turns a Ctrl-C into the
    # pool's shutdown; one process is also faster here (60,000 images x 10 classes: 0.05 s against
    # 0.13 s with the pool on 2 cores, the same issues).
    issues = cl.filter.find_label_issues(labels=labels, pred_probs=probs, n_jobs=1)
    overlap = cl.dataset.find_overlapping_classes(labels=labels, pred_probs=probs)
    joint = {}
    for _, row in overlap.iterrows():
        a, b = int(row["Class Index A"]), int(row["Class Index B"])
        joint[frozenset((a, b))] = (float(row["Joint Probability"]), int(row["Num Overlapping Examples"]))
    suggested = probs.argmax(1)
    self_confidence = probs[np.arange(n), labels]
    out = []
    for a, b in pairs:
        a, b = int(a), int(b)
        in_pair = (labels == a) | (labels == b)
        other = np.where(labels == a, b, a)
        flagged = in_pair & issues & (suggested == other)
        order = np.argsort(self_confidence[flagged], kind="stable")
        score, count = joint.get(frozenset((a, b)), (0.0, 0))
        out.append({"pair": [a, b], "names": [classes[a], classes[b]], "images": int(in_pair.sum()),
                    "issues": int(flagged.sum()), "issue_share": float(flagged.sum() / max(1, in_pair.sum())),
                    "overlap": score, "overlapping": count,
                    "issue_positions": [int(i) for i in positions[flagged][order]],
                    "exemplars": [int(i) for i in positions[flagged][order][:EXEMPLARS]]})
    return {"issues": float(issues.mean()) if n else 0.0, "pairs": out}


def verdict(entry: dict, shortcut_prototypes: list[int]) -> tuple[str, str]:
    """``(kind, line)`` for one pair of :func:`label_issues`. The two explanations are weighed
    separately, because both can hold at once: ``"shortcut"`` when the model-wide reading flags a
    prototype for either class (the repair the loop makes) and at most
    :data:`ISSUE_SHARE_OVERLAP` of the pair's images are likely label issues toward the other
    class; ``"both"`` when it flags one and more are; ``"overlap"`` when it flags none and more
    are (the loop is not expected to help); else ``"unclear"``.

    Why a flag does not overrule the labels: on Fashion-MNIST with 10% of Trouser and Bag swapped
    (docs/results/label-noise.md) the reading flagged a prototype for one of the two classes (a
    part only that class shows), and calling the pair a shortcut hid the 9.8% of its images that
    were found mislabelled."""
    a, b = entry["names"]
    share = 100 * entry["issue_share"]
    noisy = entry["issue_share"] > ISSUE_SHARE_OVERLAP
    protos = ", ".join(str(p) for p in shortcut_prototypes)
    flagged = f"prototype{'s' if len(shortcut_prototypes) > 1 else ''} {protos} flagged"
    ambiguous = (f"about {share:.1f}% of the pair's images likely ambiguous or mislabelled "
                 f"(overlap {entry['overlap']:.4f})")
    if shortcut_prototypes and noisy:
        return "both", (f"{a} vs {b}: shortcut-like ({flagged}) and overlapping: {ambiguous}; the loop can address "
                        "the flagged parts, not the labels")
    if shortcut_prototypes:
        return "shortcut", f"{a} vs {b}: shortcut-like: {flagged} (likely label issues {share:.1f}% of the pair)"
    if noisy:
        return "overlap", f"{a} vs {b}: overlapping classes, {ambiguous}; the loop is not expected to help"
    return "unclear", (f"{a} vs {b}: no flagged shortcut and few likely label issues ({share:.1f}%): "
                       "no clear cause")


def sample_rows(dataset, n: int | None, seed: int = 0) -> torch.Tensor:
    """The stratified training positions the diagnosis reads (all of them when ``n`` is None or
    not smaller)."""
    labels = labels_of(dataset)
    if n is None or n >= labels.numel():
        return torch.arange(labels.numel())
    return stratified_subset(labels, check_int(n, "n_images", 1), seed=seed)


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")


LABELS_SCHEMA = "i2x-labels"


class LabelOverlapWarning(UserWarning):
    """An experiment is about to run on a pair the label diagnosis called overlapping: the loop is
    not expected to help there (i2x labels, :func:`diagnose_labels`)."""


def overlap_line(store, pair) -> str | None:
    """The diagnosis' line for ``pair`` when the run's ``labels.json`` calls it overlapping (with
    where it was read), else None (no diagnosis, another verdict, another pair)."""
    path = store.path / "labels.json"
    if pair is None or not path.exists():
        return None
    for entry in store.read_json("labels").get("pairs", []):
        if sorted(entry.get("pair", [])) == sorted(pair) and entry.get("verdict") == "overlap":
            return f"{entry['line']} (i2x labels, {path})"
    return None


def diagnose_labels(run, model: nn.Module, dataset, *, n_pairs: int = 3, n_images: int | None = 10_000,
                    folds: int = 5, seed: int = 0, save: bool = True, device=None,
                    memory_budget: float | None = None) -> dict:
    """Shortcut or class overlap, for the run's ``n_pairs`` most confused pairs (its analysis).

    ``model``: the run's final model; ``dataset``: its training set (the one the run was drawn
    from). Reads ``n_images`` of it (stratified, seeded; None: all), takes the pooled features at
    the run's layer, cross-fits a logistic head (``folds``) for out-of-sample probabilities, and
    runs cleanlab on them (:func:`label_issues`); each pair gets a :func:`verdict` from those
    figures and the model-wide shortcut reading's flags. With ``save`` the result is written to the
    run as ``labels.json``. Needs cleanlab (``pip install "i2x[labels]"``).
    """
    from i2x.store import open_run

    _cleanlab()  # before any work: a missing package is named first
    check_model(model)
    check_int(n_pairs, "n_pairs", 1)
    store = open_run(run)
    if not (store.path / "analysis.json").exists():
        raise ValueError(f"run {store.path} has no analysis: run `i2x analyze RUN` (i2x.analyze) first")
    analysis = store.read_json("analysis")
    pairs = [tuple(e["pair"]) for e in analysis.get("uncertainty", [])][:n_pairs]
    if not pairs:
        raise ValueError(f"run {store.path}: the analysis examined no pair (n_pairs = 0); run `i2x analyze RUN` "
                         "with --n-pairs >= 1")
    m = store.num_classes
    rows = sample_rows(dataset, n_images, seed)
    labels = labels_of(dataset)[rows].numpy()
    if labels.size and int(labels.max()) >= m:
        raise ValueError(f"dataset: labels up to {int(labels.max())} but the run has {m} classes")
    images = dataset.images[rows] if hasattr(dataset, "images") else torch.utils.data.Subset(dataset, rows.tolist())
    features = pooled_features(model, store.manifest["model"]["layer"], images, device=device,
                               memory_budget=memory_budget)
    probs = cross_fitted_probabilities(features, labels, m, folds=folds, seed=seed)
    result = label_issues(probs, labels, pairs, store.classes, indices=rows.numpy())
    flagged = {int(e["class"]): [int(p["prototype"]) for p in e["flagged"]]
               for e in (analysis.get("shortcuts") or {}).get("per_class", [])}
    for entry in result["pairs"]:
        a, b = entry["pair"]
        entry["shortcut_prototypes"] = sorted(set(flagged.get(a, [])) | set(flagged.get(b, [])))
        entry["verdict"], entry["line"] = verdict(entry, entry["shortcut_prototypes"])
    result.update({"schema": LABELS_SCHEMA, "schema_version": 1, "images": int(rows.numel()), "folds": int(folds),
                   "seed": int(seed), "accuracy": float((probs.argmax(1) == labels).mean()),
                   "probabilities": f"{folds}-fold cross-fitted logistic regression on the final model's pooled "
                                    f"features at {store.manifest['model']['layer']}"})
    if save:
        store.write_json("labels", result)
    return result
