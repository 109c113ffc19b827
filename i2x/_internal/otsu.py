"""Otsu's split of 1-D scores and how clean it is: the analysis' model-wide shortcut reading and
the loop's target rule both cut their scores this way."""

from __future__ import annotations

import torch


def otsu_threshold(scores: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of 1-D scores: the cut that maximises the between-class variance of the
    two sides (a histogram of ``bins`` bins over the scores' range). Constant scores -> their value."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("otsu_threshold: no scores")
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return hi
    hist = torch.histc(s, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0)
    mu0 = m0 / w0.clamp(min=1)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(between[:-1].argmax())
    return lo + (k + 1) * (hi - lo) / bins  # the upper edge of the last bin kept below the cut


def separability(scores: torch.Tensor, threshold: float) -> float:
    """Otsu's effectiveness of a split: the between-class variance of the two sides over the total
    variance, in [0, 1]. About 0.64 for normal scores and 0.75 for uniform ones (no natural group);
    near 1 when the scores fall into two tight groups (a cue some samples carry and others lack)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    total = float(s.var(unbiased=False)) if s.numel() > 1 else 0.0
    hi = s > threshold
    if total == 0.0 or bool(hi.all()) or not bool(hi.any()):
        return 0.0
    w1 = float(hi.double().mean())
    gap = float(s[hi].mean() - s[~hi].mean())
    return w1 * (1 - w1) * gap * gap / total
