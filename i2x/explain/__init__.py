"""Explaining one model: :class:`Explainer` (GradCAM and its family, on the compiled ops) and the
faithfulness metrics (:mod:`i2x.explain.metrics`)."""

from i2x.explain.explainer import Captured, Explainer, swin_reshape, vit_reshape

__all__ = ["Explainer", "Captured", "vit_reshape", "swin_reshape"]
