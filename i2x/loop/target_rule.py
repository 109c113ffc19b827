"""The target rule (stage 9, first half): from the prototypes the analysis flagged to the
training samples that rely on them.

:func:`find_targets` scores every training sample of a confused pair under the final model: its
layer features are assigned to the run's prototypes (the stored PCA and centroids, through the
compiled ``prototype_assign``), its GradCAM grids for both classes of the pair come from the
explainer, and for every flagged prototype the sample's **share** is the fraction of the CAM mass
on that prototype's cells. Each prototype's shares are split in two by Otsu's threshold; the
prototypes whose split is clean (they single out a group of samples rather than sit in all of
them) are kept, and the samples above a kept prototype's threshold, never more than a minority of
the pair, are the targets (``docs/curation.md`` has every rule and option). The result is a
:class:`i2x.loop.targets.Targets`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from i2x._internal.checks import check_int, check_number, describe
from i2x._internal.memory import auto_batch_size, check_memory_budget
from i2x._internal.modules import eval_mode, run_device, unwrap_model
from i2x._internal.otsu import otsu_threshold, separability
from i2x._internal.profiling import profiled
from i2x._internal.progress import bar
from i2x._internal.tensors import as_grid
from i2x.analysis import load_analysis
from i2x.data import labels_of
from i2x.explain import Explainer
from i2x.loop.strategies import mass_share, top_share
from i2x.loop.targets import TARGETS_SCHEMA, NothingToCurate, Targets, save_targets
from i2x.store import RunStore, open_run
from i2x.track.batchnorm import calibration_rows, recalibrated_batchnorm
from i2x.track.prototypes import read_prototypes
from i2x.track.streamed import batches_at, holds_tensors, images_at

__all__ = ["TARGET_DEFAULTS", "check_target_options", "find_targets", "otsu_threshold", "separability"]

#: The target rule's defaults (docs/curation.md says why each is what it is).
TARGET_DEFAULTS: dict = {
    "kinds": ("ambivalent", "decisive"),
    "score": "mass",          # "mass": share of CAM mass on flagged cells; "top": flagged share of the top-q cells
    "cam": "pair",            # "pair": the larger of the true and the rival class's share; "true": the true class only
    "top_q": 0.2,             # the top-q share of positions read by score="top"
    "weight": "none",         # "none", "margin" (2 sigmoid(-margin): near the boundary counts most), "error"
    "select": "separable",    # "separable": per flagged prototype, keep those whose scores split the pair cleanly;
                              # "union": one score over all flagged prototypes together
    "min_separability": 0.85, # Otsu's separability (between-class / total variance) a prototype needs ("separable")
    "threshold": "otsu",      # "otsu" (split of the pair's scores) or a float in [0, 1]
    "max_fraction": 0.5,      # never more than this share of the pair's samples
    "batch_size": None,       # images per explain batch; None: as many as find_targets' memory_budget holds
}
SCORES = ("mass", "top")
SELECTS = ("separable", "union")
CAMS = ("pair", "true")
SCOPES = ("pair", "model")
WEIGHTS = ("none", "margin", "error")


# ----------------------------------------------------------------------------------------------
# The rule's pieces (pure functions over tensors)


def check_target_options(options: dict) -> dict:
    """The rule's options completed with :data:`TARGET_DEFAULTS`, each checked (unknown ones refused)."""
    unknown = sorted(set(options) - set(TARGET_DEFAULTS))
    if unknown:
        raise TypeError(f"find_targets: unknown options {unknown}; known: {sorted(TARGET_DEFAULTS)}")
    o = {**TARGET_DEFAULTS, **options}
    o["kinds"] = tuple(o["kinds"])
    bad = sorted(set(o["kinds"]) - {"ambivalent", "decisive"})
    if bad or not o["kinds"]:
        raise ValueError(f"kinds: expected 'ambivalent' and/or 'decisive', got {list(o['kinds'])}")
    for name, allowed in (("score", SCORES), ("cam", CAMS), ("weight", WEIGHTS), ("select", SELECTS)):
        if o[name] not in allowed:
            raise ValueError(f"{name}: expected one of {list(allowed)}, got {o[name]!r}")
    if o["threshold"] != "otsu":
        o["threshold"] = check_number(o["threshold"], "threshold (or 'otsu')", 0, 1)
    o["min_separability"] = check_number(o["min_separability"], "min_separability", 0, 1)
    for name in ("top_q", "max_fraction"):
        o[name] = check_number(o[name], name, 0, 1, low_open=True)
    o["batch_size"] = None if o["batch_size"] is None else check_int(o["batch_size"], "batch_size")
    return o


