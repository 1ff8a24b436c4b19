"""Flax models: ResNet backbones, MLP heads, and the `Encoder` that combines them.

Typical use:
  encoder = build_encoder(config.model)
  variables = encoder.init(key, images, train=False)        # params + batch_stats
  out, updates = encoder.apply(variables, images, train=True, mutable=["batch_stats"])
  out["features"], out["projection"], out.get("prediction")
"""
from jaxcontrast import _extras

_extras.require("jaxcontrast.models")

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxcontrast.models.config import (build_encoder, default_model_config,
                                       encoder_feature_dim, resolve_model_config)
from jaxcontrast.models.conv import Conv, conv_xla
from jaxcontrast.models.encoder import Encoder
from jaxcontrast.models.heads import MLPHead
from jaxcontrast.models.norm import GroupedBatchNorm, make_norm
from jaxcontrast.models.resnet import BasicBlock, Bottleneck, ResNet, build_resnet, feature_dim

__all__ = [
    "BasicBlock", "Bottleneck", "Conv", "Encoder", "GroupedBatchNorm", "MLPHead", "ResNet",
    "build_encoder", "build_resnet", "conv_xla", "default_model_config",
    "encoder_feature_dim", "feature_dim", "make_norm", "resolve_model_config",
]
