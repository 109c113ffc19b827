"""Every way to build or load a model: i2x's own small-image ResNet and ResNet-50 by name
(:mod:`i2x.models.architectures`), torchvision models, ``module:factory`` and architectures sized
to fit a weights file (:mod:`i2x.models.loading`)."""

from i2x.models.architectures import (
                                      DEFAULT_WIDTHS,
                                      MODEL_NAMES,
                                      BasicBlock,
                                      SmallResNet,
                                      build_model,
                                      default_layer,
                                      rebuild_model,
)
from i2x.models.loading import (
                                      build_arch,
                                      first_conv_channels,
                                      input_channels,
                                      load_model,
)

__all__ = ["BasicBlock", "MODEL_NAMES", "DEFAULT_WIDTHS", "SmallResNet", "build_model", "default_layer",
           "rebuild_model", "load_model", "build_arch", "first_conv_channels", "input_channels"]