def _flagged(analysis, a: int, b: int, kinds, prototypes) -> list[dict]:
    if prototypes is not None:
        return [{"prototype": int(k), "kind": "given", "score": None, "reason": "given by the caller"}
                for k in prototypes]
    return analysis.flagged_prototypes(a, b, kinds)


@profiled("i2x::find_targets")
def find_targets(run, model: nn.Module, train_dataset, pairs=None, prototypes: Sequence[int] | None = None,
                 device=None, progress: bool = False, save: bool = True, probe_dataset=None, *,
                 num_workers: int = 0, pin_memory: bool = False, memory_budget: float | None = None,
                 scope: str = "pair", **options) -> Targets:
    """Score every training sample of a confused pair (or, with ``scope="model"``, of every class)
    and choose the targets.

    Args:
        run: a run folder (or ``RunStore``) with prototypes and an analysis.
        model: the final model of the run (its layer must be the run's; it is not modified:
            BatchNorm statistics are recomputed on the run's calibration images for the scoring
            and put back, modes restored, no ``.grad`` touched).
        train_dataset: the training set the probe was drawn from: any map-style Dataset of
            ``(image, label)`` items (a torchvision dataset, ``TensorDataset``, ``ImageFolder``, a
            ``Subset``). Its images are read a batch at a time through a ``DataLoader``, never all
            held; an ``i2x.data.ImageDataset`` is indexed directly.
        pairs: ``[(a, b)]`` (one pair; default: the analysis' most-confused pair).
        prototypes: the prototype ids to target (default: the pair's flagged ones of ``kinds``).
        device: where the scoring runs (default: the model's).
        save: write ``targets.safetensors`` + ``targets.json`` into the run.
        probe_dataset: the dataset the run's probe indices refer to, for the tracker's BatchNorm
            calibration images (default: ``train_dataset``; give it when the probe came from another split).
        num_workers, pin_memory: the DataLoader's, for reading ``train_dataset`` (and
            ``probe_dataset``).
        memory_budget: MiB one scoring batch may use when the ``batch_size`` option is None (the
            default: 256 MiB, docs/memory.md).
        scope: ``"pair"`` (default): one confused pair and its flagged prototypes, as above;
            ``"model"``: every training sample, scored on the prototypes the analysis' model-wide
            shortcut reading flagged (``analysis.json["shortcuts"]``) with its true class's CAM;
            ``pairs`` must be left out, ``kinds`` and ``cam`` do not apply, ``max_fraction`` caps
            each class (docs/curation.md).
        options: the rule (:data:`TARGET_DEFAULTS`): kinds, select, min_separability, score,
            cam, top_q, weight, threshold, max_fraction, batch_size.

    Raises:
        NothingToCurate: the pair has no flagged prototype, or no sample clears the rule.
        ValueError: the run lacks prototypes or an analysis, or the model / dataset do not match it.
    """
    o = check_target_options(options)
    check_memory_budget(memory_budget)
    if not isinstance(scope, str):
        raise TypeError(f"scope: expected 'pair' or 'model', got {describe(scope)}")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {list(SCOPES)}, got {scope!r}")
    if scope == "model" and pairs is not None:
        raise ValueError("pairs: scope='model' reads every class; leave pairs out (or use scope='pair')")
    store = open_run(run)
    if save:
        store.lock_for_writing()  # refuse now, not after scoring, when another process writes the run
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if not (store.path / "prototypes.safetensors").exists():
        raise ValueError(f"run {store.path} has no prototypes: finish the tracker (or run fit_prototypes) first")
    if not (store.path / "analysis.json").exists():
        raise ValueError(f"run {store.path} has no analysis: run `i2x analyze RUN` (i2x.analyze) first")
    analysis = load_analysis(store)
    protos = read_prototypes(store)
    if scope == "model":
        return _find_model_targets(store, analysis, protos, model, train_dataset, prototypes, device, progress, save,
                                   probe_dataset, num_workers, pin_memory, memory_budget, o)
    a, b = _choose_pair(analysis, pairs, store.num_classes)
    flagged = _flagged(analysis, a, b, o["kinds"], prototypes)
    names = store.classes
    if not flagged:
        _nothing(store, save, a, b, f"the analysis flagged no {' or '.join(o['kinds'])} prototype for this pair")
    ids = torch.tensor([p["prototype"] for p in flagged], dtype=torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= protos.n_prototypes:
        raise ValueError(f"prototypes: expected ids in [0, {protos.n_prototypes}), got {ids.tolist()}")

    labels = labels_of(train_dataset)
    if int(labels.max()) >= store.num_classes:
        raise ValueError(f"train_dataset has label {int(labels.max())} but the run has {store.num_classes} classes")
    rows = ((labels == a) | (labels == b)).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError(f"train_dataset has no sample of class {a} or {b}")

    module = unwrap_model(model)
    layer = store.manifest["model"]["layer"]
    explainer = Explainer(module, layer, method=store.manifest["model"].get("method", "gradcam"))
    device = run_device(module, device)
    workers = check_int(num_workers, "num_workers", minimum=0)
    reading: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(pin_memory)}
    calibration = (_calibration_images(store, train_dataset, reading, labels) if probe_dataset is None
                   else _calibration_images(store, probe_dataset, reading))
    grid = tuple(store.grid) if store.grid else None

    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("share", "margin", "pred", "assignment")}
    bar = _progress(rows.numel(), progress, f"targets for {_pair_label(store, a, b)}")
    batch_size = _scoring_batch_size(
        lambda x: _score_batch(explainer, protos, x, torch.full((x.shape[0],), a, device=device), a, b,
                               ids.to(device), o, None),
        module, train_dataset, rows, o, memory_budget, device, workers)
    with recalibrated_batchnorm(module, calibration, device), eval_mode(module):
        for start, x in batches_at(train_dataset, rows, batch_size, **reading):
            y = labels[rows[start:start + x.shape[0]]]
            res = _score_batch(explainer, protos, x.to(device), y.to(device), a, b, ids.to(device), o, grid)
            for k, v in res.items():
                out[k].append(v.cpu())
            bar.update(x.shape[0])
    bar.close()
    shares = torch.cat(out["share"]).float()  # [R, F + 1]
    margins = torch.cat(out["margin"]).float()
    preds = torch.cat(out["pred"])
    assignment = torch.cat(out["assignment"]).long()
    y = labels[rows]
    rivals = torch.where(y == a, torch.full_like(y, b), torch.full_like(y, a))
    weighted = shares * _weights(margins, preds, y, o["weight"])[:, None]
    if o["select"] == "separable":
        kept, selected, scores, stats = _select_separable(weighted[:, :-1], ids, o)
        share = shares[:, :-1][:, kept].max(1).values
        used = ids[kept]
        threshold = None
    else:
        scores, share, used, stats = weighted[:, -1], shares[:, -1], ids, None
        selected, threshold = _select(scores, o["threshold"])
    if not bool(selected.any()):
        _nothing(store, save, a, b, "no sample's target score clears the rule's threshold")
    selected, threshold = _cap(selected, scores, o["max_fraction"], threshold)
    for p in flagged:
        p["used"] = p["prototype"] in used.tolist()
        if stats is not None:
            p.update(stats[p["prototype"]])
    rule = {**o, "kinds": list(o["kinds"]), "threshold_used": threshold, "prototypes_used": used.tolist(),
            "fallback": bool(stats is not None and not any(v["separable"] for v in stats.values()))}
    masks = torch.isin(assignment, used)
    targets = Targets((a, b), flagged, rows, y, rivals, scores.float(), share.float(), margins, preds, masks, selected,
                      rule, (x.shape[-2], x.shape[-1]), list(names))
    if save:
        save_targets(store, targets)
    return targets


