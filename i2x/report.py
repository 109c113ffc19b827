"""The HTML report of a run: one self-contained file (``RUN/report/index.html``) that shows what
every stage stored, readable offline in any browser (``docs/report.md`` explains how to read it).

    path = i2x.report.write_report("runs/fmnist")          # or: i2x report runs/fmnist

Everything is read through the run store and each stage's own loader (``RunStore``,
``load_analysis``, ``load_targets``, ``load_results``); nothing is recomputed that a stage stored.
The numbers behind the figures come from small pure functions (:func:`confusion_matrices`,
:func:`probe_accuracy`, :func:`prototype_presence`, :func:`patch_box`, :func:`exemplar_patches`),
so they can be checked on their own. A stage that has not run gives its section a one-line note;
pictures of the data need the dataset, loaded by the name the run recorded (or given), and when it
cannot be loaded those panels say why in one line while the rest renders. A corrupt run raises
:class:`i2x.RunStoreError` naming the file.

The HTML has inline CSS, every image is a PNG data URI, there is no JavaScript and nothing points
outside the file. Every string that comes from the run (class names, paths, reasons) is escaped.
"""

from __future__ import annotations

import html
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .store import RunStore, RunStoreError, atomic_write_bytes

__all__ = ["SECTIONS", "Report", "write_report", "render_report", "confusion_matrices", "probe_accuracy",
           "prototype_presence", "patch_box", "exemplar_patches", "image_size"]

#: ``(id, title)`` of the report's sections, in order; the ids are the ``<section id>`` anchors.
SECTIONS = (("overview", "Overview"), ("prototypes", "Prototypes"), ("training", "Training"),
            ("uncertain", "Uncertain prototypes"), ("curation", "Curation"), ("experiment", "Experiment"))
_MAX_NOTE = 300


def _open(run) -> RunStore:
    return run if isinstance(run, RunStore) else RunStore.open(run)


def _one_line(message, limit: int = _MAX_NOTE) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# The numbers behind the figures


def _probs(store: RunStore) -> tuple[list[int], torch.Tensor]:
    steps = store.finished_steps()
    if not steps:
        raise RunStoreError(f"run {store.path} has no finished checkpoints yet")
    return steps, torch.stack([store.load_checkpoint(s)["probs"] for s in steps])


def confusion_matrices(run) -> tuple[list[int], torch.Tensor]:
    """``(steps, hard [T, M, M] int64)``: at every finished checkpoint, ``hard[t, a, b]`` counts the
    probe samples of class a the model predicted as b (argmax of the stored softmax)."""
    from .analysis import confusion_matrices as _confusion

    store = _open(run)
    steps, probs = _probs(store)
    hard, _ = _confusion(probs, store.probe_labels())
    return steps, hard


def probe_accuracy(run) -> tuple[list[int], torch.Tensor]:
    """``(steps, accuracy [T] float64)`` of the stored softmax on the probe set."""
    store = _open(run)
    steps, probs = _probs(store)
    return steps, (probs.argmax(dim=2) == store.probe_labels()).double().mean(dim=1)


