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

The train-mode layer has a written-out gradient (`_train_backward`, one custom VJP). On CPU,
every sum over (samples, positions), in the statistics and in their gradients, runs in two
stages: each sample's positions, then the samples (`_sample_mean`, `_sum`), which XLA:CPU runs
faster than one reduction and which is closer to the float64 sum. GPU and TPU get plain sums (one
reduction, no barrier: XLA fuses them). The choice is made when the program is lowered for its
platform (`lax.platform_dependent`, in the forward and in the backward); both give the same
values up to rounding. docs/performance.md ("BatchNorm") has the measurements.

With `views=V` the batch holds V batches interleaved, normalised as V separate calls (the
symmetric step's two views in one forward: `train_step.online_forward`).

Contiguous grouping reshapes `(B, ...) -> (G, B/G, ...)` and reduces over axis 1, so with the
batch split over G devices every statistic is a local reduction (no communication).
"""
from __future__ import annotations

import functools
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


def _sample_mean(x: jax.Array, sample_axis: int) -> jax.Array:
  """Mean of `(..., positions, C)` over `sample_axis` and positions, keeping the axes.

  Two stages, each sample's positions and then the samples, rather than one reduction over
  both: XLA:CPU lowers the one-stage form to a slow reduce-window. See `_sum`.
  """
  return jnp.mean(jnp.mean(x, x.ndim - 2, keepdims=True), sample_axis, keepdims=True)


def _sum(t: jax.Array, axes: tuple[int, ...], two_stage: bool) -> jax.Array:
  """Sum over `axes`, kept. two_stage (CPU): the positions axis (-2) first, then the rest; the
  barrier keeps XLA from merging them back into one reduction, which XLA:CPU runs as a slow
  reduce-window. A barrier blocks fusion on GPU and TPU, hence CPU only."""
  if not two_stage:
    return jnp.sum(t, axes, keepdims=True)
  positions = t.ndim - 2
  t = lax.optimization_barrier(jnp.sum(t, positions, keepdims=True))
  return jnp.sum(t, tuple(a for a in axes if a != positions), keepdims=True)


def _train_forward(xg, scale, bias, *, sample_axis: int, epsilon: float, two_stage: bool):
  """Train-mode BatchNorm of `xg` (..., positions, C) with statistics over `sample_axis` and
  positions (axis -2); returns `(y, mean, var, inv)`, the statistics with the reduced axes kept,
  inv = 1 / sqrt(var + eps). two_stage (CPU): the means in two stages (`_sample_mean`)."""
  if two_stage:
    stat = lambda t: _sample_mean(t, sample_axis)
  else:
    stat = lambda t: jnp.mean(t, (sample_axis, t.ndim - 2), keepdims=True)
  mean = stat(xg)
  # Two passes, as PyTorch (not flax's E[x^2] - E[x]^2): when a channel barely varies over the
  # batch (pooled features of a young network, in the projector) the one-pass form cancels
  # catastrophically, its variance jumps in steps of E[x^2]'s ulp, and the gradients of two
  # float orderings of the same sums differed by ~2% (SCE, 1 vs 8 devices).
  centred = xg - mean
  var = stat(jnp.square(centred))
  inv = lax.rsqrt(var + epsilon)
  y = centred * inv
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y, mean, var, inv


def _train_backward(xg, mean, inv, scale, bias, gy, gmean, gvar, *, sample_axis: int,
                    two_stage: bool):
  """The gradient of `_train_forward`'s (y, mean, var), written out. With x_hat = (x - mean) *
  inv, N = samples x positions per group, sums over (samples, positions) per group as mean_R
  and over everything but channels as sum_C:
    d scale = sum_C(gy * x_hat),   d bias = sum_C(gy),   g = gy * scale
    d x = inv * (g - mean_R(g) - x_hat * mean_R(g * x_hat)) + (g_mean + 2 g_var (x - mean)) / N
  """
  n = xg.shape[sample_axis] * xg.shape[-2]
  per_group = (sample_axis, xg.ndim - 2)
  but_channels = tuple(range(xg.ndim - 1))
  centred = xg - mean
  x_hat = centred * inv
  g = gy if scale is None else gy * scale
  g_mean = _sum(g, per_group, two_stage) / n
  gx_hat_mean = _sum(g * x_hat, per_group, two_stage) / n
  gx = inv * (g - g_mean - x_hat * gx_hat_mean) + (gmean + 2 * gvar * centred) / n
  gscale = (None if scale is None else
            _sum(gy * x_hat, but_channels, two_stage).reshape(scale.shape).astype(scale.dtype))
  gbias = (None if bias is None else
           _sum(gy, but_channels, two_stage).reshape(bias.shape).astype(bias.dtype))
  return gx, gscale, gbias


def _by_platform(impl, *args):
  """`impl(*args, two_stage=True)` on CPU, `two_stage=False` elsewhere, chosen when the program
  is lowered for its platform."""
  return lax.platform_dependent(*args, cpu=functools.partial(impl, two_stage=True),
                                default=functools.partial(impl, two_stage=False))


# One VJP for the whole train-mode layer, with the platform chosen inside the forward and inside
# the backward: differentiating through `platform_dependent` (a conditional, both branches
# differentiated and transposed) took ~0.7 s of every tiny train step's lowering on CPU.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(xg, scale, bias, sample_axis: int, epsilon: float):
  """`(y, mean, var)` of `_train_forward` on this platform's path."""
  return _batch_norm_train_fwd(xg, scale, bias, sample_axis, epsilon)[0]


def _batch_norm_train_fwd(xg, scale, bias, sample_axis, epsilon):
  y, mean, var, inv = _by_platform(
      functools.partial(_train_forward, sample_axis=sample_axis, epsilon=epsilon), xg, scale, bias)
  return (y, mean, var), (xg, mean, inv, scale, bias)


def _batch_norm_train_bwd(sample_axis, epsilon, residuals, cotangents):
  del epsilon
  return _by_platform(functools.partial(_train_backward, sample_axis=sample_axis),
                      *residuals, *cotangents)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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
    views: V, the batch holds V batches interleaved (row b * V + v is sample b of batch v),
      normalised as V separate calls in order v = 0, 1, ...: statistics and groups per batch,
      running statistics updated once per batch. One call on the interleaved batch has one
      backward for all V (the symmetric step's two views: one gradient all-reduce, not two).
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
  views: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    if self.groups < 1:
      raise ValueError(f"bn_groups must be >= 1, got {self.groups}")
    if self.views < 1 or x.shape[0] % self.views:
      raise ValueError(f"batch size {x.shape[0]} is not a multiple of views={self.views}")
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale \
        else None
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
    out_dtype = nn.dtypes.canonicalize_dtype(
        *[a for a in (x, scale, bias) if a is not None], dtype=self.dtype)
    x32 = x.astype(jnp.float32)
    if use_ra:
      y = (x32 - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon)
      y = y * (1 if scale is None else scale) + (0 if bias is None else bias)
      return y.astype(out_dtype)
    # (B, V, positions, C), then a group axis and a within-group sample axis: every sample has
    # the same number of positions, so the mean over (samples, positions) is the mean over
    # samples of each sample's mean.
    xv = x32.reshape(x.shape[0] // self.views, self.views, -1, c)
    xg, group_axis, sample_axis = _group_view(xv, self.groups, self.grouping)
    y, mean, var = _batch_norm_train(xg, scale, bias, sample_axis, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      mean_v = jnp.mean(mean, group_axis).reshape(self.views, c)
      var_v = jnp.mean(var, group_axis).reshape(self.views, c)
      for v in range(self.views):
        ra_mean.value = m * ra_mean.value + (1 - m) * mean_v[v]
        ra_var.value = m * ra_var.value + (1 - m) * var_v[v]
    return y.reshape(x.shape).astype(out_dtype)


def gn_num_groups(channels: int, max_groups: int = GN_MAX_GROUPS) -> int:
  """GroupNorm groups: 32, or the largest count dividing `channels` when 32 does not."""
  return math.gcd(channels, max_groups)


def make_norm(norm: str, *, train: bool, dtype: Any = jnp.float32, bn_groups: int = 1,
              bn_grouping: str = "strided", bn_views: int = 1) -> Callable[..., nn.Module]:
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
                              grouping=bn_grouping, views=bn_views, dtype=dtype, **kwargs)
    return nn.GroupNorm(num_groups=gn_num_groups(channels), epsilon=BN_EPSILON, dtype=dtype,
                        **kwargs)

  return norm_layer