def _scoring_batch_size(step, module: nn.Module, train_dataset, rows: torch.Tensor, o: dict, memory_budget,
                        device, workers: int) -> int:
    """The ``batch_size`` option, or (None) the batch that fits ``memory_budget``, measured on the
    scoring ``step`` itself: it keeps the whole graph (two classes' CAMs need it), far more than an
    explain call."""
    if o["batch_size"] is not None:
        return o["batch_size"]
    with eval_mode(module):
        return auto_batch_size(step, images_at(train_dataset, rows[:1])[0].to(device), memory_budget,
                               in_flight=0 if holds_tensors(train_dataset) else 2 * workers)


def _pair_label(store: RunStore, a: int, b: int) -> str:
    names = store.classes
    named = (names[a], names[b]) != (str(a), str(b))
    return f"({a}, {b})" + (f" = ({names[a]}, {names[b]})" if named else "")


def _nothing(store: RunStore, save: bool, a: int | None, b: int | None, why: str) -> None:
    """Raise NothingToCurate; with ``save`` the run's targets say so too, so an experiment cannot
    pick up targets an earlier call left for another pair or rule. ``a = b = None``: model scope."""
    where = "the model" if a is None or b is None else _pair_label(store, a, b)
    message = f"nothing to curate for {where}: {why}"
    pair = None if a is None or b is None else [a, b]
    if save:
        store.write_json("targets", {"schema": TARGETS_SCHEMA, "schema_version": 1, "status": "nothing_to_curate",
                                     "pair": pair, "message": message},
                         record={"pair": pair, "targets": 0})
        stale = store.path / "targets.safetensors"
        if stale.exists():
            stale.unlink()
    raise NothingToCurate(message)


