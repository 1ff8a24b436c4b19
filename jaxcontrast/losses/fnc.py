"""FNC: false negative cancellation with support views (Huynh et al., WACV 2022)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxcontrast.losses import _core


def _check_detection_args(threshold, top_k) -> int:
  _core.check_threshold(threshold)
  return _core.static_int(top_k, "top_k")


def _check_fnc_args(temperature, threshold, top_k, mode=None) -> int:
  _core.check_temperature(temperature)
  if mode is not None:
    _core.check_choice(mode, "mode", {"attraction", "elimination"})
  return _check_detection_args(threshold, top_k)


def _check_support(support_keys, b: int, d: int) -> None:
  if support_keys is not None and (getattr(support_keys, "ndim", None) != 3 or
                                   support_keys.shape[0] != b or support_keys.shape[2] != d):
    raise ValueError(f"support_keys must have shape ({b}, S, {d}), got "
                     f"{getattr(support_keys, 'shape', None)}")


def _detect(k: jax.Array, support_keys: Optional[jax.Array], block: jax.Array,
            valid: Optional[jax.Array], dist: _core.Dist, *, threshold, top_k: int,
            precision) -> jax.Array:
  """The one definition of FNC's detection on a MoCo queue, shared by `fnc` and `fnc_detect`.

  k: (Bg, D) normalised global keys without gradient; support_keys: this device's raw (B, S, D)
  or None; block: (K_local, D) queue rows. Returns fn (Bg, K_local) bool.
  """
  views = k[:, None]
  if support_keys is not None and support_keys.shape[1] > 0:
    support = dist.gather(lax.stop_gradient(_core.l2_normalize(_core.as_float(support_keys))))
    views = jnp.concatenate([views, support], axis=1)
  _, fn = _core.detect_false_negatives(views, block, threshold=threshold, top_k=top_k, dist=dist,
                                       valid=valid, precision=precision)
  return fn


def fnc_detect(key: jax.Array, queue: jax.Array, support_keys: Optional[jax.Array] = None, *,
               threshold: float = 0.7, top_k: int = 10, axis_name: Optional[str] = None,
               queue_valid: Optional[jax.Array] = None, normalize_queue: bool = True,
               precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """FNC's false-negative detection alone: which queue rows `fnc` treats as false negatives.

      views = sg(n([key, support_1..S]))                 # (B, 1+S, D)
      s     = max_v views_v @ sg(n(queue)).T              # (B, K)
      fn    = (s > threshold) & top_k(s, top_k)           # k rows; ties: lower index first

  `fnc` calls the same code, so a diagnostic built on this mask (e.g. the precision and recall
  of the detected rows against class labels) measures exactly what the loss used.

  Args:
    key: (B, D) target-encoder embedding of the key view (normalised here; no gradient).
    queue: (K, D) queue rows, L2-normalised here unless `normalize_queue=False` (this device's
      K/n rows under `axis_name`).
    support_keys: (B, S, D) target embeddings of S support views, or None (default; S = 0).
    threshold, top_k: as `fnc`.
    axis_name: inside `jax.shard_map`, the mesh axis splitting key, support_keys, the queue
      rows and queue_valid.
    queue_valid: optional (K,) bool (this device's rows); invalid rows are never detected.
    normalize_queue: as `moco_infonce`.
    precision: of the similarity products (default `lax.Precision.HIGHEST`: exact float32; the
      backend default is TF32 on GPU and one bfloat16 pass on TPU).

  Returns:
    (fn, metrics): fn the (B, K) bool mask, no gradient (under `axis_name`: (Bg, K/n), the whole
    global batch in device order against this device's queue rows, as the loss computes it);
    metrics `num_false_negatives` (mean detected per anchor, over all queue rows).
  """
  _core.check_matrix(key, "key")
  if queue is None:
    raise ValueError("fnc_detect needs a queue (got queue=None)")
  _core.check_queue(queue, key.shape[1])
  top_k = _check_detection_args(threshold, top_k)
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  _check_support(support_keys, *key.shape)
  dist = _core.Dist(axis_name, key.shape[0])
  dist.check_split(key=key, queue=queue, support_keys=support_keys, queue_valid=queue_valid)
  k = dist.gather(lax.stop_gradient(_core.l2_normalize(_core.as_float(key))))
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  fn = _detect(k, support_keys, block, valid, dist, threshold=threshold, top_k=top_k,
               precision=precision)
  num_fn = dist.batch_mean(_core.split_sum(None, fn.astype(jnp.float32), dist))
  return fn, {"num_false_negatives": num_fn}


def fnc(query: jax.Array, key: jax.Array, queue: jax.Array,
        support_keys: Optional[jax.Array] = None, *, temperature: float = 0.1,
        threshold: float = 0.7, top_k: int = 10, mode: str = "attraction",
        stop_gradient: bool = True, axis_name: Optional[str] = None,
        queue_valid: Optional[jax.Array] = None, normalize_queue: bool = True,
        precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """FNC on a MoCo queue: detect false negatives among the queue with support views, then attract
  them (extra positives) or eliminate them (drop from the denominator).

      views  = sg(n([key, support_1..S]))                            # (B, 1+S, D)
      s      = max_v views_v @ sg(n(queue)).T                         # (B, K)
      fn     = (s > threshold) & top_k(s, top_k)     # exactly k rows; ties: lower index first
      logits = [q.k, q @ sg(n(queue)).T] / temperature                # (B, 1+K)
      attraction:  loss_i = logsumexp(logits_i) - mean_{c in {0} U fn_i} logits_i[c]
      elimination: loss_i = logsumexp(logits_i[{0} U (neg \\ fn_i)]) - logits_i[0]

  Detection is the official code's (google-research/fnc), the same code as `fnc_detect`; the
  official release implements only
  attraction, in a multi-view form (`fnc_multiview`). Elimination follows the paper's text.
  With `threshold` above 1 nothing is detected and both modes equal `moco_infonce`.

  Args:
    query, key, queue, stop_gradient, axis_name, queue_valid, normalize_queue, precision: as
      `moco_infonce` (queue required; an invalid row is never detected, nor a negative;
      `support_keys` is split over `axis_name` like the batch).
    support_keys: (B, S, D) target-encoder embeddings of S extra views of each anchor, or None
      (default) for S = 0: detection by the key view alone. Normalised here; no gradient.
    temperature: tau (> 0; official 0.1).
    threshold: cosine-similarity threshold of detection (official 0.7).
    top_k: at most this many candidates per anchor (official 10; exactly the k most similar; a
      tie at the k-th value goes to the lower queue index, as the official code's
      `tf.math.top_k`). A static Python or NumPy int.
    mode: "attraction" (default, the official code's) or "elimination" (the paper's text). A
      static Python string.

  Returns:
    (loss, metrics): `pos_logit`, `neg_logit`, `acc` (over the whole queue) and
    `num_false_negatives` (mean detected per anchor).
  """
  _core.check_pair(query, key)
  if queue is None:
    raise ValueError("fnc needs a queue (got queue=None); FNC's in-batch (SimCLR) form is "
                     "fnc_multiview(views, target_views, None)")
  _core.check_queue(queue, query.shape[1])
  top_k = _check_fnc_args(temperature, threshold, top_k, mode)
  stop_gradient = _core.static_bool(stop_gradient, "stop_gradient")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  b, d = query.shape
  _check_support(support_keys, b, d)
  dist = _core.Dist(axis_name, b)
  dist.check_split(query=query, key=key, queue=queue, support_keys=support_keys,
                   queue_valid=queue_valid)
  q, k = _core.prepare(query, key, dist, stop_gradient)
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  fn = _detect(lax.stop_gradient(k), support_keys, block, valid, dist, threshold=threshold,
               top_k=top_k, precision=precision)
  pos = jnp.sum(q * k, axis=-1) / temperature
  neg = _core.mask_columns(_core.sim(q, block, precision) / temperature, valid)
  num_fn = dist.batch_mean(_core.split_sum(None, fn.astype(neg.dtype), dist))
  if mode == "attraction":
    loss, metrics = _core.multi_positive_from_logits(pos, neg, fn, dist, valid)
    del metrics["num_positives"]
  else:
    lse = _core.split_logsumexp(pos[:, None], jnp.where(fn, -jnp.inf, neg), dist)
    loss = dist.batch_mean(lse - pos)
    metrics = _core.negative_metrics(pos, neg, valid, dist)
  metrics["num_false_negatives"] = num_fn
  return loss, metrics


def fnc_multiview(views: jax.Array, target_views: jax.Array, queue: Optional[jax.Array] = None, *,
                  temperature: float = 0.1, threshold: float = 0.7, top_k: int = 10,
                  stop_gradient: bool = True, axis_name: Optional[str] = None,
                  normalize_queue: bool = True,
                  precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """FNC attraction in the official multi-view form (google-research/fnc `objective.py`), for
  parity with the TF1 release.

  Every one of V views is an anchor; the other V-1 views of the same image are its positives;
  detected false negatives join them; positives stay in the denominator; only the anchor's own
  key leaves it. The memory is this step's target keys, view-major, followed by the queue:

      Z = n(views), E = sg(n(target_views))            # (V, B, D)
      mem = [E.reshape(V*B, D); sg(n(queue))]          # row v*B + b is view v of image b
      s[b, m] = max_v E[v, b] . mem[m];  s[b, v*B + b] = -inf for every v (own views)
      fn[b] = (s[b] > threshold) & top_k(s[b], top_k)   # k columns; ties: lower index
      for each anchor view a:
        logits = Z[a] @ mem.T / tau                    # (B, M)
        den    = logits without column a*B + b
        P_b    = {v*B + b : v != a} U fn[b]
        loss_a = mean_b(logsumexp(den_b) - mean_{c in P_b} logits[b, c])
      loss = (2 / V) * sum_a loss_a

  The official code is SimCLR-based: one encoder, no queue, gradients through every view. That
  is `fnc_multiview(views, views, None, stop_gradient=False)`: the memory rows then carry
  gradient too (detection never does). With V = 2 and nothing detected (threshold above 1) the
  loss is twice `nt_xent(views[0], views[1])`.

  Args:
    views: (V, B, D) online embeddings, V >= 2. With `axis_name`, split on axis 1.
    target_views: (V, B, D) target (EMA) embeddings of the same views; no gradient unless
      `stop_gradient=False`. With `axis_name`, split on axis 1.
    queue: (M, D) older memory rows (L2-normalised here unless `normalize_queue=False`), or None
      (default) for none (SimCLR-style in-batch). With `axis_name`, split by rows.
    temperature, threshold, top_k, axis_name, normalize_queue, precision: as `fnc`.
    stop_gradient: stop the gradient through `target_views` (default True: MoCo-style EMA
      targets); False for the official SimCLR-based objective.

  Returns:
    (loss, metrics): `pos_logit` (mean logit of the other views), `neg_logit` (mean logit of
    every other memory row), `acc` (the best other view beats every other row),
    `num_false_negatives`.
  """
  for name, x in (("views", views), ("target_views", target_views)):
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"{name} must have shape (V, B, D), got {getattr(x, 'shape', None)}")
  if views.shape != target_views.shape:
    raise ValueError(f"views and target_views must have the same shape, got {views.shape} and "
                     f"{target_views.shape}")
  num_views, b, d = views.shape
  if num_views < 2:
    raise ValueError(f"views must hold at least 2 views (V >= 2), got V={num_views}")
  if queue is not None:
    _core.check_queue(queue, d)
  top_k = _check_fnc_args(temperature, threshold, top_k)
  stop_gradient = _core.static_bool(stop_gradient, "stop_gradient")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  dist = _core.Dist(axis_name, b)
  dist.check_split(views=views, target_views=target_views, queue=queue)
  z = dist.gather(_core.l2_normalize(_core.as_float(views)), axis=1)          # (V, Bg, D)
  e = _core.l2_normalize(_core.as_float(target_views))
  e = dist.gather(lax.stop_gradient(e) if stop_gradient else e, axis=1)
  bg = z.shape[1]
  memory_head = e.reshape(num_views * bg, d)
  e = lax.stop_gradient(e)                 # detection: a mask, never a gradient path
  block = None if queue is None else _core.queue_block(queue, normalize_queue)
  rows = jnp.arange(bg)
  column_image = jnp.arange(num_views * bg) % bg
  own = column_image[None, :] == rows[:, None]                                 # (Bg, V*Bg)
  e_by_image = jnp.swapaxes(e, 0, 1)                                           # (Bg, V, D)
  s_head = jnp.where(own, -jnp.inf, _core.max_similarity(e_by_image, lax.stop_gradient(
      memory_head), precision))
  if block is not None:
    fn_head, fn_block = _core.detect_false_negatives(e_by_image, block, threshold=threshold,
                                               top_k=top_k, dist=dist, head_similarity=s_head,
                                               precision=precision)
  else:
    top_head, _ = _core.split_top_k_mask(s_head, None, top_k, dist)
    fn_head, fn_block = (s_head > threshold) & top_head, None
  num_fn = _core.split_sum(fn_head.astype(jnp.float32),
                           None if fn_block is None else fn_block.astype(jnp.float32), dist)
  total, pos_logit, neg_logit, acc = 0.0, 0.0, 0.0, 0.0
  num_neg = (num_views - 1) * bg + (0 if block is None else block.shape[0] * dist.size)
  for a in range(num_views):
    head = _core.sim(z[a], memory_head, precision) / temperature               # (Bg, V*Bg)
    lb = None if block is None else _core.sim(z[a], block, precision) / temperature
    anchor_key = own & (jnp.arange(num_views * bg)[None, :] // bg == a)
    other_views = own & ~anchor_key
    lse = _core.split_logsumexp(jnp.where(anchor_key, -jnp.inf, head), lb, dist)
    pos_head = other_views | fn_head
    count = _core.split_sum(pos_head.astype(head.dtype),
                            None if lb is None else fn_block.astype(head.dtype), dist)
    pos_sum = _core.split_sum(jnp.where(pos_head, head, 0.0),
                              None if lb is None else jnp.where(fn_block, lb, 0.0), dist)
    total = total + dist.batch_mean(lse - pos_sum / count)
    # Metrics: positives are the other views; negatives every row but the image's own views.
    view_logits = jnp.where(other_views, head, 0.0).sum(-1) / (num_views - 1)
    best_view = jnp.max(jnp.where(other_views, head, -jnp.inf), axis=-1)
    neg_head = jnp.where(own, -jnp.inf, head)
    neg_sum = _core.split_sum(jnp.where(own, 0.0, head), lb, dist)
    neg_max = _core.split_max(neg_head, lb, dist)
    m = _core.infonce_metrics(view_logits, neg_sum, num_neg, neg_max, dist)
    pos_logit, neg_logit = pos_logit + m["pos_logit"], neg_logit + m["neg_logit"]
    acc = acc + dist.batch_mean((lax.stop_gradient(best_view) >= neg_max).astype(jnp.float32))
  loss = (2.0 / num_views) * total
  metrics = {"pos_logit": pos_logit / num_views, "neg_logit": neg_logit / num_views,
             "acc": acc / num_views, "num_false_negatives": dist.batch_mean(num_fn)}
  return loss, metrics
