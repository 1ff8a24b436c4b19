"""Model config (ml_collections) -> `Encoder`, with validation.

Every key, its meaning and its allowed values are in `default_model_config()`. `build_encoder`
rejects unknown keys and invalid values with a `ValueError` that names the key, so a typo in a
config file fails at start-up rather than silently training the default model.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxcontrast.config_check import fail as _check_fail, is_int as _is_int, merge_known
from jaxcontrast.models.encoder import Encoder
from jaxcontrast.models.heads import MLPHead
from jaxcontrast.models.norm import BN_GROUPINGS, NORMS
from jaxcontrast.models.resnet import ARCHS, STEMS, build_resnet, feature_dim

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_model_config() -> ml_collections.ConfigDict:
  """MoCo v2 ImageNet model (ResNet-50, projector 2048-2048-128, no BN, no predictor)."""
  c = ml_collections.ConfigDict()
  c.arch = "resnet50"   # "resnet6" (:tiny) | "resnet10" | "resnet18" | "resnet34" | "resnet50"
  c.stem = "imagenet"            # "imagenet" (7x7/2 conv + max-pool) | "cifar" (3x3/1, no pool)
  #                                | "cifar_s2" (3x3/2, no pool: 4x fewer activations)
  c.width = 1.0                  # channel multiplier (> 0); 0.25 gives a tiny model
  c.norm = "batch"               # "batch" | "group" (GroupNorm, 32 groups or fewer)
  c.bn_groups = 1                # G: BN statistics per group of the batch; 1 = whole batch
  c.bn_grouping = "strided"      # "strided" (group s = s, s+G, ...; MoCo SplitBN) | "contiguous"
  c.dtype = "float32"            # compute dtype: "float32" | "bfloat16"; params stay float32
  c.zero_init_residual = False   # last norm scale of each block starts at 0 (torchvision option)
  c.proj_hidden_dims = (2048,)   # projector hidden widths; input is the backbone features (F)
  c.proj_dim = 128               # projector output width P
  c.proj_bn = False              # BN after each projector hidden layer (SCE: True)
  c.proj_last_bn = False         # affine-free BN on the projector output (SCE: True)
  c.pred_hidden_dims = ()        # predictor hidden widths (SCE: (4096,))
  c.pred_dim = 0                 # predictor output width; 0 = no predictor (SCE: 256)
  c.pred_bn = True               # BN after each predictor hidden layer (SCE/BYOL style)
  return c


def _fail(key: str, value: Any, allowed: str) -> None:
  _check_fail("model", key, value, allowed)


def _check_dims(key: str, value: Any) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(_is_int(d) and d > 0 for d in value):
    _fail(key, value, "a tuple of positive ints")
  return tuple(value)


def resolve_model_config(model_config: Any) -> ml_collections.ConfigDict:
  """Defaults overridden by `model_config` (a ConfigDict or dict), validated."""
  cfg = merge_known(default_model_config(), model_config, "model")
  validate_model_config(cfg)
  return cfg


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid value (unknown keys: `resolve_model_config`)."""
  choices = {"arch": tuple(ARCHS), "stem": STEMS, "norm": NORMS, "bn_grouping": BN_GROUPINGS,
             "dtype": tuple(DTYPES)}
  for key, allowed in choices.items():
    if cfg.get(key) not in allowed:
      _fail(key, cfg.get(key), f"one of {allowed}")
  if isinstance(cfg.width, bool) or not isinstance(cfg.width, (int, float)) or cfg.width <= 0:
    _fail("width", cfg.width, "a number > 0")
  if not _is_int(cfg.bn_groups) or cfg.bn_groups < 1:
    _fail("bn_groups", cfg.bn_groups, "an int >= 1")
  if not _is_int(cfg.proj_dim) or cfg.proj_dim < 1:
    _fail("proj_dim", cfg.proj_dim, "an int >= 1")
  if not _is_int(cfg.pred_dim) or cfg.pred_dim < 0:
    _fail("pred_dim", cfg.pred_dim, "an int >= 0 (0 = no predictor)")
  for key in ("zero_init_residual", "proj_bn", "proj_last_bn", "pred_bn"):
    if not isinstance(cfg[key], bool):
      _fail(key, cfg[key], "a bool")
  _check_dims("proj_hidden_dims", cfg.proj_hidden_dims)
  _check_dims("pred_hidden_dims", cfg.pred_hidden_dims)


def build_encoder(model_config: ml_collections.ConfigDict, *, bn_views: int = 1) -> Encoder:
  """Encoder (backbone + projector [+ predictor]) described by `model_config`.

  Missing keys take `default_model_config()`'s values; unknown keys and invalid values raise
  ValueError. The number of input channels is inferred from the data at `init`. bn_views: the
  encoder takes `bn_views` batches interleaved and its BatchNorms treat them as separate calls
  (`norm.GroupedBatchNorm.views`); same variables for any value.
  """
  cfg = resolve_model_config(model_config)
  dtype = DTYPES[cfg.dtype]
  bn = dict(bn_groups=cfg.bn_groups, bn_grouping=cfg.bn_grouping, bn_views=bn_views)
  backbone = build_resnet(cfg.arch, stem=cfg.stem, width=float(cfg.width), norm=cfg.norm,
                          dtype=dtype, zero_init_residual=cfg.zero_init_residual, **bn)
  projector = MLPHead(hidden_dims=tuple(cfg.proj_hidden_dims), out_dim=cfg.proj_dim,
                      use_bn=cfg.proj_bn, last_bn=cfg.proj_last_bn, dtype=dtype, **bn)
  predictor = None
  if cfg.pred_dim > 0:
    predictor = MLPHead(hidden_dims=tuple(cfg.pred_hidden_dims), out_dim=cfg.pred_dim,
                        use_bn=cfg.pred_bn, last_bn=False, dtype=dtype, **bn)
  return Encoder(backbone=backbone, projector=projector, predictor=predictor)


def encoder_feature_dim(model_config: ml_collections.ConfigDict) -> int:
  """F, the backbone output width the config implies (512 * width or 2048 * width)."""
  cfg = resolve_model_config(model_config)
  return feature_dim(cfg.arch, float(cfg.width))
