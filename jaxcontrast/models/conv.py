"""2-D convolution (NHWC, HWIO kernels) with two interchangeable implementations.

- `"xla"`: `lax.conv_general_dilated`, exactly what `flax.linen.Conv` runs.
- `"matmul"`: im2col + one matrix product. `lax.conv_general_dilated_patches` gathers every
  `kh x kw x C` window into a feature vector, and an einsum with the reshaped kernel finishes the
  convolution. On CPU, XLA's convolution *weight gradient* is several times slower than its
  forward pass, while the gradient of a matmul is two matmuls, so this path trains faster there.
  On GPU/TPU prefer `"xla"`.

Both paths read the same parameter (`kernel`, shape `(kh, kw, C_in, C_out)`, plus `bias` when
`use_bias`), so a parameter tree trained with one runs with the other.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("xla", "matmul")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e.
# N(0, 2 / (kh * kw * C_out)), not truncated.
default_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Padding = Sequence[tuple[int, int]]


def conv_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
             ) -> jax.Array:
  """Plain XLA convolution, NHWC input, HWIO kernel."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=tuple(padding),
      dimension_numbers=_DIMENSION_NUMBERS)


def conv_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
                ) -> jax.Array:
  """Convolution as patches + matmul; same result as `conv_xla` up to float rounding.

  `conv_general_dilated_patches` returns `(B, H', W', C * kh * kw)` with the feature axis
  ordered `(C, kh, kw)` (input channel slowest), so the HWIO kernel is transposed to
  `(C, kh, kw, O)` before flattening:
    y[b, i, j, o] = sum_{c, u, v} patches[b, i, j, (c, u, v)] * kernel[u, v, c, o].
  The patch extraction only copies values; it runs at HIGHEST precision so that accelerators
  that would round float32 convolutions to bfloat16 passes copy them exactly. A 1x1 kernel with
  no padding needs no patches: subsample the input by the stride and multiply.
  """
  kh, kw, cin, cout = kernel.shape
  if x.shape[-1] != cin:
    raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {cin}")
  sh, sw = strides
  if (kh, kw) == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
    return jnp.einsum("bhwc,co->bhwo", x[:, ::sh, ::sw, :], kernel[0, 0])
  patches = lax.conv_general_dilated_patches(
      x, filter_shape=(kh, kw), window_strides=(sh, sw), padding=tuple(padding),
      dimension_numbers=_DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST)
  w = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)
  return jnp.einsum("bhwk,ko->bhwo", patches, w)


class Conv(nn.Module):
  """2-D convolution with torchvision-style symmetric padding and a selectable implementation.

  Attributes:
    features: output channels.
    kernel_size: `(kh, kw)`.
    strides: `(sh, sw)`.
    padding: explicit `((top, bottom), (left, right))`; None means `k // 2` on every side, as
      torchvision pads (`"SAME"` would pad stride-2 convolutions asymmetrically).
    use_bias: add a bias (False in ResNets: a norm layer follows).
    impl: `"xla"` or `"matmul"` (see module docstring).
    dtype: computation dtype (None: promote input and kernel).
    param_dtype: parameter dtype (float32).
    kernel_init: kernel initialiser, torchvision's by default.
    bias_init: bias initialiser.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding | None = None
  use_bias: bool = False
  impl: str = "xla"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = default_conv_init
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.impl not in CONV_IMPLS:
      raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {self.impl!r}")
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC input, got shape {x.shape}")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = self.padding
    if padding is None:
      padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    conv = conv_xla if self.impl == "xla" else conv_matmul
    y = conv(x, kernel, self.strides, padding)
    if bias is not None:
      y = y + bias
    return y
