"""``i2x report RUN``: the run's HTML report, one self-contained file (``i2x.report``)."""

from __future__ import annotations

from pathlib import Path

from i2x.cli.common import COMMON, emit


def register(sub) -> None:
    p = sub.add_parser(
        "report", parents=[COMMON], help="write the run's HTML report (RUN/report/index.html)",
        description="Write one self-contained HTML file (inline images, no JavaScript, readable offline) showing "
                    "what every stage of the run stored: prototypes, training, uncertain prototypes, curation and "
                    "the experiment. Stages not run yet get a one-line note. Images of the data need the run's "
                    "dataset, loaded by the name the run recorded.")
    p.add_argument("run", type=Path, help="the run folder")
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset folder in torchvision's layout (default: i2x's usual places)")
    p.add_argument("--out", type=Path, default=None, help="where to write the HTML (default RUN/report/index.html)")
    p.add_argument("--experiment", default="experiment",
                   help="the experiment's folder in the run (i2x experiment --name; default experiment)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from i2x.report import render_report

    report = render_report(args.run, experiment=args.experiment, data_root=args.data_root,
                           progress=not (args.quiet or args.json))
    path = report.write(args.out)
    size = path.stat().st_size
    notes = {sid: n for sid, n in report.notes.items() if n}
    lines = [f"i2x report: {path} ({size / 1e6:.2f} MB)"] + [f"  {sid}: {n}" for sid, ns in notes.items() for n in ns]
    emit(args, {"report": str(path), "bytes": size, "sections": report.sections, "notes": notes}, "\n".join(lines))
    return 0
