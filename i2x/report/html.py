"""The HTML report of a run: one self-contained file (``RUN/report/index.html``) that shows what
every stage stored, readable offline in any browser (``docs/report.md`` explains how to read it).

    path = i2x.report.write_report("runs/fmnist")          # or: i2x report runs/fmnist

Everything is read through the run store and each stage's own loader (``RunStore``,
``load_analysis``, ``load_targets``, ``load_results``); nothing is recomputed that a stage stored.
The numbers behind the figures come from small functions in :mod:`i2x.report.numbers`, so
they can be checked on their own; the sections are :mod:`i2x.report.sections`. A stage that has
not run gives its section a one-line note; pictures of the data need the dataset, loaded by the
name the run recorded (or given), and when it cannot be loaded those panels say why in one line
while the rest renders. A corrupt run raises
:class:`i2x.RunStoreError` naming the file.

The HTML has inline CSS, every image is a PNG data URI, there is no JavaScript and nothing points
outside the file. Every string that comes from the run (class names, paths, reasons) is escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from i2x._internal.progress import bar
from i2x.report import sections
from i2x.report.loading import load_run
from i2x.report.sections import SECTIONS
from i2x.store import RunStore, atomic_write_bytes, open_run

__all__ = ["Report", "write_report", "render_report"]


def render_report(run, *, dataset=None, experiment: str = "experiment", progress: bool = False,
                  data_root=None) -> Report:
    """Build the report of ``run`` (a folder or a ``RunStore``) in memory; see :func:`write_report`."""
    store = open_run(run)
    label = str(store.path if isinstance(run, RunStore) else run)
    r = load_run(store, label, dataset, data_root, experiment)
    parts = [sections.contents(r)]
    for sid, title in bar(SECTIONS, desc="report", unit="section", enabled=progress):
        r.section = sid
        body = sections.BUILDERS[sid](r)
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
.proto h4 {{ margin: .2em 0 .3em; }}
table.card {{ margin: 0 0 .3em; }} table.card th {{ width: 9em; font-weight: normal; color: #555; }}
nav.toc {{ border: 1px solid #e3e3e8; border-radius: 6px; padding: .5em 1em; }}
nav.toc ol {{ margin: .3em 0 0; padding-left: 1.4em; }}
details {{ margin: .6em 0; }} summary {{ cursor: pointer; color: #0645ad; }}
.headline {{ font-size: 1.05em; }}
.note {{ color: #8a5a00; background: #fff7e6; border-left: 4px solid #f0b000; padding: .3em .6em; }}
code {{ background: #f2f2f2; padding: 0 .2em; border-radius: 3px; }}
.muted {{ color: #666; font-size: 12px; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"""
