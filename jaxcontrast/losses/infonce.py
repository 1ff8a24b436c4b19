"""InfoNCE with a negative queue (MoCo v2) and its multi-positive form (FNC attraction, SePP)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxcontrast.losses import _core


def moco_infonce(query: jax.Array, key: jax.Array, queue: Optional[jax.Array], *,
                 temperature: float = 0.2, axis_name: Optional[str] = None,
                 queue_valid: Optional[jax.Array] = None, precision=_core.HIGHEST):
  """MoCo v2 InfoNCE (Chen et al. 2020; facebookresearch/moco `builder.py`, exact).

      q = n(query); k = sg(n(key))                      # (B, D)
      logits = [q.k, q @ sg(queue).T] / temperature     # (B, 1+K)
      loss = mean_i(logsumexp(logits_i) - logits_i[0])

  With `queue=None` the negatives are the other keys of the global batch (SimCLR/MoCo v3 style):
  `logits = q @ k.T / temperature` with the positive on the diagonal.

  Args:
    query: (B, D) online-branch embeddings of view 1 (normalised here).
    key: (B, D) target-branch embeddings of view 2 (normalised here; no gradient).
    queue: (K, D) normalised negatives, or None for in-batch negatives. With `axis_name` this is
      the device's (K/n, D) block of the K-sharded queue.
    temperature: softmax temperature tau (> 0).
    axis_name: mesh axis when called inside `jax.shard_map` with batch and queue split over it.
    queue_valid: optional (K,) bool, False for rows holding no real key yet (METHODS.md's "valid
      count"; with `axis_name` the device's (K/n,) block). Those rows are left out: the result
      equals the call on `queue[queue_valid]`. With no valid row the positive is alone (loss 0).
    precision: matrix-product precision of the similarities (default
      `lax.Precision.HIGHEST`: exact float32; the backend default is TF32 on GPU and one bfloat16
      pass on TPU, whose rounding the temperature magnifies).

  Returns:
    (loss, metrics) with metrics `pos_logit`, `neg_logit` (means, in logit units) and `acc`
    (fraction of anchors whose positive is ranked first).
  """
  _core.check_pair(query, key)
  _core.check_temperature(temperature)
  dist = _core.Dist(axis_name, query.shape[0])
  q, k = _core.prepare(query, key, dist)
  if queue is None:
    return _in_batch_infonce(q, k, temperature, dist, precision)
  _core.check_queue(queue, query.shape[1])
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  pos = jnp.sum(q * k, axis=-1) / temperature
  neg = _core.mask_columns(_core.sim(q, _core.queue_block(queue), precision) / temperature,
                           valid)
  lse = _core.split_logsumexp(pos[:, None], neg, dist)
  loss = dist.batch_mean(lse - pos)
  return loss, _core.negative_metrics(pos, neg, valid, dist)


def _in_batch_infonce(q, k, temperature, dist, precision):
  """Global-batch negatives: every device holds all Bg keys (gathered; small)."""
  logits = _core.sim(q, k, precision) / temperature    # (Bg, Bg), positives on the diagonal
  pos = jnp.diagonal(logits)
  loss = dist.batch_mean(jax.nn.logsumexp(logits, axis=-1) - pos)
  if logits.shape[0] > 1:
    neg = _core.off_diagonal(logits)
    metrics = _core.infonce_metrics(pos, jnp.sum(neg, -1), neg.shape[1], jnp.max(neg, -1), dist)
  else:
    metrics = _core.infonce_metrics(pos, pos, 0, pos, dist)
  return loss, metrics


def multi_positive_infonce(query: jax.Array, key: jax.Array, queue: jax.Array, *,
                           positive_mask: jax.Array, temperature: float,
                           axis_name: Optional[str] = None,
                           queue_valid: Optional[jax.Array] = None, precision=_core.HIGHEST):
  """InfoNCE with several positives per anchor: the key and the queue entries marked positive.

      logits = [q.k, q @ sg(queue).T] / temperature                 # (B, 1+K)
      P_i    = {0} U {1 + j : positive_mask[i, j]}                  # the key is always positive
      loss   = mean_i(logsumexp(logits_i) - mean_{c in P_i} logits_i[c])

  All columns stay in the denominator (FNC "attraction"; SePP with queue ids). With an all-False
  mask this is `moco_infonce`.

  Args:
    query, key, queue, temperature, axis_name, queue_valid, precision: as `moco_infonce`
      (queue required; an invalid row is neither a negative nor a positive).
    positive_mask: (B, K) bool, which queue rows are positives of which anchor. With `axis_name`
      it is split by *columns*: each device passes the (Bg, K/n) block matching its queue rows
      (shard_map in_specs `P(None, axis)`), so no device ever holds a Bg x K mask it does not use.

  Returns:
    (loss, metrics): `pos_logit` (the key's logit), `neg_logit` (mean over all queue logits),
    `acc`, and `num_positives` (mean number of queue positives per anchor).
  """
  _core.check_pair(query, key)
  _core.check_temperature(temperature)
  _core.check_queue(queue, query.shape[1])
  dist = _core.Dist(axis_name, query.shape[0])
  expected = (dist.global_batch, queue.shape[0])
  if getattr(positive_mask, "shape", None) != expected:
    raise ValueError(f"positive_mask must have shape {expected} (global batch, queue rows on this "
                     f"device), got {getattr(positive_mask, 'shape', None)}")
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  q, k = _core.prepare(query, key, dist)
  pos = jnp.sum(q * k, axis=-1) / temperature
  neg = _core.mask_columns(_core.sim(q, _core.queue_block(queue), precision) / temperature,
                           valid)
  mask = jax.lax.stop_gradient(jnp.asarray(positive_mask, bool))
  return _multi_positive_from_logits(pos, neg, mask, dist, valid)


def _multi_positive_from_logits(pos, neg, mask, dist, valid=None):
  """Shared by `multi_positive_infonce` and FNC attraction."""
  if valid is not None:
    mask = mask & valid[None, :]
  lse = _core.split_logsumexp(pos[:, None], neg, dist)
  num_pos = _core.split_sum(None, mask.astype(neg.dtype), dist)
  pos_sum = pos + _core.split_sum(None, jnp.where(mask, neg, 0.0), dist)
  loss = dist.batch_mean(lse - pos_sum / (1.0 + num_pos))
  metrics = _core.negative_metrics(pos, neg, valid, dist)
  metrics["num_positives"] = dist.batch_mean(num_pos)
  return loss, metrics
