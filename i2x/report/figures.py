"""The pictures of the HTML report (:mod:`i2x.report`), each returned as PNG bytes.

Charts are drawn on a private ``matplotlib.figure.Figure`` with its own Agg canvas: no pyplot, no
global backend switch, nothing shared between threads or with a user's own plots. Image tiles
(exemplar patches, CAM overlays, before/after pictures) are encoded straight from their pixels
with Pillow, at their own resolution times a small integer factor, so a tile costs a few hundred
bytes instead of a matplotlib figure's tens of kilobytes.

Every PNG is reduced to a 256-colour palette and optimised: a report of a large run (2,000 probe
images, 10 classes, 12 checkpoints, 32 prototypes) stays well under 5 MB.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DPI", "data_uri", "rgb_png", "label", "to_rgb", "upscale", "jet",
    "overlay", "outline", "strip",
    "accuracy_chart", "confusion_grid", "confusion_chart", "beta_panels", "separation_chart",
    "presence_heatmap", "d_curves", "experiment_chart",
]

DPI = 96
_FONT = 8
# Colour-blind-safe cycle for lines of several series (Okabe-Ito).
_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


# ----------------------------------------------------------------------------------------------
# Encoding


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def rgb_png(rgb: np.ndarray) -> bytes:
    """``[H, W, 3]`` uint8 -> PNG bytes (palette of at most 256 colours, optimised)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    # Tiles of a grey image have few colours, charts a few hundred: a palette loses nothing visible.
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure_png(fig) -> bytes:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgb_png(rgba[..., :3])