def _choose_pair(analysis, pairs, m: int) -> tuple[int, int]:
    if pairs is None:
        if not analysis.data["uncertainty"]:
            raise ValueError("the analysis has no confused pair (n_pairs=0?); pass pairs=[(a, b)]")
        a, b = analysis.data["uncertainty"][0]["pair"]
        return int(a), int(b)
    pairs = list(pairs)
    if len(pairs) != 1 or len(pairs[0]) != 2:
        raise ValueError(f"pairs: expected one pair [(a, b)], got {pairs!r}")
    a, b = (int(v) for v in pairs[0])
    if not (0 <= a < m and 0 <= b < m) or a == b:
        raise ValueError(f"pairs: expected two different classes in [0, {m}), got ({a}, {b})")
    if analysis.uncertainty(a, b) is None:
        raise ValueError(f"pair ({a}, {b}) was not analysed (analysis pairs: "
                         f"{[u['pair'] for u in analysis.data['uncertainty']]}); re-run analyze with more n_pairs")
    return min(a, b), max(a, b)


def _calibration_images(store: RunStore, dataset, reading: dict, labels: torch.Tensor | None = None):
    """The tracker's BatchNorm calibration images: the same stratified subset of the probe (a
    tensor, or a view read through a DataLoader for a dataset that does not hold its tensors)."""
    probe_idx, probe_labels = store.probe()
    rows = calibration_rows(probe_labels, int(store.manifest.get("options", {}).get("recalibrate_bn", 0) or 0))
    if rows is None:
        return None
    chosen = probe_idx[rows]
    if int(probe_idx.max()) >= len(dataset):
        raise ValueError(f"the dataset has {len(dataset)} samples but the run's probe refers to index "
                         f"{int(probe_idx.max())}; pass the training set the run was tracked on (or probe_dataset=)")
    expected = probe_labels[rows]
    labels = labels_of(dataset) if labels is None else labels  # the caller's, when it read them already
    if not bool((labels[chosen] == expected).all()):
        split = store.manifest.get("dataset", {}).get("split")
        raise ValueError(f"the dataset's labels at the run's probe positions differ from the probe's (the probe came "
                         f"from the {split or 'unknown'} split); pass the dataset the probe was drawn from as "
                         "probe_dataset=")
    return images_at(dataset, chosen, **reading)


