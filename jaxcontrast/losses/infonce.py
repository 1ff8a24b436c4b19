"""InfoNCE with a negative queue (MoCo v2), its multi-positive form (FNC attraction, SePP), and
the in-batch NT-Xent of SimCLR."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxcontrast.losses import _core


def moco_infonce(query: jax.Array, key: jax.Array, queue: Optional[jax.Array] = None, *,
                 temperature: float = 0.2, stop_gradient: bool = True,
                 axis_name: Optional[str] = None, queue_valid: Optional[jax.Array] = None,
                 normalize_queue: bool = True,
                 precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """MoCo v2 InfoNCE (Chen et al. 2020; facebookresearch/moco `builder.py`, exact).

      q = n(query); k = sg(n(key))                      # (B, D)
      logits = [q.k, q @ sg(n(queue)).T] / temperature  # (B, 1+K)
      loss = mean_i(logsumexp(logits_i) - logits_i[0])

  With `queue=None` the negatives are the other keys of the global batch (MoCo v3 style):
  `logits = q @ k.T / temperature` with the positive on the diagonal. Averaging this call and
  the one with the views swapped, with `stop_gradient=False`, is the CLIP loss; SimCLR's NT-Xent
  (same-view negatives too) is `nt_xent`.

  Args:
    query: (B, D) online-branch embeddings of view 1 (normalised here).
    key: (B, D) target-branch embeddings of view 2 (normalised here; no gradient unless
      `stop_gradient=False`).
    queue: (K, D) negatives, or None (default) for in-batch negatives. Rows are L2-normalised
      here (`normalize_queue`), so raw rows give the same loss as unit rows; no gradient. With
      `axis_name` this is the device's (K/n, D) block of the K-sharded queue.
    temperature: softmax temperature tau (> 0; MoCo v2's 0.2).
    stop_gradient: stop the gradient through `key` (MoCo, default). False lets it flow into the
      key too (SimCLR / CLIP, one encoder for both views).
    axis_name: mesh axis when called inside `jax.shard_map` with query, key, queue (and
      queue_valid) all split over it; a replicated one raises ValueError.
    queue_valid: optional (K,) bool, False for rows holding no real key yet (METHODS.md's "valid
      count"; with `axis_name` the device's (K/n,) block). Those rows are left out: the result
      equals the call on `queue[queue_valid]`. With no valid row the positive is alone (loss 0).
    normalize_queue: L2-normalise the queue rows here (default). False skips it for a queue whose
      rows are already unit vectors (the train step's), saving one pass over the queue; other
      rows then give a wrong loss silently.
    precision: matrix-product precision of the similarities (default
      `lax.Precision.HIGHEST`: exact float32; the backend default is TF32 on GPU and one bfloat16
      pass on TPU, whose rounding the temperature magnifies).

  Returns:
    (loss, metrics) with metrics `pos_logit`, `neg_logit` (means, in logit units) and `acc`
    (fraction of anchors whose positive is ranked first).
  """
  _core.check_pair(query, key)
  _core.check_temperature(temperature)
  stop_gradient = _core.static_bool(stop_gradient, "stop_gradient")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  dist = _core.Dist(axis_name, query.shape[0])
  dist.check_split(query=query, key=key, queue=queue, queue_valid=queue_valid)
  q, k = _core.prepare(query, key, dist, stop_gradient)
  if queue is None:
    if queue_valid is not None:
      raise ValueError("queue_valid needs a queue (queue is None: in-batch negatives)")
    return _in_batch_infonce(q, k, temperature, dist, precision)
  _core.check_queue(queue, query.shape[1])
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  pos = jnp.sum(q * k, axis=-1) / temperature
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  neg = _core.mask_columns(_core.sim(q, block, precision) / temperature, valid)
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


def nt_xent(view1: jax.Array, view2: jax.Array, *, temperature: float = 0.1,
            stop_gradient: bool = False, axis_name: Optional[str] = None,
            precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """SimCLR's NT-Xent (Chen et al. 2020; google-research/simclr `objective.py`): the in-batch
  form with same-view negatives. Every one of the 2N embeddings is an anchor; its positive is
  the other view of its image; its negatives are the 2N - 2 other embeddings of both views.

      z = [n(view1); n(view2)]                              # (2N, D), N the global batch
      logits = z @ c.T / temperature,  c = z (sg(z) with stop_gradient)
      loss = mean_{i < 2N}(logsumexp_{j != i} logits_ij - logits_{i, i +- N})

  Gradients flow through every row by default, as in SimCLR (one encoder for both views);
  `stop_gradient=True` stops them through the columns (targets), so each embedding is trained
  only as an anchor. `fnc_multiview(views, views, stop_gradient=False)` with V = 2 and nothing
  detected is twice this loss (its 2/V scaling of a sum over the views).

  Args:
    view1, view2: (N, D) projections of the two views of each image (normalised here). With
      `axis_name`: each device's (N/n, D) rows, both split over that axis.
    temperature: tau (> 0; SimCLR's official code default 0.1; the paper uses 0.5 on CIFAR-10).
    stop_gradient: stop the gradient through the targets (columns); default False (SimCLR).
    axis_name: mesh axis when called inside `jax.shard_map`: each device computes its own 2N/n
      rows against the gathered 2N columns, and the loss is the mean over all 2N rows.
    precision: matrix-product precision (default `lax.Precision.HIGHEST`, see `moco_infonce`).

  Returns:
    (loss, metrics): `pos_logit` (mean positive logit), `neg_logit` (mean logit of the 2N - 2
    negatives), `acc` (fraction of the 2N anchors whose positive beats every negative).
  """
  _core.check_pair(view1, view2, ("view1", "view2"))
  _core.check_temperature(temperature)
  stop_gradient = _core.static_bool(stop_gradient, "stop_gradient")
  b = view1.shape[0]
  dist = _core.Dist(axis_name, b)
  dist.check_split(view1=view1, view2=view2)
  z1 = _core.l2_normalize(_core.as_float(view1))
  z2 = _core.l2_normalize(_core.as_float(view2))
  anchors = jnp.concatenate([z1, z2])                                   # (2B, D), this device's
  columns = jnp.concatenate([dist.gather(z1), dist.gather(z2)])          # (2Bg, D)
  if stop_gradient:
    columns = lax.stop_gradient(columns)
  logits = _core.sim(anchors, columns, precision) / temperature         # (2B, 2Bg)
  bg = dist.global_batch
  rows = dist.row_offset() + jnp.arange(b)
  self_col = jnp.concatenate([rows, bg + rows])
  pos_col = jnp.concatenate([bg + rows, rows])
  cols = jnp.arange(2 * bg)[None, :]
  is_self, is_pos = cols == self_col[:, None], cols == pos_col[:, None]
  pos = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=-1)
  lse = jax.nn.logsumexp(jnp.where(is_self, -jnp.inf, logits), axis=-1)
  total = 2 * bg
  mean = lambda per_row: dist.psum(jnp.sum(per_row)) / total
  loss = mean(lse - pos)
  neg = is_self | is_pos
  sg_logits, sg_pos = lax.stop_gradient(logits), lax.stop_gradient(pos)
  metrics = {"pos_logit": mean(sg_pos)}
  if bg > 1:
    metrics["neg_logit"] = mean(jnp.sum(jnp.where(neg, 0.0, sg_logits), -1) / (total - 2))
    best_neg = jnp.max(jnp.where(neg, -jnp.inf, sg_logits), axis=-1)
    metrics["acc"] = mean((sg_pos >= best_neg).astype(jnp.float32))
  else:  # One image: the positive is the only other column.
    metrics["neg_logit"] = jnp.zeros((), jnp.float32)
    metrics["acc"] = jnp.ones((), jnp.float32)
  return loss, metrics


def multi_positive_infonce(query: jax.Array, key: jax.Array, queue: jax.Array,
                           positive_mask: jax.Array, *, temperature: float = 0.2,
                           stop_gradient: bool = True, axis_name: Optional[str] = None,
                           queue_valid: Optional[jax.Array] = None, normalize_queue: bool = True,
                           precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """InfoNCE with several positives per anchor: the key and the queue entries marked positive.

      logits = [q.k, q @ sg(n(queue)).T] / temperature              # (B, 1+K)
      P_i    = {0} U {1 + j : positive_mask[i, j]}                  # the key is always positive
      loss   = mean_i(logsumexp(logits_i) - mean_{c in P_i} logits_i[c])

  All columns stay in the denominator (FNC "attraction"; SePP with queue ids). With an all-False
  mask this is `moco_infonce`.

  Args:
    query, key, queue, stop_gradient, axis_name, queue_valid, normalize_queue, precision: as
      `moco_infonce` (queue required; an invalid row is neither a negative nor a positive).
    positive_mask: (B, K) bool, which queue rows are positives of which anchor. With `axis_name`
      it is split by *columns*: each device passes the (Bg, K/n) block matching its queue rows
      (shard_map in_specs `P(None, axis)`), so no device ever holds a Bg x K mask it does not use.
    temperature: tau (> 0); default 0.2, MoCo v2's, whose loss SePP trains with.

  Returns:
    (loss, metrics): `pos_logit` (the key's logit), `neg_logit` (mean over all queue logits),
    `acc`, and `num_positives` (mean number of queue positives per anchor).
  """
  _core.check_pair(query, key)
  _core.check_temperature(temperature)
  if queue is None:
    raise ValueError("multi_positive_infonce needs a queue (got queue=None)")
  _core.check_queue(queue, query.shape[1])
  stop_gradient = _core.static_bool(stop_gradient, "stop_gradient")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  dist = _core.Dist(axis_name, query.shape[0])
  dist.check_split(query=query, key=key, queue=queue, positive_mask=positive_mask,
                   queue_valid=queue_valid)
  expected = (dist.global_batch, queue.shape[0])
  if getattr(positive_mask, "shape", None) != expected:
    raise ValueError(f"positive_mask must have shape {expected} (global batch, queue rows on this "
                     f"device), got {getattr(positive_mask, 'shape', None)}")
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  q, k = _core.prepare(query, key, dist, stop_gradient)
  pos = jnp.sum(q * k, axis=-1) / temperature
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  neg = _core.mask_columns(_core.sim(q, block, precision) / temperature, valid)
  mask = lax.stop_gradient(jnp.asarray(positive_mask, bool))
  return _core.multi_positive_from_logits(pos, neg, mask, dist, valid)
