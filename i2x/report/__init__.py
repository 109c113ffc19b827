"""The HTML report of a run (``docs/report.md``): one self-contained page of what every stage stored.

    numbers.py   the numbers behind the figures (small functions, checked on their own)
    figures.py   PNG figures (matplotlib, Agg) and image tiles
    loading.py   what the report reads from a run, loaded once
    sections.py  the six sections, one function each
    html.py      the page: :func:`render_report`, :func:`write_report`
"""

from i2x.report.html import Report, render_report, write_report
from i2x.report.numbers import (
                                confusion_matrices,
                                exemplar_patches,
                                exemplar_patches_at,
                                image_size,
                                patch_box,
                                probe_accuracy,
                                prototype_presence,
)
from i2x.report.sections import SECTIONS

__all__ = ["SECTIONS", "Report", "write_report", "render_report", "confusion_matrices", "probe_accuracy",
           "prototype_presence", "patch_box", "exemplar_patches", "exemplar_patches_at", "image_size"]
