"""Explaining one model: :class:`Explainer` (GradCAM and its family, on the compiled ops), the
faithfulness metrics and the wrong-reason metric (:mod:`i2x.explain.metrics`)."""

from i2x.explain.explainer import Captured, Explainer, swin_reshape, vit_reshape
from i2x.explain.metrics import WrongReasonShare, relevance_mass, wrong_reason_share

__all__ = ["Explainer", "Captured", "vit_reshape", "swin_reshape", "relevance_mass", "wrong_reason_share",
           "WrongReasonShare"]