def _score_batch(explainer, protos, x, y, a, b, ids, o, grid):
    rival = torch.where(y == a, torch.full_like(y, b), torch.full_like(y, a))
    with torch.enable_grad(), explainer.capture() as captured:
        logits = explainer.model(x)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's output holds NaN or inf on the training samples; is it the run's final model?")
    cam_true = explainer.explain_from(captured, logits, y)
    cam_rival = explainer.explain_from(captured, logits, rival)
    assignment = _assign(explainer, protos, captured, grid)
    # Column j < F: prototype ids[j] alone; column F: all flagged prototypes together.
    masks = [assignment == k for k in ids.tolist()] + [torch.isin(assignment, ids)]
    shares = []
    for mask in masks:
        share = _share(cam_true.detach(), mask, o)
        if o["cam"] == "pair":
            share = torch.maximum(share, _share(cam_rival.detach(), mask, o))
        shares.append(share)
    logits = logits.detach().float()
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, rival[:, None])[:, 0]
    return {"share": torch.stack(shares, 1), "margin": margin, "pred": logits.argmax(1),
            "assignment": assignment.to(torch.int16)}


def _assign(explainer, protos, captured, grid):
    """The captured layer features assigned to the run's prototypes, after checking they match the run."""
    features = as_grid(captured.activations[0].detach(), explainer.layer_names[0], explainer.reshape)
    if grid is not None and tuple(features.shape[-2:]) != grid:
        raise ValueError(f"layer grid is {tuple(features.shape[-2:])} but the run's is {grid}: the model or input "
                         "size does not match the run")
    if features.shape[1] != protos.mean.shape[0]:
        raise ValueError(f"layer has {features.shape[1]} channels but the run's prototypes were fitted on "
                         f"{protos.mean.shape[0]}: the model does not match the run")
    assignment = protos.assign(features.float())
    return assignment


def _share(cam, mask, o):
    return mass_share(cam, mask) if o["score"] == "mass" else top_share(cam, mask, o["top_q"])


def _weights(margins, preds, labels, kind: str) -> torch.Tensor:
    if kind == "none":
        return torch.ones_like(margins)
    if kind == "margin":
        return 2 * torch.sigmoid(-margins)
    return (preds != labels).float()


def _select(scores: torch.Tensor, threshold) -> tuple[torch.Tensor, float]:
    """Samples whose score clears the threshold (Otsu's split, or a given value); never a zero score."""
    thr = otsu_threshold(scores) if threshold == "otsu" else float(threshold)
    selected = scores > thr if threshold == "otsu" else scores >= thr
    return selected & (scores > 0), float(thr)


def _select_separable(shares: torch.Tensor, ids: torch.Tensor, o: dict):
    """Per flagged prototype: its own split of the pair's scores and how clean it is. The
    prototypes whose split clears ``min_separability`` are kept (the most separable one alone when
    none does: recorded as the rule's fallback); a sample is a target when any kept prototype's
    score clears that prototype's threshold. Returns (kept columns, selected, score, stats)."""
    stats, picks, seps = {}, [], []
    for j, k in enumerate(ids.tolist()):
        sel, thr = _select(shares[:, j], o["threshold"])
        sep = separability(shares[:, j], thr)
        seps.append(sep)
        picks.append(sel)
        stats[k] = {"separability": sep, "threshold": thr, "selects": int(sel.sum()),
                    "separable": sep >= o["min_separability"]}
    order = sorted((j for j, k in enumerate(ids.tolist()) if stats[k]["separable"]), key=lambda j: (-seps[j], j))
    if not order:
        order = [max(range(len(seps)), key=lambda j: (seps[j], -j))]
    # Most separable first; a prototype whose group would push the targets past max_fraction of
    # the pair is left out (two prototypes that split the pair into complementary halves, e.g. a
    # mark and the plain corner where it is missing, would otherwise leave the choice to the cap).
    cap = int(math.floor(o["max_fraction"] * shares.shape[0]))
    kept: list[int] = []
    selected = torch.zeros(shares.shape[0], dtype=torch.bool)
    for j in order:
        union = selected | picks[j]
        if kept and int(union.sum()) > cap:
            stats[int(ids[j])]["left_out"] = "its targets would exceed max_fraction of the pair"
            continue
        kept.append(j)
        selected = union
    scores = shares[:, kept].max(1).values
    return torch.tensor(kept, dtype=torch.int64), selected, scores, stats


