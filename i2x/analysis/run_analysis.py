"""Stages 3-8 of I2X on a run folder: from saliency grids and prototypes to a structured account
of training.

The steps are small pure functions over tensors in :mod:`i2x.analysis.readings`, from
prototype intensities to ``beta^t``, groups, shared and specialised prototypes, the separation
timeline and the uncertain and decisive prototypes. :func:`analyze` runs them on a run and writes
``analysis.json`` and ``analysis.safetensors``; :func:`load_analysis` reads them back;
:func:`explain_sample` answers "why does it look there" for one probe sample.
``docs/analysis.md`` gives every formula, default and the files' schema.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from i2x._internal.checks import (
    check_fraction,
    check_int,
    check_number,
    check_positive_number,
    describe,
)
from i2x._internal.hashing import file_digest, tensor_digest
from i2x._internal.profiling import profiled
from i2x.analysis.readings import (
    changes,
    class_presence,
    confusion_matrices,
    find_groups,
    group_min_cluster_size,
    most_confused_pairs,
    pair_decisive,
    pair_presence,
    pair_uncertainty,
    presence,
    prototype_intensity,
    resolve_uncertainty_score,
    ridge_sequence,
    separation_timeline,
    shared_and_specialised,
    uses_hdbscan,
)
from i2x.analysis.shortcuts import model_shortcuts
from i2x.store import RunStoreError, open_run, read_record
from i2x.track.prototypes import read_assignment

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "DEFAULTS",
    "UNCERTAINTY_REGRESSIONS",
    "UNCERTAINTY_PRESENCE",
    "Analysis",
    "analyze",
    "load_analysis",
    "PrototypeEvidence",
    "SampleExplanation",
    "explain_sample",
]

SCHEMA = "i2x-analysis"
SCHEMA_VERSION = 2

#: The project's defaults for what the paper leaves open (docs/analysis.md says why).
DEFAULTS: dict = {
    "ridge_lambda": 1.0,
    "min_group_size": 5,
    "group_min_fraction": 0.05,
    "shared_presence": 0.5,
    "separation_threshold": 0.05,
    "n_timeline_prototypes": 3,
    "min_presence": 0.1,
    "n_pairs": 3,
    "uncertainty_regression": "pair",
    "uncertainty_score": "swing",
    "uncertainty_presence": "both_classes",
    "flag_fraction": 0.5,
    "pairs": None,
    "decisive_presence": 0.05,
    "decisive_fraction": 0.5,
    "shortcut_threshold": "otsu",
}

#: How "present in a real share of the pair's samples" (the method, stage 8) is read:
#: "both_classes": present in >= min_presence of class a's samples AND of class b's (a prototype
#: one class never shows cannot be what the two are confused over); "pair_share": present in
#: >= min_presence of the pair's samples taken together.
UNCERTAINTY_PRESENCE = ("both_classes", "pair_share")

UNCERTAINTY_REGRESSIONS = ("pair", "pooled", "class_a")


# ----------------------------------------------------------------------------------------------
# The orchestrator


@dataclass
class Analysis:
    """The result of :func:`analyze`: ``data`` (analysis.json) and ``tensors`` (analysis.safetensors)."""

    data: dict
    tensors: dict[str, torch.Tensor]

    @property
    def options(self) -> dict:
        return self.data["options"]

    @property
    def steps(self) -> list[int]:
        return list(self.data["steps"])

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def groups(self) -> torch.Tensor:
        return self.tensors["groups"]

    @property
    def beta_pooled(self) -> torch.Tensor:
        return self.tensors["beta_pooled"]

    @property
    def beta_class(self) -> torch.Tensor:
        return self.tensors["beta_class"]

    def beta_group(self, c: int, g: int) -> torch.Tensor | None:
        """``[T-1, K, M]`` of group g of class c (None when that group was too small to regress)."""
        return self.tensors.get(f"beta_group.c{int(c)}.g{int(g)}")

    def per_class(self, c: int) -> dict:
        return self.data["per_class"][int(c)]

    def uncertainty(self, a: int, b: int) -> dict | None:
        """The uncertainty entry of pair (a, b) in either order (None when it was not analysed)."""
        key = sorted((int(a), int(b)))
        return next((u for u in self.data["uncertainty"] if u["pair"] == key), None)

    def uncertain_prototypes(self, a: int, b: int) -> list[int]:
        """The ambivalent prototypes of pair (a, b) (the swing reading), highest score first."""
        entry = self.uncertainty(a, b)
        return [] if entry is None else [p["prototype"] for p in entry["flagged"]]

    def decisive_prototypes(self, a: int, b: int) -> list[int]:
        """The decisive, one-sided prototypes of pair (a, b) (shortcut candidates), highest first."""
        entry = self.uncertainty(a, b)
        return [] if entry is None else [p["prototype"] for p in entry.get("decisive", [])]

    @property
    def shortcuts(self) -> dict | None:
        """The model-wide shortcut reading (``analysis.json["shortcuts"]``); None for an analysis
        written before it existed (re-run analyze)."""
        return self.data.get("shortcuts")

    def shortcut_prototypes(self, c: int | None = None) -> list[int]:
        """The prototypes the model-wide reading flagged: for class ``c`` (highest score first), or
        over all classes (ascending ids). Empty for an analysis without the reading."""
        reading = self.shortcuts
        if reading is None:
            return []
        if c is None:
            return list(reading["prototypes_flagged"])
        return [p["prototype"] for p in reading["per_class"][int(c)]["flagged"]]

    def flagged_prototypes(self, a: int, b: int, kinds: Sequence[str] = ("ambivalent", "decisive")) -> list[dict]:
        """Every flagged prototype of pair (a, b) with why: ``{"prototype", "kind", "score",
        "reason"}``, ambivalent first; a prototype flagged both ways is listed once, as ambivalent."""
        unknown = sorted(set(kinds) - {"ambivalent", "decisive"})
        if unknown:
            raise ValueError(f"kinds: expected 'ambivalent' and/or 'decisive', got unknown {unknown}")
        entry = self.uncertainty(a, b)
        if entry is None:
            return []
        out, seen = [], set()
        for kind, key in (("ambivalent", "flagged"), ("decisive", "decisive")):
            if kind not in kinds:
                continue
            for p in entry.get(key, []):
                if p["prototype"] not in seen:
                    seen.add(p["prototype"])
                    out.append({"prototype": p["prototype"], "kind": kind, "score": p["score"], "reason": p["reason"]})
        return out


def _check_options(opts: dict) -> tuple[dict, Callable, str]:
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"analyze: unknown options {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **opts}
    o["ridge_lambda"] = check_positive_number(o["ridge_lambda"], "ridge_lambda")
    o["min_group_size"] = check_int(o["min_group_size"], "min_group_size", 1)
    o["n_timeline_prototypes"] = check_int(o["n_timeline_prototypes"], "n_timeline_prototypes", 0)
    o["n_pairs"] = check_int(o["n_pairs"], "n_pairs", 0)
    for name in ("group_min_fraction", "shared_presence", "separation_threshold", "min_presence", "flag_fraction",
                 "decisive_presence", "decisive_fraction"):
        o[name] = check_fraction(o[name], name)
    if o["uncertainty_presence"] not in UNCERTAINTY_PRESENCE:
        raise ValueError(
            f"uncertainty_presence: expected one of {list(UNCERTAINTY_PRESENCE)}, got {o['uncertainty_presence']!r}"
        )
    if o["uncertainty_regression"] not in UNCERTAINTY_REGRESSIONS:
        raise ValueError(
            f"uncertainty_regression: expected one of {list(UNCERTAINTY_REGRESSIONS)}, "
            f"got {o['uncertainty_regression']!r}"
        )
    if o["pairs"] is not None:
        try:
            pairs = [sorted((int(a), int(b))) for a, b in o["pairs"]]
        except (TypeError, ValueError):
            raise ValueError(f"pairs: expected a list of class pairs [[a, b], ...], got {o['pairs']!r}") from None
        if any(a == b for a, b in pairs):
            raise ValueError(f"pairs: a pair needs two different classes, got {o['pairs']!r}")
        o["pairs"] = pairs
    if o["shortcut_threshold"] != "otsu":
        if isinstance(o["shortcut_threshold"], str):
            raise ValueError("shortcut_threshold: expected 'otsu' or a number in (0, 1], "
                             f"got {o['shortcut_threshold']!r}")
        o["shortcut_threshold"] = check_number(o["shortcut_threshold"], "shortcut_threshold", 0, 1, low_open=True)
    name, fn, formula = resolve_uncertainty_score(o["uncertainty_score"])
    o["uncertainty_score"] = name  # JSON records the name; a callable's is "callable:module.qualname"
    return o, fn, formula


def _mean_beta(beta: torch.Tensor, c: int) -> torch.Tensor:
    # beta [T-1, K, M] -> [K]: mean over the steps of the effect on class c.
    return beta[:, :, c].double().mean(dim=0)


def _regress_groups(dP, dY, labels, groups, m, lam, min_group_size):
    """Group regressions and the per-class group summary."""
    betas, summary = {}, []
    for c in range(m):
        in_class = labels == c
        ids = sorted(int(g) for g in groups[in_class].unique())
        rows = []
        for g in ids:
            mask = in_class & (groups == g)
            size = int(mask.sum())
            row = {"group": g, "size": size, "noise": g == -1, "regression": "fitted", "reason": None}
            if size >= min_group_size:
                betas[(c, g)] = ridge_sequence(dP, dY, lam, mask).float()
            else:
                row["regression"] = "skipped"
                row["reason"] = f"{size} samples < min_group_size={min_group_size}"
            rows.append(row)
        summary.append(rows)
    return betas, summary


@profiled("i2x::analyze")
def analyze(run, **options) -> Analysis:
    """Run stages 3-8 on a run with >= 2 finished checkpoints and prototypes; write
    ``analysis.json`` and ``analysis.safetensors`` (atomically, replacing an earlier analysis).

    Options (defaults in :data:`DEFAULTS`, all recorded in analysis.json): ridge_lambda,
    min_group_size, group_min_fraction, shared_presence, separation_threshold,
    n_timeline_prototypes, min_presence, n_pairs, uncertainty_regression ("pair", "pooled",
    "class_a"), uncertainty_score (a registered name or a callable d [T-1] -> float; default
    "swing"), uncertainty_presence ("both_classes" or "pair_share"), flag_fraction, pairs,
    decisive_presence, decisive_fraction, shortcut_threshold ("otsu" or a fraction of the top
    score: the model-wide shortcut reading's cut, :mod:`i2x.analysis.shortcuts`).
    """
    o, score_fn, formula = _check_options(options)
    store = open_run(run)
    store.lock_for_writing()  # refuse now, not after the work, when another process writes the run
    steps = store.finished_steps()
    if len(steps) < 2:
        raise ValueError(
            f"run {store.path}: the analysis needs at least 2 finished checkpoints (it studies changes "
            f"between them), got {len(steps)}: {steps}"
        )
    assignment, k = read_assignment(store)
    steps, saliency, probs = store.load_all(steps)
    labels = store.probe_labels()
    m, lam = store.num_classes, o["ridge_lambda"]
    names = store.classes
    sizes = torch.bincount(labels, minlength=m)

    intensity, counts = prototype_intensity(saliency, assignment, k)
    dP, dY = changes(intensity, probs)

    # Betas are kept as float32 from here on: what is stored is exactly what the readings used.
    beta_pooled = ridge_sequence(dP, dY, lam).float()
    beta_class = torch.stack([ridge_sequence(dP, dY, lam, labels == c).float() for c in range(m)])
    groups = find_groups(dY, labels, m, o["group_min_fraction"])
    beta_groups, group_rows = _regress_groups(dP, dY, labels, groups, m, lam, o["min_group_size"])

    cls_presence = class_presence(counts, labels, m)
    group_presence = {(c, r["group"]): presence(counts, (labels == c) & (groups == r["group"]))
                      for c in range(m) for r in group_rows[c]}

    per_class, group_summary = [], []
    for c in range(m):
        n_c = int(sizes[c])
        mcs = group_min_cluster_size(n_c, o["group_min_fraction"])
        hdb = uses_hdbscan(n_c, len(steps) - 1, mcs)
        group_summary.append({"class": c, "name": names[c], "size": n_c, "method": "hdbscan" if hdb else "single",
                              "min_cluster_size": mcs, "groups": group_rows[c]})
        gp = {r["group"]: group_presence[(c, r["group"])] for r in group_rows[c]}
        gb = {g: (_mean_beta(beta_groups[(c, g)], c) if (c, g) in beta_groups else None) for g in gp}
        shared, specialised = shared_and_specialised(
            cls_presence[c], _mean_beta(beta_class[c], c), gp, gb, o["shared_presence"])
        per_class.append({"class": c, "name": names[c], "size": n_c, "shared": shared, "specialised": specialised})

    hard, soft = confusion_matrices(probs, labels)
    timeline, timeline_skipped = separation_timeline(
        hard, soft, sizes, beta_pooled, cls_presence, steps, o["separation_threshold"],
        o["n_timeline_prototypes"], o["min_presence"], names)

    tensors = {
        "intensity": intensity.float(),
        "counts": counts,
        "beta_pooled": beta_pooled,
        "beta_class": beta_class,
        "groups": groups,
        "confusion": hard,
        "soft_confusion": soft.float(),
        "presence_class": cls_presence.float(),
    }
    for (c, g), beta in beta_groups.items():
        tensors[f"beta_group.c{c}.g{g}"] = beta
    for (c, g), pres in group_presence.items():
        tensors[f"presence_group.c{c}.g{g}"] = pres.float()

    uncertainty = []
    chosen = most_confused_pairs(hard[-1], soft[-1], sizes, o["n_pairs"])
    for a, b in o["pairs"] or []:
        if not (0 <= a < m and 0 <= b < m):
            raise ValueError(f"pairs: ({a}, {b}) is not a pair of the run's {m} classes")
        if (a, b) not in chosen:
            chosen.append((a, b))
    for a, b in chosen:
        if o["uncertainty_regression"] == "pair":
            beta = ridge_sequence(dP, dY, lam, (labels == a) | (labels == b)).float()
            tensors[f"beta_pair.a{a}.b{b}"] = beta
        elif o["uncertainty_regression"] == "pooled":
            beta = beta_pooled
        else:
            beta = beta_class[a]
        d = beta[:, :, a] - beta[:, :, b]  # [T-1, K]
        if o["uncertainty_presence"] == "both_classes":
            pres = torch.minimum(cls_presence[a], cls_presence[b]).double()
        else:
            pres = pair_presence(cls_presence, sizes, a, b)
        res = pair_uncertainty(d, pres, score_fn, o["min_presence"], o["flag_fraction"])
        key = f"uncertainty.a{a}.b{b}"
        tensors.update({f"{key}.d": d.float(), f"{key}.score": res["score"], f"{key}.presence": pres.float(),
                        f"{key}.eligible": res["eligible"], f"{key}.flagged": res["flagged"]})
        flagged = sorted(res["flagged"].nonzero().flatten().tolist(), key=lambda i: (-float(res["score"][i]), i))
        eligible = res["eligible"]
        pair_pres = pair_presence(cls_presence, sizes, a, b)
        dec = pair_decisive(d, pair_pres, o["decisive_presence"], o["decisive_fraction"])
        tensors.update({f"{key}.decisive_score": dec["score"], f"{key}.decisive_flagged": dec["flagged"]})
        decisive = sorted(dec["flagged"].nonzero().flatten().tolist(), key=lambda i: (-float(dec["score"][i]), i))
        pa, pb = cls_presence[a], cls_presence[b]
        uncertainty.append({
            "pair": [a, b],
            "names": [names[a], names[b]],
            "hard_confusions": int(hard[-1, a, b] + hard[-1, b, a]),
            "soft_confusions": float(soft[-1, a, b] + soft[-1, b, a]),
            "n_samples": int(sizes[a] + sizes[b]),
            "regression": o["uncertainty_regression"],
            "score": o["uncertainty_score"],
            "formula": formula,
            "n_eligible": int(eligible.sum()),
            "max_score": float(res["score"][eligible].max()) if bool(eligible.any()) else 0.0,
            "flagged": [{"prototype": i, "score": float(res["score"][i]), "presence": float(pres[i]),
                         "presence_a": float(pa[i]), "presence_b": float(pb[i]),
                         "reason": (f"ambivalent: pushed towards both {names[a]} and {names[b]} over training "
                                    f"(swing {float(res['score'][i]):.3g}); in {float(pa[i]):.0%} of {names[a]} and "
                                    f"{float(pb[i]):.0%} of {names[b]}"),
                         "d": [float(v) for v in d[:, i]]} for i in flagged],
            "decisive_formula": "D_k = |mean_t d_k^t|, eligible when present in >= decisive_presence of the "
                                "pair's samples",
            "decisive": [{"prototype": i, "score": float(dec["score"][i]),
                          "towards": a if int(dec["direction"][i]) > 0 else b,
                          "presence": float(pair_pres[i]), "presence_a": float(pa[i]), "presence_b": float(pb[i]),
                          "reason": ("decisive: pushed towards "
                                     f"{names[a] if int(dec['direction'][i]) > 0 else names[b]} all along "
                                     f"(|mean d| {float(dec['score'][i]):.3g}); in {float(pa[i]):.0%} of "
                                     f"{names[a]} and {float(pb[i]):.0%} of {names[b]}"),
                          "d": [float(v) for v in d[:, i]]} for i in decisive],
        })

    # The model-wide reading: every class, no pair given (docs/analysis.md, "model-wide").
    # JSON only: analysis.safetensors stays what it was before the reading, so an old run analysed
    # again gives the same tensors file (tests/test_run_compat.py).
    shortcuts, _ = model_shortcuts(cls_presence, sizes, beta_pooled, intensity[-1], counts, labels, names,
                                   o["shortcut_threshold"])

    grid = store.grid
    assert grid is not None  # the run's first checkpoint recorded it
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "options": o,
        "steps": steps,
        "transitions": [[steps[i], steps[i + 1]] for i in range(len(steps) - 1)],
        "classes": names,
        "class_sizes": [int(v) for v in sizes],
        "probe_size": store.probe_size,
        "grid": list(grid),
        "num_prototypes": k,
        "uncertainty_formula": formula,
        "fingerprints": {"probe": store.manifest["probe"]["fingerprint"], "prototypes": tensor_digest(assignment),
                         "tensors": None},
        "per_class": per_class,
        "groups": group_summary,
        "timeline": timeline,
        "timeline_skipped": timeline_skipped,
        "uncertainty": uncertainty,
        "shortcuts": shortcuts,
    }
    record = {"schema_version": SCHEMA_VERSION, "options": o, "steps": steps,
              "files": ["analysis.json", "analysis.safetensors"]}
    # Tensors first, JSON last: the JSON carries the tensors file's hash, so a run killed between
    # the two writes leaves a pair that load_analysis refuses instead of silently mixing them.
    store.write_tensors("analysis", tensors, record=record)
    data["fingerprints"]["tensors"] = file_digest(store.path / "analysis.safetensors")
    store.write_json("analysis", data, record=record)
    return Analysis(data=data, tensors={key: t.cpu() for key, t in tensors.items()})


_REQUIRED_TENSORS = ("intensity", "counts", "beta_pooled", "beta_class", "groups", "confusion")


def load_analysis(run) -> Analysis:
    """Read a run's analysis.json and analysis.safetensors back, checking they belong together."""
    store = open_run(run)
    for name in ("analysis.json", "analysis.safetensors"):
        if not (store.path / name).exists():
            raise FileNotFoundError(f"run {store.path} has no {name}: run `i2x analyze RUN` (i2x.analyze) first")
    data = read_record(store.path / "analysis.json", SCHEMA, "an i2x analysis", SCHEMA_VERSION, "re-run analyze")
    actual = file_digest(store.path / "analysis.safetensors")
    if data.get("fingerprints", {}).get("tensors") != actual:
        raise RunStoreError(
            f"{store.path}: analysis.safetensors does not belong to analysis.json (hash {actual}, the JSON "
            f"expects {data.get('fingerprints', {}).get('tensors')}); an analysis was interrupted, re-run analyze"
        )
    tensors = store.read_tensors("analysis", required=_REQUIRED_TENSORS)
    return Analysis(data=data, tensors=tensors)


# ----------------------------------------------------------------------------------------------
# "Why does it look there": one probe sample


@dataclass
class PrototypeEvidence:
    """One prototype under a sample's top saliency positions, with its pooled betas."""

    prototype: int
    positions: list[list[int]]
    intensity: float
    beta_true_now: float
    beta_predicted_now: float
    beta_true: list[float]
    beta_predicted: list[float]
    uncertain_pairs: list[list[int]]


@dataclass
class SampleExplanation:
    """Why probe sample ``index`` looks where it looks, at the final checkpoint of the analysis.

    ``positions``: the top saliency positions, ``{row, col, saliency, prototype}``, highest first.
    ``prototypes``: one :class:`PrototypeEvidence` per distinct prototype among them, in order of
    first appearance; betas are the pooled regression's for the true and the predicted class,
    ``*_now`` at the last transition and the lists over all ``transitions``.
    """

    index: int
    dataset_index: int
    step: int
    true_class: int
    true_name: str
    predicted_class: int
    predicted_name: str
    prob_true: float
    prob_predicted: float
    grid: list[int]
    transitions: list[list[int]]
    positions: list[dict]
    prototypes: list[PrototypeEvidence] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        correct = "correct" if self.true_class == self.predicted_class else "WRONG"
        lines = [
            f"probe sample {self.index} (dataset index {self.dataset_index}) at step {self.step}: "
            f"true {self.true_name!r} (p={self.prob_true:.3f}), predicted {self.predicted_name!r} "
            f"(p={self.prob_predicted:.3f}), {correct}",
            f"top {len(self.positions)} saliency positions on the {self.grid[0]}x{self.grid[1]} grid:",
        ]
        for p in self.positions:
            lines.append(f"  ({p['row']}, {p['col']})  saliency {p['saliency']:.4g}  -> prototype {p['prototype']}")
        lines.append("their prototypes (pooled beta: rise in confidence per standardised rise in the prototype):")
        for e in self.prototypes:
            seq = lambda v: "[" + ", ".join(f"{x:+.3g}" for x in v) + "]"  # noqa: E731
            flag = "" if not e.uncertain_pairs else "  UNCERTAIN for pairs " + ", ".join(
                f"{a}-{b}" for a, b in e.uncertain_pairs)
            lines.append(
                f"  prototype {e.prototype}: intensity {e.intensity:.4g}; now beta[{self.true_name}] "
                f"{e.beta_true_now:+.4g}, beta[{self.predicted_name}] {e.beta_predicted_now:+.4g}{flag}")
            lines.append(f"    over training: {self.true_name} {seq(e.beta_true)}")
            if self.predicted_class != self.true_class:
                lines.append(f"                   {self.predicted_name} {seq(e.beta_predicted)}")
        return "\n".join(lines)


def explain_sample(run, index: int, top: int = 5) -> SampleExplanation:
    """Where probe sample ``index`` looks at the final checkpoint (its ``top`` highest raw saliency
    positions, ties in row-major order; at most h*w), which prototypes sit there, and their pooled
    beta for the true and the predicted class now and over training, with the confused pairs
    (involving either class) for which each is flagged uncertain. Reads the stored analysis."""
    store = open_run(run)
    analysis = load_analysis(store)
    n = store.probe_size
    if isinstance(index, bool) or not hasattr(index, "__index__"):
        raise TypeError(f"index: expected an int probe index, got {describe(index)}")
    index = operator.index(index)
    if not 0 <= index < n:
        raise IndexError(f"index: expected a probe index in [0, {n - 1}] (probe size {n}), got {index}")
    top = check_int(top, "top", 1)
    assignment, _ = read_assignment(store)
    if tensor_digest(assignment) != analysis.data["fingerprints"]["prototypes"]:
        raise RunStoreError(f"run {store.path}: the prototypes changed since the analysis; re-run analyze")
    step = analysis.steps[-1]
    ckpt = store.load_checkpoint(step)
    sal = ckpt["saliency"][index].float()
    probs = ckpt["probs"][index]
    indices, labels = store.probe()
    y, pred = int(labels[index]), int(probs.argmax())
    h, w = sal.shape
    order = torch.sort(sal.flatten(), descending=True, stable=True).indices[: min(top, h * w)]
    flat_assign = assignment[index].flatten()
    positions: list[dict[str, Any]] = [{"row": int(j) // w, "col": int(j) % w, "saliency": float(sal.flatten()[j]),
                  "prototype": int(flat_assign[j])} for j in order]
    beta = analysis.beta_pooled  # [T-1, K, M]
    involved = {y, pred}
    evidence: list[PrototypeEvidence] = []
    seen: dict[int, PrototypeEvidence] = {}
    for p in positions:
        k = p["prototype"]
        if k in seen:
            seen[k].positions.append([p["row"], p["col"]])
            continue
        pairs = []
        for u in analysis.data["uncertainty"]:
            a, b = u["pair"]
            if involved & {a, b} and k in {f["prototype"] for f in u["flagged"]}:
                pairs.append([a, b])
        seen[k] = PrototypeEvidence(
            prototype=k,
            positions=[[p["row"], p["col"]]],
            intensity=float(analysis.tensors["intensity"][-1, index, k]),
            beta_true_now=float(beta[-1, k, y]),
            beta_predicted_now=float(beta[-1, k, pred]),
            beta_true=[float(v) for v in beta[:, k, y]],
            beta_predicted=[float(v) for v in beta[:, k, pred]],
            uncertain_pairs=pairs,
        )
        evidence.append(seen[k])
    names = analysis.classes
    return SampleExplanation(
        index=index, dataset_index=int(indices[index]), step=int(step), true_class=y, true_name=names[y],
        predicted_class=pred, predicted_name=names[pred], prob_true=float(probs[y]), prob_predicted=float(probs[pred]),
        grid=[int(h), int(w)], transitions=[list(t) for t in analysis.data["transitions"]], positions=positions,
        prototypes=evidence,
    )
