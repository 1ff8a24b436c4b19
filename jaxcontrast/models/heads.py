"""MLP heads: projectors and predictors.

`MLPHead(hidden_dims, out_dim)` is, for each hidden width h:  Linear(h) [-> BN] -> ReLU,
then Linear(out_dim) [-> BN without affine]. The recipes (METHODS.md sections 1-2):

  MoCo v2 (R50)      hidden (2048,), out 128, no BN:  fc(2048->2048)-ReLU-fc(2048->128)
  MoCo / SCE CIFAR   hidden (512,),  out 128
  SCE projector      hidden (2048,), out 256, use_bn, last_bn (BN with no scale/offset)
  SCE predictor      hidden (4096,), out 256, use_bn

Linear layers use PyTorch's default `nn.Linear` init (weight and bias ~ U(-1/sqrt(fan_in),
1/sqrt(fan_in))), as the reference implementations do. BatchNorm is `GroupedBatchNorm`, so the
heads follow the backbone's grouping (per-device statistics in DDP apply to every BN layer).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcontrast.models.norm import GroupedBatchNorm

# PyTorch nn.Linear: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
  """Bias init of PyTorch's nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MLPHead(nn.Module):
  """Linear(+BN)+ReLU per hidden layer, then Linear (+ affine-free BN if `last_bn`).

  Attributes:
    hidden_dims: widths of the hidden layers (may be empty: a single linear layer).
    out_dim: output width.
    use_bn: BatchNorm after every hidden linear layer.
    last_bn: BatchNorm with no scale/offset after the output layer (SCE projector).
    dtype: compute dtype; parameters float32.
    bn_groups, bn_grouping, bn_views: grouped BatchNorm options (see `norm.py`).
  """
  hidden_dims: Sequence[int]
  out_dim: int
  use_bn: bool = False
  last_bn: bool = False
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_grouping: str = "strided"
  bn_views: int = 1

  def _dense(self, x: jax.Array, features: int, name: str) -> jax.Array:
    return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=torch_linear_kernel_init,
                    bias_init=torch_linear_bias_init(x.shape[-1]), name=name)(x)

  def _bn(self, x: jax.Array, train: bool, name: str, affine: bool = True) -> jax.Array:
    return GroupedBatchNorm(use_running_average=not train, groups=self.bn_groups,
                            grouping=self.bn_grouping, views=self.bn_views,
                            dtype=self.dtype, use_bias=affine,
                            use_scale=affine, name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, h in enumerate(self.hidden_dims):
      x = self._dense(x, h, f"fc{i}")
      if self.use_bn:
        x = self._bn(x, train, f"bn{i}")
      x = nn.relu(x)
    x = self._dense(x, self.out_dim, "fc_out")
    if self.last_bn:
      x = self._bn(x, train, "bn_out", affine=False)
    return x
