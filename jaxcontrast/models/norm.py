"""Normalisation layers: grouped ("ghost" / split) BatchNorm, and the norm-layer factory.

MoCo trained with per-GPU BatchNorm statistics; its CIFAR demo emulates 8 GPUs on one with
`SplitBatchNorm`, which normalises *strided* groups (group s = samples s, s+G, s+2G, ...; it
views `(B, C, H, W)` as `(B/G, G*C, H, W)`). Under `jax.jit` on a global array, one BatchNorm
over the whole batch is SyncBN. `GroupedBatchNorm` covers all three (METHODS.md section 0):

  groups G = 1                       ordinary BatchNorm over the batch (SyncBN when sharded)
  G > 1, grouping "strided"          MoCo SplitBatchNorm / ghost BN
  G > 1, grouping "contiguous"       group s = samples [s*B/G, (s+1)*B/G): per-device statistics
                                     when the batch is split over G devices in order.

Train mode, for each group g and channel c (reducing over the group's samples and all spatial
positions):
  mu_g = E[x],  var_g = E[(x - mu_g)^2]     (biased, float32, two passes like PyTorch)
  y = (x - mu_g) / sqrt(var_g + eps) * scale + bias
  running_mean <- m * running_mean + (1 - m) * mean_g(mu_g)
  running_var  <- m * running_var  + (1 - m) * mean_g(var_g)
with m = 0.9 (PyTorch's momentum 0.1). PyTorch updates the running variance with the unbiased
estimate (factor n / (n - 1)); flax and this layer use the biased one. Eval mode normalises with
the running statistics. Running statistics are not updated while initialising, as in flax.

Contiguous grouping reshapes `(B, ...) -> (G, B/G, ...)` and reduces over axis 1, so with the
batch split over G devices every statistic is a local reduction (no communication).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

BN_GROUPINGS = ("strided", "contiguous")
NORMS = ("batch", "group")
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
GN_MAX_GROUPS = 32


def _group_view(x: jax.Array, groups: int, grouping: str) -> tuple[jax.Array, int, int]:
  """Reshape `(B, ...)` into a view with a group axis and a within-group sample axis.

  Returns `(view, group_axis, sample_axis)`: strided -> `(B/G, G, ...)`, where sample i lands at
  `[i // G, i % G]`, i.e. in group i mod G; contiguous -> `(G, B/G, ...)`, sample i in group
  i // (B/G).
  """
  b = x.shape[0]
  if b % groups:
    raise ValueError(f"batch size {b} is not divisible by bn_groups={groups}")
  if grouping == "strided":
    return x.reshape((b // groups, groups) + x.shape[1:]), 1, 0
  if grouping == "contiguous":
    return x.reshape((groups, b // groups) + x.shape[1:]), 0, 1
  raise ValueError(f"bn_grouping must be one of {BN_GROUPINGS}, got {grouping!r}")


class GroupedBatchNorm(nn.Module):
  """BatchNorm over the last (channel) axis with per-group batch statistics.

  The variables have flax `nn.BatchNorm`'s names and shapes (params `scale`, `bias`;
  batch_stats `mean`, `var`), and with `groups=1` the layer computes what `nn.BatchNorm` does.

  Attributes:
    use_running_average: eval mode (normalise with the running statistics); may instead be
      passed to `__call__`.
    groups: G, number of groups the batch is split into (1 = whole batch).
    grouping: `"strided"` or `"contiguous"` (see module docstring).
    momentum: running-statistics decay m.
    epsilon: added to the variance.
    dtype: output dtype (None: promote input and parameters). Statistics are always float32.
    param_dtype: parameter dtype.
    use_bias, use_scale: learn the affine offset / scale (False for SCE's last projector BN).
    bias_init, scale_init: initialisers (scale zeros for zero-init residual branches).
  """
  use_running_average: bool | None = None
  groups: int = 1
  grouping: str = "strided"
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., Any] = nn.initializers.zeros
  scale_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    if self.groups < 1:
      raise ValueError(f"bn_groups must be >= 1, got {self.groups}")
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    args = [x]
    x32 = x.astype(jnp.float32)
    if use_ra:
      y = (x32 - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon)
    else:
      xg, group_axis, sample_axis = _group_view(x32, self.groups, self.grouping)
      axes = (sample_axis,) + tuple(range(2, xg.ndim - 1))
      mean = jnp.mean(xg, axes, keepdims=True)
      # Two passes, as PyTorch (not flax's E[x^2] - E[x]^2): when a channel barely varies over
      # the batch (pooled features of a young network, in the projector) the one-pass form
      # cancels catastrophically, its variance jumps in steps of E[x^2]'s ulp, and the gradients
      # of two float orderings of the same sums differed by ~2% (SCE, 1 vs 8 devices).
      centred = xg - mean
      var = jnp.mean(jnp.square(centred), axes, keepdims=True)
      y = (centred * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, group_axis).reshape(c)
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, group_axis).reshape(c)
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
      y = y * scale
      args.append(scale)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
      y = y + bias
      args.append(bias)
    return y.astype(nn.dtypes.canonicalize_dtype(*args, dtype=self.dtype))


def gn_num_groups(channels: int, max_groups: int = GN_MAX_GROUPS) -> int:
  """GroupNorm groups: 32, or the largest count dividing `channels` when 32 does not."""
  return math.gcd(channels, max_groups)


def make_norm(norm: str, *, train: bool, dtype: Any = jnp.float32, bn_groups: int = 1,
              bn_grouping: str = "strided") -> Callable[..., nn.Module]:
  """Returns `norm_layer(channels, *, name=None, scale_init=ones, use_scale=True, ...)`.

  The factory hides which normalisation a network uses: a ResNet block asks for a layer over
  `channels` channels and gets BatchNorm (grouped, train or eval mode) or GroupNorm.
  GroupNorm has no batch statistics, so `train` and the BN options do not affect it.
  """
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  if bn_grouping not in BN_GROUPINGS:
    raise ValueError(f"bn_grouping must be one of {BN_GROUPINGS}, got {bn_grouping!r}")
  if not isinstance(bn_groups, int) or bn_groups < 1:
    raise ValueError(f"bn_groups must be a positive int, got {bn_groups!r}")

  def norm_layer(channels: int, **kwargs) -> nn.Module:
    if norm == "batch":
      return GroupedBatchNorm(use_running_average=not train, groups=bn_groups,
                              grouping=bn_grouping, dtype=dtype, **kwargs)
    return nn.GroupNorm(num_groups=gn_num_groups(channels), epsilon=BN_EPSILON, dtype=dtype,
                        **kwargs)

  return norm_layer
