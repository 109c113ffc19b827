"""i2x: structured explanations of image classifiers (the I2X method), on batched native kernels."""

from ._loader import build_info
from . import ops, reference

__all__ = ["build_info", "ops", "reference"]
__version__ = "0.1.0"
