"""The six sections of the HTML report (:mod:`i2x.report`), one function each, from a loaded run
(:class:`i2x.report.loading.LoadedRun`) to an HTML fragment. Every string from the run goes through :func:`_e`."""

from __future__ import annotations

import html
import shlex

import numpy as np
import torch

from i2x.analysis.readings import confusion_matrices as readings_confusion
from i2x.analysis.readings import most_confused_pairs
from i2x.loop.experiments import paired_interval, results_markdown
from i2x.loop.strategies import mass_share, pixel_masks
from i2x.loop.targets import NothingToCurate
from i2x.ops import upsample_normalize
from i2x.report import figures
from i2x.report.loading import LoadedRun
from i2x.report.numbers import (
    confusion_matrices,
    exemplar_patches_at,
    probe_accuracy,
    prototype_presence,
)
from i2x.store import RunStoreError

__all__ = ["SECTIONS", "BUILDERS", "markdown_html", "most_confused", "cam_samples", "experiment_series"]

#: ``(id, title)`` of the report's sections, in order; the ids are the ``<section id>`` anchors.
SECTIONS = (("overview", "Overview"), ("prototypes", "Prototypes"), ("training", "Training"),
            ("uncertain", "Uncertain prototypes"), ("curation", "Curation"), ("experiment", "Experiment"))

_N_TILES = 6          # CAM overlays per confused pair
_N_BEFORE_AFTER = 4   # targets shown per curation strategy
_N_TIMELINE_LINES = 6
_N_TIMELINE_ROWS = 12
_OPEN_CARDS = 4       # prototype cards shown open; the rest are collapsed under one <details>


# ----------------------------------------------------------------------------------------------
# HTML pieces


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _img(png: bytes, alt: str, cls: str = "chart") -> str:
    return f'<img class="{cls}" src="{figures.data_uri(png)}" alt="{_e(alt)}">'