def prototype_presence(assignment: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """``[M, K]`` float64: the share of each class's probe samples that have at least one grid
    position assigned to each prototype (0 for a class without samples)."""
    n = assignment.shape[0]
    present = torch.zeros(n, k, dtype=torch.bool)
    present[torch.arange(n).repeat_interleave(assignment[0].numel()), assignment.reshape(-1)] = True
    out = torch.zeros(num_classes, k, dtype=torch.float64)
    out.index_add_(0, labels, present.double())
    return out / torch.bincount(labels, minlength=num_classes).clamp(min=1).double()[:, None]


def patch_box(row: int, col: int, grid: tuple[int, int], image_hw: tuple[int, int], context: int = 1):
    """``(top, left, height, width)`` in pixels of the patch an exemplar at grid cell (row, col)
    stands for: the cell's pixels grown by ``context`` cells on every side (a cell's feature sees
    beyond its own pixels), shifted, not cut, where it would leave the image, so that every patch
    of a run has the same size."""
    (h, w), (big_h, big_w) = grid, image_hw

    def span(i: int, cells: int, pixels: int) -> tuple[int, int]:
        start = (i - context) * pixels // cells
        stop = -(-(i + 1 + context) * pixels // cells)  # ceil
        size = min(pixels, stop - start)
        return min(max(0, start), pixels - size), size

    (top, height), (left, width) = span(int(row), h, big_h), span(int(col), w, big_w)
    return top, left, height, width


def _patches(exemplars: torch.Tensor, probe_indices: torch.Tensor, images: torch.Tensor, grid, k: int,
             context: int) -> list[dict]:
    out = []
    for sample, row, col in exemplars[k].tolist():
        if sample < 0:  # padding of a prototype with fewer positions than exemplars
            continue
        index = int(probe_indices[sample])
        top, left, height, width = patch_box(row, col, grid, tuple(images.shape[-2:]), context)
        out.append({"sample": sample, "dataset_index": index, "row": row, "col": col,
                    "box": (top, left, height, width),
                    "patch": images[index][:, top:top + height, left:left + width]})
    return out


def exemplar_patches(run, dataset, prototype: int, context: int = 1) -> list[dict]:
    """The stored exemplars of ``prototype``, nearest first, each as ``{"sample"`` (probe row),
    ``"dataset_index"``, ``"row"``, ``"col"`` (grid cell), ``"box"`` (:func:`patch_box`), ``"patch"``
    (``[C, height, width]``, the dataset's pixels as stored, i.e. normalised)``}``."""
    store = _open(run)
    protos = _prototypes(store)
    if not 0 <= int(prototype) < protos.n_prototypes:
        raise IndexError(f"prototype: expected an id in [0, {protos.n_prototypes}), got {prototype}")
    indices, _ = store.probe()
    return _patches(protos.exemplars, indices, dataset.images, store.grid, int(prototype), context)


def _prototypes(store: RunStore):
    from .prototypes import Prototypes

    if not (store.path / "prototypes.safetensors").exists():
        raise FileNotFoundError(f"run {store.path} has no prototypes")
    try:
        protos = Prototypes.from_tensors(store.read_tensors("prototypes"))
    except (KeyError, TypeError) as e:
        raise RunStoreError(f"{store.path / 'prototypes.safetensors'} is corrupt ({e}); re-run the prototypes") from None
    if list(protos.assignment.shape) != [store.probe_size, *(store.grid or ())]:
        raise RunStoreError(f"{store.path / 'prototypes.safetensors'}: assignment {list(protos.assignment.shape)} does "
                            f"not fit the run's probe and grid; re-run the prototypes")
    return protos


# ----------------------------------------------------------------------------------------------
# The dataset behind the pictures


def image_size(run) -> int | None:
    """The side length the run's images had (None: the dataset's default). Known from the targets
    (they store the training images' size); otherwise the one whose grid at the run's layer, in
    the run's architecture (rebuilt from the manifest, weights not needed), is the run's grid."""
    from .data import DATASET_INFO

    store = _open(run)
    if (store.path / "targets.json").exists():
        hw = (store.read_json("targets") or {}).get("image_hw")
        if isinstance(hw, list) and len(hw) == 2:
            return int(hw[0])
    spec, grid = store.manifest["model"].get("build"), store.grid
    info = DATASET_INFO.get(store.manifest["dataset"].get("name"))
    if not isinstance(spec, dict) or grid is None or info is None:
        return None
    at_default = _grid_at(spec, store.manifest["model"]["layer"], info.size)
    if at_default is None or tuple(at_default) == tuple(grid):
        return None
    # The layer's stride is fixed: scale the default size by the ratio of the grids.
    size = round(info.size * grid[0] / at_default[0])
    if _grid_at(spec, store.manifest["model"]["layer"], size) != tuple(grid):
        raise ValueError(f"no image size gives the run's {grid[0]}x{grid[1]} grid at its layer; pass dataset=")
    return size


def _grid_at(spec: dict, layer: str, size: int) -> tuple[int, int] | None:
    from .models import rebuild_model

    model, _ = rebuild_model(spec)
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, int(spec.get("in_channels", 1)), size, size))
    finally:
        handle.remove()
    shape = seen.get("shape", ())
    return tuple(shape[-2:]) if len(shape) == 4 else None


