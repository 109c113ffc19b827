"""i2x: structured explanations of image classifiers (the I2X method), on batched native kernels."""

from ._loader import build_info
from . import ops, reference
from .cam import Captured, Explainer, swin_reshape, vit_reshape
from . import metrics

__all__ = ["build_info", "ops", "reference", "metrics", "Explainer", "Captured", "vit_reshape", "swin_reshape"]
__version__ = "0.1.0"