def label(text, limit: int = 16) -> str:
    """A string from the run made safe for a matplotlib label: ``$`` would start mathtext (a class
    named ``$x`` must not be typeset or fail to parse), and long names are cut."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _small(ax) -> None:
    ax.tick_params(labelsize=_FONT - 1, length=2, pad=1)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def _step_axis(ax, steps: Sequence[int], rotate: bool = True) -> None:
    """Checkpoints on an even axis labelled by step: the log-spaced schedule would crowd the
    early steps on a linear axis and cannot show step 0 on a log one."""
    idx = np.arange(len(steps))
    every = max(1, math.ceil(len(steps) / 12))
    ax.set_xticks(idx[::every], [str(s) for s in steps][::every], rotation=45 if rotate else 0)
    ax.set_xlabel("checkpoint (training step)", fontsize=_FONT)


# ----------------------------------------------------------------------------------------------
# Image tiles (numpy, [H, W, 3] uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` pixels in [0, 1] (1 or 3 channels) -> ``[H, W, 3]`` uint8."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] != 3:
        image = np.repeat(image.mean(axis=0, keepdims=True), 3, axis=0)  # any other channel count: grey
    return (np.transpose(image, (1, 2, 0)) * 255.0 + 0.5).astype(np.uint8)


def upscale(rgb: np.ndarray, min_side: int = 72) -> np.ndarray:
    """Nearest-neighbour enlargement by the smallest integer factor that makes the shorter side at
    least ``min_side`` px: the pixels stay visible as pixels, and PNG compresses the repeats."""
    factor = max(1, math.ceil(min_side / max(1, min(rgb.shape[:2]))))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def jet(t: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [0, 1] -> ``[H, W, 3]`` in [0, 1]: the classic jet colour map (blue, cyan,
    yellow, red), as three clipped ramps: no colour-map lookup table needed."""
    t = np.clip(np.asarray(t, dtype=np.float32), 0.0, 1.0)
    return np.clip(np.stack([1.5 - np.abs(4 * t - 3), 1.5 - np.abs(4 * t - 2), 1.5 - np.abs(4 * t - 1)], -1), 0, 1)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A heatmap ``[H, W]`` in [0, 1] blended over ``rgb [H, W, 3]`` uint8 in :func:`jet`."""
    colour = jet(heat) * 255.0
    return (rgb.astype(np.float32) * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)


def outline(rgb: np.ndarray, mask: np.ndarray, colour=(255, 255, 255), width: int = 2) -> np.ndarray:
    """Draw the inner border of ``mask [H, W]`` (same size as ``rgb``), ``width`` px thick, in ``colour``."""
    m = np.asarray(mask, dtype=bool)
    interior = m
    for _ in range(width):  # erode by one pixel (4-neighbourhood; outside the image counts as outside)
        p = np.pad(interior, 1, mode="constant", constant_values=False)
        interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    out = rgb.copy()
    out[m & ~interior] = colour
    return out


def strip(tiles: Sequence[np.ndarray], height: int = 48, gap: int = 3) -> np.ndarray:
    """Tiles side by side on white, each resized (nearest) to ``height`` px high, aspect kept."""
    resized = []
    for t in tiles:
        h, w = t.shape[:2]
        new_w = max(1, round(w * height / h))
        rows = np.minimum((np.arange(height) * h) // height, h - 1)
        cols = np.minimum((np.arange(new_w) * w) // new_w, w - 1)
        resized.append(t[rows][:, cols])
    width = sum(t.shape[1] for t in resized) + gap * max(0, len(resized) - 1)
    out = np.full((height, max(1, width), 3), 255, dtype=np.uint8)
    x = 0
    for t in resized:
        out[:, x:x + t.shape[1]] = t
        x += t.shape[1] + gap
    return out


# ----------------------------------------------------------------------------------------------
# Charts


def accuracy_chart(steps: Sequence[int], accuracy: Sequence[float]) -> bytes:
    fig = _figure(4.2, 2.2)
    ax = fig.add_subplot()
    ax.plot(np.arange(len(steps)), 100 * np.asarray(accuracy), marker="o", ms=3, color=_COLOURS[0])
    ax.set_ylabel("probe accuracy (%)", fontsize=_FONT)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    _step_axis(ax, steps)
    _small(ax)
    return _figure_png(fig)


def confusion_grid(steps: Sequence[int], confusion: np.ndarray) -> bytes:
    """One small panel per checkpoint, rows normalised (each true class sums to 1), no numbers:
    how the errors move over training. ``confusion [T, M, M]`` counts."""
    t = confusion.shape[0]
    cols = min(t, 6)
    rows = math.ceil(t / cols)
    fig = _figure(1.25 * cols + 0.5, 1.35 * rows + 0.1)
    axes = fig.subplots(rows, cols, squeeze=False)
    norm = confusion / np.maximum(confusion.sum(axis=2, keepdims=True), 1)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= t:
            ax.set_axis_off()
            continue
        image = ax.imshow(norm[i], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"step {steps[i]}", fontsize=_FONT)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8, fraction=0.05)
        bar.ax.tick_params(labelsize=_FONT - 1)
        bar.set_label("share of the true class", fontsize=_FONT - 1)
    return _figure_png(fig)


def confusion_chart(confusion: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """One confusion matrix with its counts written in (rows: true class, columns: predicted)."""
    m = confusion.shape[0]
    side = min(6.0, 1.6 + 0.32 * m)
    fig = _figure(side + 0.6, side)
    ax = fig.add_subplot()
    norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if m <= 20:
        for a in range(m):
            for b in range(m):
                if confusion[a, b]:
                    ax.text(b, a, str(int(confusion[a, b])), ha="center", va="center", fontsize=_FONT - 1,
                            color="white" if norm[a, b] > 0.5 else "black")
    names = [label(c, 12) for c in classes]
    every = max(1, math.ceil(m / 20))
    ax.set_xticks(range(0, m, every), names[::every], rotation=60, ha="right")
    ax.set_yticks(range(0, m, every), names[::every])
    ax.set_xlabel("predicted", fontsize=_FONT)
    ax.set_ylabel("true", fontsize=_FONT)
    ax.set_title(label(title, 60), fontsize=_FONT + 1)
    _small(ax)
    return _figure_png(fig)


def beta_panels(transitions: Sequence[Sequence[int]], beta: np.ndarray, classes: Sequence[str]) -> bytes:
    """``beta [T-1, K, M]``: one prototype x class heatmap per transition, one symmetric colour
    scale for all (red: a rise of the prototype raised the class's confidence; blue: lowered it)."""
    t, k, m = beta.shape
    cols = min(t, 6)
    rows = math.ceil(t / cols)
    panel_h = min(2.4, 0.5 + 0.045 * k)
    fig = _figure(1.15 * cols + 0.7, panel_h * rows + 0.2)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = float(np.abs(beta).max()) or 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= t:
            ax.set_axis_off()
            continue
        image = ax.imshow(beta[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        a, b = transitions[i]
        ax.set_title(f"{a}\u2192{b}", fontsize=_FONT - 1)
        ax.set_xticks([])
        ax.set_yticks([0, k - 1] if i % cols == 0 else [])
        _small(ax)
    axes[0, 0].set_ylabel("prototype", fontsize=_FONT - 1)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8, fraction=0.05)
        bar.ax.tick_params(labelsize=_FONT - 1)
        bar.set_label("beta (columns: classes 0..M-1)", fontsize=_FONT - 1)
    return _figure_png(fig)


def separation_chart(steps: Sequence[int], series: Sequence[tuple[str, Sequence[float]]], threshold: float) -> bytes:
    """Pair error rates ``e^t(a, b)`` over the checkpoints, with the separation threshold."""
    fig = _figure(4.8, 2.4)
    ax = fig.add_subplot()
    x = np.arange(len(steps))
    for i, (name, errors) in enumerate(series):
        ax.plot(x, errors, marker="o", ms=2.5, lw=1.2, color=_COLOURS[i % len(_COLOURS)], label=label(name, 28))
    ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    ax.text(x[-1], threshold, "separated below", fontsize=_FONT - 1, color="grey", ha="right", va="bottom")
    ax.set_ylabel("pair error rate", fontsize=_FONT)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _step_axis(ax, steps)
    _small(ax)
    if series:
        ax.legend(fontsize=_FONT - 1, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _figure_png(fig)


def presence_heatmap(presence: np.ndarray, classes: Sequence[str]) -> bytes:
    """``presence [M, K]``: the share of each class's probe images that show each prototype."""
    m, k = presence.shape
    fig = _figure(min(9.0, 1.4 + 0.22 * k), 0.9 + 0.2 * m)
    ax = fig.add_subplot()
    image = ax.imshow(presence, cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    every = max(1, math.ceil(k / 32))
    ax.set_xticks(range(0, k, every))
    names = [label(c, 14) for c in classes]
    every_m = max(1, math.ceil(m / 20))
    ax.set_yticks(range(0, m, every_m), names[::every_m])
    ax.set_xlabel("prototype", fontsize=_FONT)
    _small(ax)
    bar = fig.colorbar(image, ax=ax, fraction=0.04)
    bar.ax.tick_params(labelsize=_FONT - 1)
    bar.set_label("presence", fontsize=_FONT - 1)
    return _figure_png(fig)


def d_curves(
    transitions: Sequence[Sequence[int]], d: np.ndarray, highlight: dict[int, str], pair: tuple[str, str]
) -> bytes:
    """``d [T-1, K]`` = beta[k, a] - beta[k, b] per transition: every prototype faint, the
    ``highlight`` ones (id -> legend text) in colour. Above 0 a rise pushed towards a."""
    fig = _figure(4.8, 2.3)
    ax = fig.add_subplot()
    x = np.arange(d.shape[0])
    for k in range(d.shape[1]):
        if k not in highlight:
            ax.plot(x, d[:, k], color="#bbbbbb", lw=0.6)
    for i, (k, text) in enumerate(highlight.items()):
        ax.plot(x, d[:, k], color=_COLOURS[i % len(_COLOURS)], lw=1.6, marker="o", ms=2.5, label=label(text, 30))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(f"d = beta[{label(pair[0], 10)}] - beta[{label(pair[1], 10)}]", fontsize=_FONT)
    ax.set_xticks(x, [f"{a}\u2192{b}" for a, b in transitions], rotation=45)
    ax.set_xlabel("transition between checkpoints (steps)", fontsize=_FONT)
    ax.grid(alpha=0.3)
    _small(ax)
    if highlight:
        ax.legend(fontsize=_FONT - 1, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _figure_png(fig)


def experiment_chart(arms: Sequence[str], confusions: Sequence[Sequence[float]],
                     intervals: Sequence[tuple[float, float | None, float | None]], accuracy: Sequence[Sequence[float]],
                     pair: tuple[str, str]) -> bytes:
    """Per arm: the pair's confusions of every seed (dots) with the mean and its 95% t-interval
    (bar), and the test accuracy of every seed beside it."""
    n = len(arms)
    fig = _figure(6.4, 0.9 + 0.28 * n)
    ax, ax_acc = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    y = np.arange(n)
    for i in range(n):
        mean, lo, hi = intervals[i]
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [i, i], color=_COLOURS[0], lw=2.5, alpha=0.5, solid_capstyle="butt")
        ax.plot([mean], [i], marker="|", ms=12, mew=2, color=_COLOURS[0])
        ax.scatter(confusions[i], np.full(len(confusions[i]), i), s=12, color="black", zorder=3)
        ax_acc.scatter(100 * np.asarray(accuracy[i]), np.full(len(accuracy[i]), i), s=12, color=_COLOURS[2], zorder=3)
    ax.set_yticks(y, [label(a, 28) for a in arms])
    ax.invert_yaxis()
    ax.set_xlabel(f"pair confusions ({label(pair[0], 10)} \u2194 {label(pair[1], 10)})", fontsize=_FONT)
    ax_acc.set_xlabel("test accuracy (%)", fontsize=_FONT)
    for a in (ax, ax_acc):
        a.grid(alpha=0.3, axis="x")
        _small(a)
    return _figure_png(fig)
