"""2-D convolution (NHWC, HWIO kernels) with torchvision's symmetric padding and init.

`Conv` is `flax.linen.Conv` with torchvision's defaults: padding `k // 2` on every side (as
`torch.nn.Conv2d(padding=k // 2)`; `"SAME"` would pad stride-2 convolutions asymmetrically), no
bias (a norm layer follows in ResNets), and torchvision's ResNet kernel init. Its parameters are
flax's: {"kernel": (kh, kw, C_in, C_out)} (+ "bias": (C_out,) with use_bias).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e.
# N(0, 2 / (kh * kw * C_out)), not truncated.
default_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Padding = Sequence[tuple[int, int]]


def conv_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
             ) -> jax.Array:
  """Plain XLA convolution, NHWC input, HWIO kernel (the op `Conv` runs)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=tuple(padding),
      dimension_numbers=_DIMENSION_NUMBERS)


def Conv(features: int, kernel_size: Sequence[int], strides: Sequence[int] = (1, 1),  # pylint: disable=invalid-name
         padding: Padding | None = None, *, use_bias: bool = False,
         kernel_init: Any = default_conv_init, **kwargs: Any) -> nn.Conv:
  """`nn.Conv(features, kernel_size, strides, ...)` with torchvision's defaults.

  Args:
    features: output channels.
    kernel_size: `(kh, kw)`.
    strides: `(sh, sw)`.
    padding: explicit `((top, bottom), (left, right))`; None means `k // 2` on every side.
    use_bias: add a bias (False: in ResNets a norm layer follows).
    kernel_init: kernel initialiser, torchvision's by default.
    **kwargs: other `nn.Conv` attributes (dtype, param_dtype, bias_init, name, ...).
  """
  if padding is None:
    padding = tuple((k // 2, k // 2) for k in kernel_size)
  return nn.Conv(features, tuple(kernel_size), tuple(strides), padding=padding,
                 use_bias=use_bias, kernel_init=kernel_init, **kwargs)
