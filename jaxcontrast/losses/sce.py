"""SCE: similarity contrastive estimation (Denize et al., WACV 2023)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax import lax

from jaxcontrast.losses import _core


def sce(query: jax.Array, key: jax.Array, queue: jax.Array, *, temperature: float = 0.1,
        target_temperature: float = 0.07, coeff: float = 0.5, mask_self: bool = False,
        axis_name: Optional[str] = None, queue_valid: Optional[jax.Array] = None,
        normalize_queue: bool = True,
        precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """SCE loss: cross-entropy to a target mixing the one-hot positive with the key's similarities.

  Exact semantics of the official code (CEA-LIST/SCE `sce.py`, eztorch `sce_loss.py`):

      q = n(query); k = sg(n(key)); Q = sg(n(queue))
      lq = [q.k, q @ Q.T] / temperature                        # (B, 1+K)
      lk = [0,   k @ Q.T] / target_temperature                 # self column: logit 0 (code)
      w  = coeff * onehot(0) + (1 - coeff) * softmax(lk)       # no gradient
      loss = mean_i(-sum_j w_ij log_softmax(lq_i)_j)

  `mask_self=True` gives the paper's variant, the self column of `lk` at -inf (so the target's
  similarity part ignores the positive). `coeff=1` is `moco_infonce` at the same temperature.

  Args:
    query: (B, D) online predictor output of view 1.
    key: (B, D) target projector output of view 2 (no gradient).
    queue: (K, D) negatives, rows L2-normalised here (see `normalize_queue`); with `axis_name`,
      this device's K/n rows.
    temperature: online temperature tau (> 0; the official ImageNet and CIFAR-10 value 0.1).
    target_temperature: target temperature tau_m (> 0; ImageNet 0.07, CIFAR-10 0.05).
    coeff: weight lambda of the one-hot part, in [0, 1] (official 0.5).
    mask_self: paper (True) or code (False, default) treatment of the target's self column.
    axis_name: mesh axis when called inside `jax.shard_map`, with query, key, queue (and
      queue_valid) split over it (see `moco_infonce`).
    queue_valid: optional mask of the queue rows that hold real keys (see `moco_infonce`); the
      others are out of both distributions. With `mask_self` and no valid row, the target is the
      one-hot positive.
    normalize_queue: as `moco_infonce` (default True: rows normalised here).
    precision: matrix-product precision of the similarities (default
      `lax.Precision.HIGHEST`: exact float32; the backend default is TF32 on GPU and one bfloat16
      pass on TPU, whose rounding the temperature magnifies).

  Returns:
    (loss, metrics): `pos_logit`, `neg_logit`, `acc` of the online logits, and `target_entropy`
    (mean entropy of the target distribution over the 1+K columns).
  """
  _core.check_pair(query, key)
  if queue is None:
    raise ValueError("sce needs a queue (got queue=None)")
  _core.check_queue(queue, query.shape[1])
  _core.check_temperature(temperature)
  _core.check_temperature(target_temperature, "target_temperature")
  _core.check_unit_interval(coeff, "coeff")
  mask_self = _core.static_bool(mask_self, "mask_self")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  dist = _core.Dist(axis_name, query.shape[0])
  dist.check_split(query=query, key=key, queue=queue, queue_valid=queue_valid)
  q, k = _core.prepare(query, key, dist)
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  lq_pos = jnp.sum(q * k, axis=-1) / temperature                   # (Bg,)
  lq_neg = _core.mask_columns(_core.sim(q, block, precision) / temperature, valid)  # (Bg, K_l)
  lk_neg = _core.mask_columns(_core.sim(k, block, precision) / target_temperature, valid)
  lk_head = None if mask_self else jnp.zeros_like(lq_pos)[:, None]
  lse_k = _core.split_logsumexp(lk_head, lk_neg, dist)
  p_self = jnp.zeros_like(lse_k) if mask_self else jnp.exp(-lse_k)
  p_neg = jnp.exp(lk_neg - lse_k[:, None])
  if valid is not None:
    p_neg = jnp.where(valid[None, :], p_neg, 0.0)
    if mask_self:  # No valid negative: nothing to spread the similarity part over.
      p_self = jnp.where(_core.num_valid(lq_neg, valid, dist) > 0, p_self, 1.0)
  w_pos = jax.lax.stop_gradient(coeff + (1.0 - coeff) * p_self)
  w_neg = jax.lax.stop_gradient((1.0 - coeff) * p_neg)
  lse_q = _core.split_logsumexp(lq_pos[:, None], lq_neg, dist)
  # sum_j w_j (lse - l_j) with sum_j w_j = 1.
  per_row = lse_q - w_pos * lq_pos - _core.split_sum(None, w_neg * lq_neg, dist)
  loss = dist.batch_mean(per_row)
  metrics = _core.negative_metrics(lq_pos, lq_neg, valid, dist)
  log_p_neg = lk_neg - lse_k[:, None]
  entropy = -_core.split_sum(None, jnp.where(p_neg > 0, p_neg * log_p_neg, 0.0), dist)
  if not mask_self:
    entropy = entropy + p_self * lse_k
  metrics["target_entropy"] = dist.batch_mean(jax.lax.stop_gradient(entropy))
  return loss, metrics