def _cap(selected: torch.Tensor, scores: torch.Tensor, max_fraction: float, threshold):
    """Never more than ``max_fraction`` of the pair: the highest scores are kept (ties to the lower row)."""
    cap = int(math.floor(max_fraction * scores.numel()))
    if int(selected.sum()) <= cap:
        return selected, threshold
    candidates = torch.where(selected, scores, torch.full_like(scores, -math.inf))
    order = torch.argsort(-candidates, stable=True)[:cap]
    capped = torch.zeros_like(selected)
    capped[order] = True
    return capped, (float(scores[order[-1]]) if cap else math.inf)


def _progress(total: int, enabled: bool, desc: str):
    return bar(total=total, desc=desc, unit="sample", enabled=enabled)


# ----------------------------------------------------------------------------------------------
# scope="model": every class, on the model-wide shortcut reading


def _model_flagged(analysis, prototypes) -> list[dict]:
    if prototypes is not None:
        return [{"prototype": int(k), "kind": "given", "score": None, "classes": None,
                 "reason": "given by the caller"} for k in prototypes]
    reading = analysis.shortcuts
    if reading is None:
        raise ValueError("the run's analysis has no model-wide shortcut reading (written by an older i2x): "
                         "re-run `i2x analyze RUN` (i2x.analyze)")
    by_k: dict[int, dict] = {}
    for entry in reading["per_class"]:
        for p in entry["flagged"]:
            k = int(p["prototype"])
            if k not in by_k:
                by_k[k] = {"prototype": k, "kind": "shortcut", "score": p["score"], "classes": [],
                           "reason": f"shortcut: {entry['name']}: {p['reason']}"}
            by_k[k]["classes"].append(int(entry["class"]))
            by_k[k]["score"] = max(by_k[k]["score"], p["score"])
    return sorted(by_k.values(), key=lambda p: (-p["score"], p["prototype"]))


