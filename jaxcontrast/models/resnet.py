"""ResNet-18/34/50 backbones (torchvision v1.5 layout) returning pooled features, and the
smaller ResNet-10 and 2-stage ResNet-6 of tests and smoke runs (`:tiny`).

Layout as torchvision: stem, four stages of basic (R18/34) or bottleneck (R50) blocks with
64/128/256/512 base channels (bottleneck output x4), stride 2 at the first block of stages
2-4 (in the 3x3 convolution of a bottleneck), a 1x1 convolution + norm shortcut where the shape
changes, global average pooling. No classifier: the output is `(B, F)` with F = 512 * width
(R18/34) or 2048 * width (R50). Variable names follow torchvision (`conv1`, `bn1`,
`layer2_0/downsample_conv`, ...) to ease porting weights.

Stems: `"imagenet"` = 7x7/2 convolution + 3x3/2 max-pool (padding 1); `"cifar"` = 3x3 stride-1
convolution, no max-pool (MoCo's CIFAR demo); `"cifar_s2"` = 3x3 stride-2 convolution, no
max-pool: a quarter of the CIFAR stem's activations in every stage (a 28x28 input gives 14x14
maps in the first stage), about 4x the images/s on a CPU, for small images on a small budget. Width multiplier w scales every channel count
(round(64 * w) etc., at least 1); input channels (1 or 3) are taken from the data at init.
Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcontrast.models.conv import Conv
from jaxcontrast.models.norm import make_norm

STEMS = ("imagenet", "cifar", "cifar_s2")


def scaled(channels: int, width: float) -> int:
  """Channel count under width multiplier `width`: round(channels * width), at least 1."""
  return max(1, int(round(channels * width)))


def stem_max_pool(x: jax.Array) -> jax.Array:
  """torchvision's MaxPool2d(3, stride=2, padding=1): -inf padding, one pixel on every side."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """3x3 -> 3x3 residual block (expansion 1)."""
  planes: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out_ch = self.planes * self.expansion
    y = self.conv(self.planes, (3, 3), (self.strides, self.strides), name="conv1")(x)
    y = nn.relu(self.norm(self.planes, name="bn1")(y))
    y = self.conv(out_ch, (3, 3), name="conv2")(y)
    y = self.norm(out_ch, name="bn2", scale_init=last_scale)(y)
    return nn.relu(y + _shortcut(self, x, out_ch))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) residual block, torchvision v1.5."""
  planes: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out_ch = self.planes * self.expansion
    y = self.conv(self.planes, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(self.planes, name="bn1")(y))
    y = self.conv(self.planes, (3, 3), (self.strides, self.strides), name="conv2")(y)
    y = nn.relu(self.norm(self.planes, name="bn2")(y))
    y = self.conv(out_ch, (1, 1), name="conv3")(y)
    y = self.norm(out_ch, name="bn3", scale_init=last_scale)(y)
    return nn.relu(y + _shortcut(self, x, out_ch))


def _shortcut(block: nn.Module, x: jax.Array, out_ch: int) -> jax.Array:
  """Identity, or 1x1 strided conv + norm when the stride or channel count changes."""
  if block.strides == 1 and x.shape[-1] == out_ch:
    return x
  s = (block.strides, block.strides)
  x = block.conv(out_ch, (1, 1), s, name="downsample_conv")(x)
  return block.norm(out_ch, name="downsample_bn")(x)


class ResNet(nn.Module):
  """ResNet backbone: NHWC images `(B, H, W, C)` -> pooled features `(B, F)`.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: `BasicBlock` or `Bottleneck`.
    stem: `"imagenet"` or `"cifar"`.
    width: channel multiplier.
    norm: `"batch"` or `"group"`.
    bn_groups, bn_grouping, bn_views: grouped BatchNorm options (see `norm.py`).
    dtype: compute dtype; parameters stay float32.
    zero_init_residual: init the last norm scale of every block to 0 (torchvision option).
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  stem: str = "imagenet"
  width: float = 1.0
  norm: str = "batch"
  bn_groups: int = 1
  bn_grouping: str = "strided"
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  bn_views: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.stem not in STEMS:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images, got shape {x.shape}")
    conv = _conv_factory(self.dtype)
    norm = make_norm(self.norm, train=train, dtype=self.dtype, bn_groups=self.bn_groups,
                     bn_grouping=self.bn_grouping, bn_views=self.bn_views)
    stem_ch = scaled(64, self.width)
    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      x = conv(stem_ch, (7, 7), (2, 2), name="conv1")(x)
      x = nn.relu(norm(stem_ch, name="bn1")(x))
      x = stem_max_pool(x)
    else:  # "cifar" (stride 1) or "cifar_s2" (stride 2); same parameters.
      s = 2 if self.stem == "cifar_s2" else 1
      x = conv(stem_ch, (3, 3), (s, s), name="conv1")(x)
      x = nn.relu(norm(stem_ch, name="bn1")(x))
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = scaled(64 * 2**i, self.width)
      for j in range(num_blocks):
        x = self.block_cls(planes=planes, strides=2 if (i > 0 and j == 0) else 1, conv=conv,
                           norm=norm, zero_init_residual=self.zero_init_residual,
                           name=f"layer{i + 1}_{j}")(x)
    return jnp.mean(x, axis=(1, 2))


def _conv_factory(dtype: Any) -> Callable[..., nn.Module]:
  """`conv(features, kernel_size, strides=(1, 1), *, name)` with the network's dtype."""
  def conv(features, kernel_size, strides=(1, 1), **kwargs):
    return Conv(features, kernel_size, strides, dtype=dtype, **kwargs)
  return conv


ARCHS = {
    # Two stages of one basic block (stem, 2 x 2 convolutions, counted as torchvision counts
    # ResNet-18's layers with the classifier): every kind of layer (stem, blocks, downsampling)
    # at about half ResNet-10's compile time; the `:tiny` configs (tests, smoke runs). Features
    # 128 x width. torchvision has no such model: `export` writes its weights with
    # torchvision's keys and names no constructor.
    "resnet6": ((1, 1), BasicBlock),
    # One basic block per stage, torchvision's 4-stage layout: compiles in about half the time
    # of ResNet-18 (the learning and export tests).
    "resnet10": ((1, 1, 1, 1), BasicBlock),
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
}


def build_resnet(arch: str, **kwargs) -> ResNet:
  """`ResNet` for an architecture name in `ARCHS`; kwargs are `ResNet` attributes."""
  if arch not in ARCHS:
    raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
  stage_sizes, block_cls = ARCHS[arch]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


def feature_dim(arch: str, width: float) -> int:
  """F, the backbone's output width: the last stage's channels, 64 * 2**(stages - 1) * width
  (x4 for bottlenecks)."""
  stage_sizes, block_cls = ARCHS[arch]
  return scaled(64 * 2 ** (len(stage_sizes) - 1), width) * block_cls.expansion
