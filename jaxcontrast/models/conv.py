"""2-D convolution (NHWC, HWIO kernels) with two interchangeable implementations.

- `"xla"`: `lax.conv_general_dilated`, exactly what `flax.linen.Conv` runs.
- `"matmul"`: im2col + one matrix product. `lax.conv_general_dilated_patches` gathers every
  `kh x kw x C` window into a feature vector, and an einsum with the reshaped kernel finishes the
  convolution; the weight gradient is a matmul too. Meant for CPUs where XLA's convolution
  weight gradient is slow. Measure before choosing it (`python -m jaxcontrast.bench
  --conv_impl matmul`): with jax 0.10.2 on 2 CPU cores, "xla" runs the MoCo v2 step of a
  ResNet-18 (32 px, batch 256) at 16.8 images/s, "matmul" at 12.6.

Both paths read the same parameter (`kernel`, shape `(kh, kw, C_in, C_out)`, plus `bias` when
`use_bias`), so a parameter tree trained with one runs with the other.
"""
from __future__ import annotations

import functools
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


def _patches(x: jax.Array, kh: int, kw: int, strides: Sequence[int], padding: Padding
             ) -> jax.Array:
  """`(B, H', W', C * kh * kw)` windows, feature axis ordered `(C, kh, kw)` (channel slowest).

  The extraction only copies values; it runs at HIGHEST precision so that accelerators that
  would round float32 convolutions to bfloat16 passes copy them exactly.
  """
  return lax.conv_general_dilated_patches(
      x, filter_shape=(kh, kw), window_strides=tuple(strides), padding=tuple(padding),
      dimension_numbers=_DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST)


def _flat_kernel(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> `(C * kh * kw, O)` in the patches' `(C, kh, kw)` feature order."""
  kh, kw, cin, cout = kernel.shape
  return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_patches_matmul(x, kernel, strides, padding):
  kh, kw = kernel.shape[:2]
  return jnp.einsum("bhwk,ko->bhwo", _patches(x, kh, kw, strides, padding),
                    _flat_kernel(kernel))


def _conv_patches_matmul_fwd(x, kernel, strides, padding):
  kh, kw = kernel.shape[:2]
  patches = _patches(x, kh, kw, strides, padding)
  y = jnp.einsum("bhwk,ko->bhwo", patches, _flat_kernel(kernel))
  return y, (x, kernel, patches)


def _conv_patches_matmul_bwd(strides, padding, residuals, dy):
  x, kernel, patches = residuals
  kh, kw, cin, cout = kernel.shape
  # Weight gradient: one matmul, dW[(c, u, v), o] = sum_{b, i, j} patches[b, i, j, (c, u, v)]
  # * dy[b, i, j, o], reshaped back to HWIO.
  dw = jnp.einsum("bhwk,bhwo->ko", patches, dy).reshape(cin, kh, kw, cout)
  dw = jnp.transpose(dw, (1, 2, 0, 3)).astype(kernel.dtype)
  # Input gradient: XLA's transposed convolution. Autodiff through the patch extraction would
  # transpose a grouped identity convolution, which is 5-10x slower than this on CPU.
  _, conv_vjp = jax.vjp(lambda x: conv_xla(x, kernel, strides, padding), x)
  (dx,) = conv_vjp(dy)
  return dx, dw


_conv_patches_matmul.defvjp(_conv_patches_matmul_fwd, _conv_patches_matmul_bwd)


def conv_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
                ) -> jax.Array:
  """Convolution as patches + matmul; same result as `conv_xla` up to float rounding.

  `conv_general_dilated_patches` returns `(B, H', W', C * kh * kw)` with the feature axis
  ordered `(C, kh, kw)` (input channel slowest), so the HWIO kernel is transposed to
  `(C, kh, kw, O)` before flattening:
    y[b, i, j, o] = sum_{c, u, v} patches[b, i, j, (c, u, v)] * kernel[u, v, c, o].
  The weight gradient is the matmul `patches^T dy` (that is the point of this path); the input
  gradient uses XLA's transposed convolution (custom VJP). A 1x1 kernel with no padding needs no
  patches: subsample the input by the stride and multiply (plain autodiff).
  """
  kh, kw, cin, _ = kernel.shape
  if x.shape[-1] != cin:
    raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {cin}")
  sh, sw = strides
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  if (kh, kw) == (1, 1) and all(p == (0, 0) for p in padding):
    return jnp.einsum("bhwc,co->bhwo", x[:, ::sh, ::sw, :], kernel[0, 0])
  return _conv_patches_matmul(x, kernel, (int(sh), int(sw)), padding)


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