def _load_run_dataset(store: RunStore, data_root) -> tuple[object | None, str | None]:
    """``(dataset, None)``, or ``(None, why)`` as the one line the image panels show instead."""
    from .data import DATASET_INFO, dataset_for_run

    recorded = store.manifest["dataset"]
    name = recorded.get("name")
    if name not in DATASET_INFO:
        return None, (f"images not shown: the run's dataset {name!r} is not one i2x loads by name; pass dataset= to "
                      "write_report")
    try:
        data = dataset_for_run(store, name, root=data_root, train=recorded.get("split", "train") != "test",
                               size=image_size(store))
    except FileNotFoundError as e:
        return None, f"images not shown: dataset {name!r} not found ({_one_line(str(e).splitlines()[0])}); pass --data-root"
    except ValueError as e:
        return None, f"images not shown: dataset {name!r} does not match the run: {_one_line(e)}"
    return data, None


# ----------------------------------------------------------------------------------------------
# What the run holds, loaded once


@dataclass
class _Run:
    store: RunStore
    label: str                      # the run as the user named it, for the commands in notes
    experiment: str
    data: object | None = None
    data_note: str | None = None
    steps: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None
    protos: object | None = None
    analysis: object | None = None
    analysis_note: str | None = None
    targets: object | None = None
    targets_note: str | None = None
    results: dict | None = None
    labels: torch.Tensor | None = None            # the probe's true classes
    probe_indices: torch.Tensor | None = None     # the probe's positions in the dataset
    final_saliency: torch.Tensor | None = None    # [N, h, w] raw GradCAM at the last checkpoint
    notes: dict[str, list[str]] = field(default_factory=dict)
    section: str = "overview"                     # the section being built (where notes go)

    def note(self, text: str) -> str:
        """Record a one-line note of the current section and return it as HTML (commands in
        backticks become code; everything escaped)."""
        self.notes.setdefault(self.section, []).append(text)
        parts = html.escape(text, quote=True).split("`")
        body = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
        return f'<p class="note">{body}</p>'

    def command(self, text: str) -> str:
        """``text`` with the words RUN and DATA replaced by this run's folder and dataset name
        (shell-quoted), in one pass so neither can alter the other."""
        values = {"RUN": shlex.quote(self.label),
                  "DATA": shlex.quote(str(self.store.manifest["dataset"].get("name") or "NAME"))}
        return re.sub(r"\b(RUN|DATA)\b", lambda m: values[m.group(1)], text)


def _load(store: RunStore, label: str, dataset, data_root, experiment: str) -> _Run:
    from .analysis import _sha256_bytes, load_analysis
    from .curate import NothingToCurate, load_targets
    from .experiment import load_results

    r = _Run(store, label, experiment)
    r.probe_indices, r.labels = store.probe()
    if store.finished_steps():
        r.steps, r.probs = _probs(store)
        r.final_saliency = store.load_checkpoint(r.steps[-1])["saliency"].float()
    if (store.path / "prototypes.safetensors").exists():
        r.protos = _prototypes(store)
    if (store.path / "analysis.json").exists():
        try:
            r.analysis = load_analysis(store)
        except FileNotFoundError as e:  # the JSON without its tensors: a torn analysis
            raise RunStoreError(_one_line(e, 600)) from None
        if r.protos is not None and _sha256_bytes(r.protos.assignment) != r.analysis.data["fingerprints"]["prototypes"]:
            r.analysis, r.analysis_note = None, r.command("the prototypes changed after the analysis: re-run `i2x analyze RUN`")
    else:
        r.analysis_note = r.command("not run yet: run `i2x analyze RUN`")
    try:
        r.targets = load_targets(store)
    except FileNotFoundError:
        r.targets_note = r.command("not run yet: run `i2x curate RUN --data DATA`")
    except NothingToCurate as e:
        r.targets_note = f"nothing to curate: {_one_line(e)}"
    try:
        r.results = load_results(store, experiment)
    except FileNotFoundError:
        pass
    if dataset is not None:
        from .data import check_dataset_for_run

        check_dataset_for_run(store, dataset)
        r.data = dataset
    elif r.protos is not None or r.targets is not None:
        r.data, r.data_note = _load_run_dataset(store, data_root)
    return r