def _find_model_targets(store, analysis, protos, model, train_dataset, prototypes, device, progress, save,
                        probe_dataset, num_workers, pin_memory, memory_budget, o) -> Targets:
    """find_targets(scope="model"): every training sample, its true class's CAM share on each
    flagged shortcut prototype, a per-prototype Otsu split over all samples (as ``select="separable"``),
    at most ``max_fraction`` of each class."""
    flagged = _model_flagged(analysis, prototypes)
    if not flagged:
        _nothing(store, save, None, None, "the model-wide reading flagged no shortcut prototype")
    ids = torch.tensor([p["prototype"] for p in flagged], dtype=torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= protos.n_prototypes:
        raise ValueError(f"prototypes: expected ids in [0, {protos.n_prototypes}), got {ids.tolist()}")
    m = store.num_classes
    labels = labels_of(train_dataset)
    if int(labels.max()) >= m:
        raise ValueError(f"train_dataset has label {int(labels.max())} but the run has {m} classes")
    rows = torch.arange(labels.numel())
    module = unwrap_model(model)
    explainer = Explainer(module, store.manifest["model"]["layer"],
                          method=store.manifest["model"].get("method", "gradcam"))
    device = run_device(module, device)
    workers = check_int(num_workers, "num_workers", minimum=0)
    reading: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(pin_memory)}
    calibration = (_calibration_images(store, train_dataset, reading, labels) if probe_dataset is None
                   else _calibration_images(store, probe_dataset, reading))
    grid = tuple(store.grid) if store.grid else None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("share", "margin", "pred", "rival", "assignment")}
    progress_bar = _progress(rows.numel(), progress, "targets over the model")
    batch_size = _scoring_batch_size(
        lambda x: _score_model_batch(explainer, protos, x, torch.zeros(x.shape[0], dtype=torch.int64, device=device),
                                     ids.to(device), o, None),
        module, train_dataset, rows, o, memory_budget, device, workers)
    with recalibrated_batchnorm(module, calibration, device), eval_mode(module):
        for start, x in batches_at(train_dataset, rows, batch_size, **reading):
            y = labels[rows[start:start + x.shape[0]]]
            res = _score_model_batch(explainer, protos, x.to(device), y.to(device), ids.to(device), o, grid)
            for k, v in res.items():
                out[k].append(v.cpu())
            progress_bar.update(x.shape[0])
    progress_bar.close()
    shares = torch.cat(out["share"]).float()  # [N, F + 1]
    margins, preds = torch.cat(out["margin"]).float(), torch.cat(out["pred"])
    rivals, assignment = torch.cat(out["rival"]), torch.cat(out["assignment"]).long()
    weighted = shares * _weights(margins, preds, labels, o["weight"])[:, None]
    if o["select"] == "separable":
        # Every flagged prototype is kept: the model-wide reading already chose them, and over all
        # classes a class's own part splits the samples as cleanly as a mark does, so separability
        # (recorded) cannot tell them apart. The cap is per class (_cap_per_class below).
        kept, selected, scores, stats = _select_separable(weighted[:, :-1], ids,
                                                          {**o, "max_fraction": 1.0, "min_separability": 0.0})
        share, used, threshold = shares[:, :-1][:, kept].max(1).values, ids[kept], None
    else:
        scores, share, used, stats = weighted[:, -1], shares[:, -1], ids, None
        selected, threshold = _select(scores, o["threshold"])
    if not bool(selected.any()):
        _nothing(store, save, None, None, "no sample's target score clears the rule's threshold")
    selected = _cap_per_class(selected, scores, labels, o["max_fraction"])
    for p in flagged:
        p["used"] = p["prototype"] in used.tolist()
        if stats is not None:
            p.update(stats[p["prototype"]])
    rule = {**o, "kinds": ["shortcut"], "cam": "true", "scope": "model", "threshold_used": threshold,
            "prototypes_used": used.tolist(),
            "fallback": bool(stats is not None and not any(v["separable"] for v in stats.values()))}
    targets = Targets(None, flagged, rows, labels.clone(), rivals, scores.float(), share.float(), margins, preds,
                      torch.isin(assignment, used), selected, rule, (x.shape[-2], x.shape[-1]), list(store.classes),
                      scope="model")
    if save:
        save_targets(store, targets)
    return targets


def _score_model_batch(explainer, protos, x, y, ids, o, grid):
    """Shares of the true class's CAM mass on each flagged prototype (and on all together), the
    margin over the strongest other class, the prediction and the cells' prototypes."""
    with torch.enable_grad(), explainer.capture() as captured:
        logits = explainer.model(x)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's output holds NaN or inf on the training samples; is it the run's final model?")
    cam = explainer.explain_from(captured, logits, y).detach()
    assignment = _assign(explainer, protos, captured, grid)
    masks = [assignment == k for k in ids.tolist()] + [torch.isin(assignment, ids)]
    shares = torch.stack([_share(cam, mask, o) for mask in masks], 1)
    logits = logits.detach().float()
    others = logits.scatter(1, y[:, None], -math.inf)
    rival = others.argmax(1)
    margin = logits.gather(1, y[:, None])[:, 0] - others.max(1).values
    return {"share": shares, "margin": margin, "pred": logits.argmax(1), "rival": rival,
            "assignment": assignment.to(torch.int16)}


def _cap_per_class(selected: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, max_fraction: float):
    """Never more than ``max_fraction`` of any class: the class's highest scores are kept."""
    out = selected.clone()
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        capped, _ = _cap(selected[rows], scores[rows], max_fraction, None)
        out[rows] = capped
    return out