def _table(header: list[str] | None, rows: list[list], raw_columns: tuple[int, ...] = ()) -> str:
    """A table (no header row when ``header`` is None), every cell escaped except the columns in
    ``raw_columns`` (HTML built here)."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{v if j in raw_columns else _e(v)}</td>" for j, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _tile(rgb: np.ndarray, caption: str) -> str:
    png = figures.rgb_png(figures.upscale(rgb))
    return f'<figure class="tile">{_img(png, caption, "tile")}<figcaption>{_e(caption)}</figcaption></figure>'


def _group(tiles: list[str]) -> str:
    """Tiles that belong together (one target's before and after), kept on one line."""
    return '<div class="group">' + "".join(tiles) + "</div>"


def _link(k: int) -> str:
    return f'<a href="#prototype-{int(k)}">{int(k)}</a>'


def markdown_html(text: str) -> str:
    """The markdown ``i2x.experiment.results_markdown`` writes (headings, paragraphs, pipe tables)
    as HTML, every cell escaped."""
    out: list[str] = []
    table: list[str] = []

    def flush():
        if table:
            rows = [row for row in table if not set(row.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
            out.append(_table(cells[0], cells[1:]))
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{_e(line.lstrip('#').strip())}</h3>")
        elif line.strip():
            out.append(f"<p>{_e(line)}</p>")
    flush()
    return "\n".join(out)


def _pixels(data, image: torch.Tensor) -> np.ndarray:
    """A stored (normalised) image ``[C, H, W]`` as ``[H, W, 3]`` uint8 pixels."""
    return figures.to_rgb(data.denormalize(image.float()).numpy())


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# ----------------------------------------------------------------------------------------------
# 1. Overview


def most_confused(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> str:
    """The pair with the most confusions at one checkpoint (``probs [N, M]``), ranked as the
    analysis ranks them (hard confusions, ties by the soft ones, then by the pair)."""

    hard, soft = readings_confusion(probs[None], labels)
    sizes = torch.bincount(labels, minlength=len(classes))
    pairs = most_confused_pairs(hard[0], soft[0], sizes, 1)
    a, b = pairs[0] if pairs else (0, 0)
    n_ab, n_ba = int(hard[0, a, b]), int(hard[0, b, a])
    if not pairs or n_ab + n_ba == 0:
        return "none: no probe sample is confused between two classes"
    return (f"{classes[a]} vs {classes[b]}: {n_ab + n_ba} confusions ({n_ab} + {n_ba}) among the pair's "
            f"{int(sizes[a] + sizes[b])} probe samples")


def overview(r: LoadedRun) -> str:
    store, m = r.store, r.store.manifest
    model = m["model"]
    rows = [["run", str(store.path.resolve())],
            ["model", f"{model.get('name')} (layer {model.get('layer')}, {model.get('method', 'gradcam')})"],
            ["dataset", f"{m['dataset'].get('name', 'unknown')} ({m['dataset'].get('split', '?')} split)"],
            ["classes", f"{store.num_classes}: " + ", ".join(store.classes)],
            ["probe", f"{store.probe_size} samples, grid {'x'.join(map(str, store.grid or ())) or '-'}"],
            ["checkpoints", f"{len(r.steps)}: steps " + (", ".join(map(str, r.steps)) or "none")]]
    split = m["dataset"].get("split", "?")
    if r.probs is not None:
        assert r.labels is not None  # load_run reads the probe first
        final = r.probs[-1]
        rows.append([f"probe accuracy (final checkpoint; {store.probe_size} {split} images)",
                     f"{100 * float((final.argmax(1) == r.labels).double().mean()):.2f}%"])
        rows.append(["most confused pair on the probe (final checkpoint)",
                     most_confused(final, r.labels, store.classes)])
    targets = "yes" if r.targets is not None else (
        "nothing to curate" if (r.targets_note or "").startswith("nothing") else "no")
    stages = [("checkpoints", "yes" if r.steps else "no"), ("prototypes", "yes" if r.protos is not None else "no"),
              ("analysis", "yes" if (store.path / "analysis.json").exists() else "no"), ("targets", targets),
              ("final weights", "yes" if (store.path / "weights.safetensors").exists() else "no"),
              (f"experiment '{r.experiment}'", "yes" if r.results is not None else "no")]
    rows.append(["stages", ", ".join(f"{n}: {v}" for n, v in stages)])
    return _test_headline(r) + _table(None, rows)


def contents(r: LoadedRun) -> str:
    """The page's table of contents: every section, and every prototype card under Prototypes."""
    items = []
    for sid, title in SECTIONS:
        sub = ""
        if sid == "prototypes" and r.protos is not None:
            sub = " <span class=\"muted\">(" + " ".join(
                f'<a href="#prototype-{j}">{j}</a>' for j in range(r.protos.n_prototypes)) + ")</span>"
        items.append(f'<li><a href="#{sid}">{_e(title)}</a>{sub}</li>')
    return '<nav class="toc"><b>Contents</b><ol>' + "".join(items) + "</ol></nav>"


def _test_headline(r: LoadedRun) -> str:
    """The test set's numbers first, where the run holds them (the demo's evaluation, or the
    experiment's starting model); every other number of the report is on the probe, a subset of
    the training split, and says so."""
    evaluation = r.test_evaluation
    if evaluation is None:
        return ('<p class="muted">No test-set evaluation in this run yet (<code>i2x experiment</code> or '
                '<code>i2x demo</code> adds one): the numbers below are on the probe, images of the training '
                'split.</p>')
    return (f'<p class="headline">Test set: accuracy <b>{100 * evaluation["accuracy"]:.2f}%</b> on '
            f'{evaluation["n"]} test images (the final model). The other numbers of this report are on the '
            f'probe ({r.store.probe_size} images of the training split) unless they say otherwise.</p>')


# ----------------------------------------------------------------------------------------------
# 2. Prototypes


def _roles(analysis, classes: list[str]) -> dict[int, dict[str, list[str]]]:
    """prototype -> {"shared": [class names], "specialised": [...]} from the analysis."""
    out: dict[int, dict[str, list[str]]] = {}
    for entry in analysis.data["per_class"] if analysis is not None else []:
        for role in ("shared", "specialised"):
            for p in entry.get(role, []):
                out.setdefault(int(p["prototype"]), {"shared": [], "specialised": []})[role].append(
                    classes[int(entry["class"])])
    return out


def _exemplar_strip(r: LoadedRun, k: int) -> str:
    assert r.protos is not None and r.data is not None and r.probe_indices is not None
    patches = exemplar_patches_at(r.protos.exemplars, r.probe_indices, r.data.images, r.store.grid, k, context=1)
    if not patches:
        return '<p class="muted">no exemplars (the prototype holds no position)</p>'
    # The nearest exemplar in its whole image first (the patch outlined), then every patch.
    first = patches[0]
    image = figures.upscale(_pixels(r.data, r.data.images[first["dataset_index"]]))
    factor = image.shape[0] // r.data.images.shape[-2]
    top, left, height, width = (v * factor for v in first["box"])
    box = np.zeros(image.shape[:2], dtype=bool)
    box[top:top + height, left:left + width] = True
    tiles = [figures.outline(image, box, (255, 80, 0))] + [_pixels(r.data, p["patch"]) for p in patches]
    alt = f"prototype {k}: its nearest exemplar in its image, then {len(patches)} exemplar patches"
    return _img(figures.rgb_png(figures.strip(tiles, height=64)), alt, "strip")


def prototypes(r: LoadedRun) -> str:
    if r.protos is None:
        return r.note("not run yet: no prototypes; finish the tracker with prototypes (`Tracker.finish()`, "
                      "or `i2x track` without `--no-prototypes`)")
    assert r.labels is not None  # load_run reads the probe first
    classes, k = r.store.classes, r.protos.n_prototypes
    presence = prototype_presence(r.protos.assignment, r.labels, len(classes), k)
    counts = r.protos.counts()
    roles = _roles(r.analysis, classes)
    parts = [f"<p>{k} prototypes: clusters of the final model's features at the target layer, one per kind of image "
             "region. Presence: the share of a class's probe images with at least one grid cell of the prototype. "
             "Each card shows the nearest exemplar in its whole image (the patch outlined), then the exemplar "
             "patches, nearest first: the cell and one cell around it.</p>",
             _img(figures.presence_heatmap(presence.numpy(), classes), "presence of each prototype per class")]
    if r.analysis is None:
        assert r.analysis_note is not None  # load_run says why there is no analysis
        parts.append(r.note(r.analysis_note + " (to see which prototypes are shared and specialised)"))
    if r.data is None:
        assert r.data_note is not None  # with prototypes, load_run loads the dataset or says why not
        parts.append(r.note(r.data_note))
    total = max(1, int(r.protos.assignment.numel()))
    cards = []
    for j in range(k):
        top = [c for c in torch.argsort(presence[:, j], descending=True, stable=True).tolist() if presence[c, j] >= 0.1]
        in_classes = ", ".join(f"{_e(classes[c])} ({_pct(float(presence[c, j]))})" for c in top[:6]) or "none above 10%"
        role = roles.get(j, {"shared": [], "specialised": []})
        facts = [("grid cells", f"{int(counts[j])} ({100 * int(counts[j]) / total:.1f}% of the probe's)"),
                 ("present in", in_classes)]
        if role["shared"]:
            facts.append(("shared by", ", ".join(map(_e, role["shared"]))))
        if role["specialised"]:
            facts.append(("specialised in", ", ".join(map(_e, role["specialised"]))))
        card = '<table class="card">' + "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
        strip = _exemplar_strip(r, j) if r.data is not None else ""
        cards.append(f'<div class="proto" id="prototype-{j}"><h4>prototype {j}</h4>{card}</table>{strip}</div>')
    parts += cards[:_OPEN_CARDS]
    if len(cards) > _OPEN_CARDS:
        parts.append(f"<details><summary>prototypes {_OPEN_CARDS}-{k - 1}: {k - _OPEN_CARDS} more cards</summary>"
                     + "\n".join(cards[_OPEN_CARDS:]) + "</details>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# 3. Training


def training(r: LoadedRun) -> str:
    if not r.steps:
        return r.note("not run yet: no finished checkpoints; track the run (`i2x train` or `i2x track`)")
    classes = r.store.classes
    steps, hard = confusion_matrices(r.store)
    _, accuracy = probe_accuracy(r.store)
    parts = ["<h3>Probe accuracy</h3>", _img(figures.accuracy_chart(steps, accuracy.tolist()), "probe accuracy"),
             "<h3>Confusion matrices</h3><p>From the stored softmax of the probe images: row = true class, column "
             "= predicted. The final checkpoint with counts; every checkpoint's (each row scaled to its class's "
             "size) below it, collapsed.</p>",
             _img(figures.confusion_chart(hard[-1].numpy(), classes, f"final checkpoint (step {steps[-1]})"),
                  "final confusion matrix"),
             "<details><summary>the confusion matrix of every checkpoint</summary>"
             + _img(figures.confusion_grid(steps, hard.numpy()), "confusion matrix per checkpoint") + "</details>"]
    parts.append("<h3>beta<sup>t</sup>: which prototype raised which class's confidence</h3>")
    if r.analysis is None:
        assert r.analysis_note is not None  # load_run says why there is no analysis
        parts.append(r.note(r.analysis_note))
        return "\n".join(parts)
    a = r.analysis
    key = ", ".join(f"{i} = {_e(c)}" for i, c in enumerate(classes))
    if not a.data["transitions"]:  # one checkpoint: no change to regress, so no panel to draw
        parts.append("<p>The run has one checkpoint, so there is no transition to read beta from.</p>")
        parts += _timeline(r)
        return "\n".join(parts)
    parts += [f"<p>The pooled ridge regression of confidence changes on prototype-intensity changes, one panel per "
              f"transition between checkpoints (rows: prototypes 0..{a.data['num_prototypes'] - 1}, columns: classes "
              f"{key}). Red: a rise of the prototype raised the class's confidence.</p>",
              _img(figures.beta_panels(a.data["transitions"], a.beta_pooled.numpy(), classes), "beta per transition")]
    parts += _timeline(r)
    return "\n".join(parts)


def _timeline(r: LoadedRun) -> list[str]:
    a = r.analysis
    assert a is not None  # training() shows the timeline only with an analysis
    entries = a.data["timeline"]
    threshold = a.options["separation_threshold"]
    worst = sorted(entries, key=lambda e: (-max(e["error"]), e["pair"]))[:_N_TIMELINE_LINES]
    series = [(" vs ".join(e["names"]), e["error"]) for e in worst]
    if not series:  # no pair to draw: say so instead of an empty chart
        return ["<h3>Separation timeline</h3>", "<p>No pair of classes has probe images to follow.</p>"]
    parts = ["<h3>Separation timeline</h3>",
             f"<p>The pair error rate (a taken for b plus b taken for a, over the pair's probe images) of the "
             f"{len(series)} pairs confused most; a pair is separated from the checkpoint on which it stays at or "
             f"below {threshold:g}.</p>",
             _img(figures.separation_chart(a.steps, series, threshold), "pair error rates over training")]
    shown = [e for e in entries if e["status"] != "separated from the start"]
    rows = []
    for e in shown[:_N_TIMELINE_ROWS]:
        protos = ", ".join(f"{_link(p['prototype'])} (d {p['d']:+.3g})" for p in e.get("prototypes") or []) or "-"
        at = "-" if e["separated_at"] is None else str(e["separated_at"])
        rows.append([_e(" vs ".join(e["names"])), _e(e["status"]), at, f"{e['final_error']:.3f}", protos])
    if rows:
        parts.append(_table(["pair", "status", "separated at step", "final error", "prototypes that did it (d > 0: "
                             "towards the first class)"], rows, raw_columns=(0, 1, 4)))
    rest = len(entries) - len(rows)
    if rest:
        parts.append(f'<p class="muted">{rest} more pairs not listed ({len(entries) - len(shown)} separated from the '
                     "start).</p>")
    return parts


# ----------------------------------------------------------------------------------------------
# 4. Uncertain prototypes


def cam_samples(
    r: LoadedRun, pair: tuple[int, int], prototypes: list[int], n: int = _N_TILES
) -> list[tuple[int, float, bool]]:
    """Probe rows of the pair to show with their CAM: ``(row, share, is_target)``, the curation
    targets among the probe first, then by the share of the final CAM mass on the prototypes' cells."""

    assert r.labels is not None and r.probe_indices is not None  # load_run reads the probe first
    a, b = pair
    rows = ((r.labels == a) | (r.labels == b)).nonzero().flatten()
    if rows.numel() == 0 or not prototypes:
        return []
    if r.protos is None or r.final_saliency is None:
        raise _missing_for_cams(r)
    cells = torch.isin(r.protos.assignment[rows], torch.tensor(prototypes))
    share = mass_share(r.final_saliency[rows], cells)
    targeted = torch.zeros(rows.numel(), dtype=torch.bool)
    if r.targets is not None and r.targets.pair is not None and tuple(r.targets.pair) == (a, b):
        targeted = torch.isin(r.probe_indices[rows], r.targets.target_indices)
    order = sorted(range(rows.numel()), key=lambda i: (not bool(targeted[i]), -float(share[i]), i))[:n]
    return [(int(rows[i]), float(share[i]), bool(targeted[i])) for i in order]


def _cam_tile(r: LoadedRun, row: int, prototypes: list[int]) -> np.ndarray:
    # uncertain() draws the tiles only with the dataset, and cam_samples checked the rest.
    assert r.data is not None and r.protos is not None and r.final_saliency is not None
    assert r.probe_indices is not None
    image = r.data.images[int(r.probe_indices[row])]
    hw = (image.shape[-2], image.shape[-1])
    heat = upsample_normalize(r.final_saliency[row][None], hw)[0].numpy()
    rgb = figures.upscale(figures.overlay(_pixels(r.data, image), heat))
    cells = torch.isin(r.protos.assignment[row], torch.tensor(prototypes))
    mask = figures.upscale(pixel_masks(cells[None], hw)[0].numpy())
    return figures.outline(rgb, mask)


def _missing_for_cams(r: LoadedRun) -> RunStoreError:
    return RunStoreError(f"run {r.store.path}: the CAMs of the uncertain prototypes need the run's prototypes and "
                         "a finished checkpoint (re-run `i2x analyze` after the tracker made them)")


def _shortcuts(r: LoadedRun) -> list[str]:
    """The model-wide reading: every class's flagged one-sided prototypes, their evidence and exemplars."""
    a = r.analysis
    assert a is not None  # uncertain() shows it only with an analysis
    reading = a.shortcuts
    parts = ["<h3>Shortcut candidates over the whole model</h3>"]
    if reading is None:
        return parts + [r.note("the analysis predates the model-wide reading: re-run `i2x analyze RUN`")]
    flagged = [(entry["name"], p) for entry in reading["per_class"] for p in entry["flagged"]]
    parts.append("<p>Without being told a pair or a class: prototypes present in one class far more than in the "
                 "others, that raised that class's confidence and little else's, and that the model looks at more than "
                 "their area warrants (score = skew x effect x one-sidedness x concentration; "
                 "<code>docs/analysis.md</code>). A shortcut lowers the training errors it causes, so it need not be "
                 "among the confused pairs below.</p>")
    if not flagged:
        return parts + ["<p>No prototype clears the cut: no shortcut-like prototype was found.</p>"]
    rows = [[_e(name), _link(p["prototype"]), f"{p['score']:.3g}", f"{p['skew']:+.2f}", f"{p['effect']:+.3g}",
             f"{p['one_sided']:.2f}", f"{p['concentration']:.2f}", _e(p["reason"])] for name, p in flagged]
    parts.append(_table(["class", "prototype", "score", "skew", "effect", "one-sided", "concentration", "why"],
                        rows, raw_columns=(1,)))
    if r.data is not None and r.protos is not None:
        for k in sorted({int(p["prototype"]) for _, p in flagged}):
            parts.append(f"<p>prototype {_link(k)}: its exemplars</p>" + _exemplar_strip(r, k))
    return parts


def _label_diagnosis(r: LoadedRun) -> list[str]:
    """``i2x labels``' verdict per pair (shortcut or class overlap), with the likeliest mislabelled
    images; nothing when the run has no diagnosis."""
    path = r.store.path / "labels.json"
    if not path.exists():
        return []
    diagnosis = r.store.read_json("labels")
    parts = ["<h3>Shortcut or class overlap</h3>",
             f"<p>cleanlab on out-of-sample probabilities ({_e(diagnosis['probabilities'])}, "
             f"{_pct(diagnosis['accuracy'])} accurate on {diagnosis['images']} training images): the share of each "
             "pair's images that are likely mislabelled or ambiguous toward the other class, beside the shortcut "
             "reading's flags. Fine-tuning repairs a shortcut; it does not repair overlapping classes.</p>",
             "<ul>" + "".join(f"<li>{_e(e['line'])}</li>" for e in diagnosis["pairs"]) + "</ul>"]
    if r.data is None:
        return parts
    for e in diagnosis["pairs"]:
        if not e["exemplars"]:
            continue
        a, b = e["pair"]
        names = r.store.classes
        tiles = []
        for i in e["exemplars"]:
            given = int(r.data.labels[i])
            other = b if given == a else a
            tiles.append(_tile(_pixels(r.data, r.data.images[i]), f"labelled {names[given]}, likely {names[other]}"))
        parts.append(f"<p>{_e(names[a])} vs {_e(names[b])}: the likeliest mislabelled training images</p>"
                     + _group(tiles))
    return parts


def uncertain(r: LoadedRun) -> str:
    if r.analysis is None:
        assert r.analysis_note is not None  # load_run says why there is no analysis
        return r.note(r.analysis_note)
    a = r.analysis
    entries = a.data["uncertainty"]
    shortcuts = _shortcuts(r) + _label_diagnosis(r)
    if not entries:
        return "\n".join(shortcuts + ["<p>The analysis examined no pair (n_pairs = 0).</p>"])
    classes = r.store.classes
    parts = [*shortcuts, "<h3>The most confused pairs</h3>",
             "<p>For the most confused pairs (a, b): d<sub>k</sub><sup>t</sup> = beta<sup>t</sup>[k, a] - "
             "beta<sup>t</sup>[k, b], how a rise of prototype k moved the decision between the two at each transition. "
             "Ambivalent prototypes push both ways over training; decisive ones push one way all along (shortcut "
             "candidates). The overlays show the final CAM of probe images of the pair (curation targets first, then "
             "those with the largest share of CAM mass on the flagged prototypes' cells, outlined white).</p>"]
    if r.data is None:
        if r.data_note is None:  # an analysis without prototypes: load_run loaded no dataset
            raise _missing_for_cams(r)
        parts.append(r.note(r.data_note))
    for i, u in enumerate(entries):
        pa, pb = (int(v) for v in u["pair"])
        flagged = a.flagged_prototypes(pa, pb)
        if i == 1:  # the most confused pair open; the others collapsed, one summary line each
            parts.append("<details><summary>the other pairs: " + ", ".join(
                f"{_e(classes[int(v['pair'][0])])} vs {_e(classes[int(v['pair'][1])])}" for v in entries[1:])
                + "</summary>")
        parts.append(f"<h3>{_e(classes[pa])} vs {_e(classes[pb])}</h3><p>{u['hard_confusions']} confusions at the "
                     f"final checkpoint among {u['n_samples']} probe images; regression {_e(u['regression'])}, score "
                     f"{_e(u['score'])}.</p>")
        if not flagged:
            parts.append("<p>No prototype is flagged for this pair.</p>")
        rows = [[_link(p["prototype"]), _e(p["kind"]), "-" if p["score"] is None else f"{p['score']:.3g}",
                 _e(p["reason"])] for p in flagged]
        if rows:
            parts.append(_table(["prototype", "kind", "score", "why"], rows, raw_columns=(0, 1, 3)))
        d = a.tensors[f"uncertainty.a{pa}.b{pb}.d"].numpy()
        highlight = {int(p["prototype"]): f"{p['prototype']} ({p['kind']})" for p in flagged}
        if a.data["transitions"]:  # d_k^t needs at least one transition
            parts.append(_img(figures.d_curves(a.data["transitions"], d, highlight, (classes[pa], classes[pb])),
                          f"d_k^t for {classes[pa]} vs {classes[pb]}"))
        ids = sorted(highlight)
        if r.data is not None and r.final_saliency is not None and ids:
            assert r.probs is not None and r.labels is not None  # finished checkpoints: load_run read them
            tiles = []
            for row, share, target in cam_samples(r, (pa, pb), ids):
                pred = int(r.probs[-1][row].argmax())
                caption = (f"#{row}: {classes[int(r.labels[row])]} \u2192 {classes[pred]}, share {share:.2f}"
                           + (", target" if target else ""))
                tiles.append(_tile(_cam_tile(r, row, ids), caption))
            parts.append('<div class="row">' + "".join(tiles) + "</div>")
    if len(entries) > 1:
        parts.append("</details>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# 5. Curation


def curation(r: LoadedRun) -> str:
    if r.targets is None:
        assert r.targets_note is not None  # load_run says why there are no targets
        return r.note(r.targets_note)
    t, classes = r.targets, r.store.classes
    s = t.summary()
    if s["pair"] is None:  # model-scope targets (find_targets(scope="model"))
        where = "Over every class"
    else:
        a, b = s["pair"]
        where = f"Pair {_e(classes[a])} vs {_e(classes[b])}"
    parts = [f"<p>{where}: {s['targets']} of its {s['pair_samples']} training "
             f"samples are targets ({_pct(s['share'])}), the samples whose CAM rests on the flagged prototypes.</p>"]
    rows = [[v["name"], v["samples"], v["targets"], _pct(v["share"]), v["errors"], v["errors_targeted"],
             "-" if v["mean_margin_targets"] is None else f"{v['mean_margin_targets']:+.2f}",
             "-" if v["mean_margin_class"] is None else f"{v['mean_margin_class']:+.2f}"]
            for v in s["per_class"].values()]
    parts.append(_table(["class", "samples", "targets", "share", "training errors", "errors targeted",
                         "mean margin (targets)", "mean margin (class)"], rows))
    protos = [[_link(p["prototype"]) if p["prototype"] >= 0 else "-", _e(p["kind"]),
               "yes" if p.get("used", True) else "no",
               "-" if p.get("separability") is None else f"{p['separability']:.2f}", _e(p.get("reason") or "")]
              for p in s["prototypes"]]
    parts.append(_table(["prototype", "kind", "used", "separability", "why flagged"], protos, raw_columns=(0, 1, 4)))
    if r.data is None:
        assert r.data_note is not None  # with targets, load_run loads the dataset or says why not
        parts.append(r.note(r.data_note))
        return "\n".join(parts)
    parts += _perturbed(r) + _transplanted(r)
    return "\n".join(parts)


def _perturbed(r: LoadedRun) -> list[str]:
    t, data = r.targets, r.data
    assert t is not None and data is not None  # curation() shows them only with targets and the dataset
    rows = t.selected.nonzero().flatten()
    rows = rows[torch.argsort(-t.scores[rows], stable=True)][:_N_BEFORE_AFTER]
    perturbed = t.perturbed(data, "fill")
    masks = t.masks_for(rows)
    tiles = []
    for row, mask in zip(rows.tolist(), masks, strict=True):
        index = int(t.indices[row])
        before = _pixels(data, data.images[index])
        after = _pixels(data, perturbed[index][0])
        up = figures.upscale(mask.numpy())
        tiles.append(_group([_tile(figures.outline(figures.upscale(before), up, (255, 80, 0)),
                                   f"target {index}: flagged region"),
                             _tile(after, f"target {index}: perturbed (fill)")]))
    return ["<h3>Perturbed: the flagged region hidden</h3>", '<div class="row">' + "".join(tiles) + "</div>"]


def _transplanted(r: LoadedRun) -> list[str]:
    t, data = r.targets, r.data
    assert t is not None and data is not None  # curation() shows them only with targets and the dataset
    try:
        moved = t.transplanted(data)
    except NothingToCurate as e:
        return ["<h3>Transplanted</h3>", r.note(f"no transplant: {e}")]
    tiles = []
    n = min(_N_BEFORE_AFTER, moved.donors.numel())
    pairs = zip(moved.donors[:n].tolist(), moved.recipients[:n].tolist(), moved.masks[:n], strict=True)
    for donor, recipient, mask in pairs:
        up = figures.upscale(mask.numpy())
        donor_rgb = figures.outline(figures.upscale(_pixels(data, data.images[donor])), up, (255, 80, 0))
        tiles.append(_group([_tile(donor_rgb, f"donor {donor} ({r.store.classes[int(data.labels[donor])]})"),
                             _tile(_pixels(data, data.images[recipient]), f"recipient {recipient} before"),
                             _tile(_pixels(data, moved[recipient][0]), f"recipient {recipient} after")]))
    return ["<h3>Transplanted: the flagged region pasted into the other class</h3>",
            '<div class="row">' + "".join(tiles) + "</div>"]


# ----------------------------------------------------------------------------------------------
# 6. Experiment


def experiment_series(results: dict) -> list[dict]:
    """Per arm with finished seeds, in the results' order: ``{"arm", "seeds", "pair_confusions",
    "accuracy", "interval"}`` where ``interval`` is ``paired_interval`` of the pair confusions
    (mean and 95% t-interval over the seeds)."""

    out = []
    for arm, entry in results["arms"].items():
        cells = entry.get("seeds") or {}
        if not cells:
            continue
        seeds = sorted(cells, key=int)
        confusions = [cells[s]["pair_confusions"] for s in seeds]
        out.append({"arm": arm, "seeds": [int(s) for s in seeds], "pair_confusions": confusions,
                    "accuracy": [cells[s]["accuracy"] for s in seeds], "interval": paired_interval(confusions)})
    return out


def experiment(r: LoadedRun) -> str:

    if r.results is None:
        name = "" if r.experiment == "experiment" else f" --name {shlex.quote(r.experiment)}"
        return r.note(r.command("not run yet: run `i2x experiment RUN --data DATA") + name + "`")
    results = r.results
    series = experiment_series(results)
    parts = []
    if series:
        names = tuple(results.get("pair_names") or [str(v) for v in results["pair"]])
        intervals = [(s["interval"]["mean"], s["interval"]["lo"], s["interval"]["hi"]) for s in series]
        png = figures.experiment_chart([s["arm"] for s in series], [s["pair_confusions"] for s in series],
                                       intervals, [s["accuracy"] for s in series], names)
        spread = ("95% t-interval over seeds (bar)" if any(len(s["seeds"]) > 1 for s in series)
                  else "one seed: no interval")
        parts += [f"<p>Per arm: the pair's confusions on the test set for every seed (dots), their mean (tick); "
                  f"{spread}; right: test accuracy per seed.</p>", _img(png, "experiment arms")]
    parts.append(markdown_html(results_markdown(results)))
    return "\n".join(parts)


#: section id -> the function that builds it from a :class:`LoadedRun`.
BUILDERS = {"overview": overview, "prototypes": prototypes, "training": training, "uncertain": uncertain,
            "curation": curation, "experiment": experiment}