def render_report(run, *, dataset=None, experiment: str = "experiment", progress: bool = False,
                  data_root=None) -> "Report":
    """Build the report of ``run`` (a folder or a ``RunStore``) in memory; see :func:`write_report`."""
    from . import report_sections as sections
    from ._progress import bar

    store = _open(run)
    label = str(store.path if isinstance(run, RunStore) else run)
    r = _load(store, label, dataset, data_root, experiment)
    builders = {"overview": sections.overview, "prototypes": sections.prototypes, "training": sections.training,
                "uncertain": sections.uncertain, "curation": sections.curation, "experiment": sections.experiment}
    parts = []
    for sid, title in bar(SECTIONS, desc="report", unit="section", enabled=progress):
        r.section = sid
        body = builders[sid](r)
        parts.append(f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>')
    page = _PAGE.format(title=html.escape(f"i2x report: {store.path.resolve().name}"), body="\n".join(parts))
    notes = {sid: list(r.notes.get(sid, [])) for sid, _ in SECTIONS}
    return Report(html=page, sections=[sid for sid, _ in SECTIONS], notes=notes, run=store.path)


@dataclass
class Report:
    """A rendered report: ``html`` (the whole page), ``sections`` (their ids, in order) and
    ``notes`` (id -> the one-line notes shown there: stages not run yet, images not shown)."""

    html: str
    sections: list[str]
    notes: dict[str, list[str]]
    run: Path

    def write(self, out=None) -> Path:
        """Write the page atomically to ``out`` (default ``RUN/report/index.html``)."""
        if out is None:
            # Inside the run: as its writer, so a second process never interleaves with another one.
            store = RunStore.open(self.run).lock_for_writing()
            path = self.run / "report" / "index.html"
            try:
                atomic_write_bytes(path, self.html.encode("utf-8"))
            finally:
                store.release()
            return path
        atomic_write_bytes(Path(out), self.html.encode("utf-8"))
        return Path(out)


def write_report(run, *, dataset=None, experiment: str = "experiment", out=None, progress: bool = False,
                 data_root=None) -> Path:
    """Write the HTML report of ``run`` to ``out`` (default ``RUN/report/index.html``) and return its path.

    Args:
        run: the run folder (or a ``RunStore``).
        dataset: the dataset the run's probe indexes (an ``i2x.data.ImageDataset``); default: loaded by
            the name the manifest records (from ``data_root`` or i2x's usual places), at the run's image
            size (:func:`image_size`). When it cannot be loaded the image panels say why; a dataset given
            here that does not match the run raises ValueError.
        experiment: the experiment's folder in the run (``i2x experiment --name``).
        progress: a progress bar over the sections (on a terminal).

    Raises:
        RunStoreError: the run folder is missing or corrupt (the message names the file).
    """
    return render_report(run, dataset=dataset, experiment=experiment, progress=progress, data_root=data_root).write(out)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; max-width: 1100px;
       margin: 0 auto; padding: 1em 1.5em 4em; background: #fff; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }}
h3 {{ font-size: 1.1em; margin: 1.2em 0 .4em; }}
nav a {{ margin-right: 1em; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f6; }}
img {{ max-width: 100%; height: auto; }}
img.chart {{ display: block; margin: .4em 0 .8em; }}
.row {{ display: flex; flex-wrap: wrap; align-items: flex-start; }}
.group {{ display: inline-flex; margin-right: 1.2em; }}
img.tile {{ image-rendering: pixelated; width: 96px; }}
figure.tile {{ display: inline-block; margin: 0 .6em .6em 0; width: 96px; vertical-align: top; }}
figcaption {{ font-size: 11px; color: #555; word-wrap: break-word; }}
.proto {{ border: 1px solid #e3e3e8; border-radius: 6px; padding: .5em .8em; margin: .6em 0; }}
.proto img {{ image-rendering: pixelated; display: block; margin-top: .3em; }}
.note {{ color: #8a5a00; background: #fff7e6; border-left: 4px solid #f0b000; padding: .3em .6em; }}
code {{ background: #f2f2f2; padding: 0 .2em; border-radius: 3px; }}
.muted {{ color: #666; font-size: 12px; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"""
