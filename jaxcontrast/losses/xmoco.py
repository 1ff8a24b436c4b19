"""XMoCo regularisers (Seyfi et al., IEEE TCSVT 2022).

INTERPRETATION: only the abstract of XMoCo is public. It asks that (a) the similarity of any pair
of images be preserved under the pretext transformations and (b) the similarity to the negatives
be uniformly distributed across a batch. The formulas below are jaxcontrast's reading of those two
sentences (METHODS.md section 4), not the authors' code; their defaults are unverified.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jax import lax

from jaxcontrast.losses import _core


def xmoco_cross_consistency(query: jax.Array, key: jax.Array, *, temperature: float = 0.1,
                            divergence: str = "kl", pairs: str = "query",
                            axis_name: Optional[str] = None,
                            precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """Cross-similarity consistency over the global batch (interpretation, see module docstring).

  The similarity of image i to image j under view 1 (online) should match the same similarity
  under view 2 (target), for every pair i != j:

      q = n(query); k = sg(n(key))                       # (Bg, D), gathered over devices
      S_q = q @ q.T    (pairs="query")  |  q @ k.T  (pairs="cross")
      S_k = k @ k.T
      divergence="kl":  reg = mean_i KL(softmax(S_k[i, j!=i] / tau) || softmax(S_q[i, j!=i] / tau))
      divergence="mse": reg = mean_{i != j} (S_q[i, j] - S_k[i, j])^2      (raw cosines)

  A global batch of one has no pairs: the value is 0.

  Args:
    query: (B, D) online embeddings of view 1 (normalised here).
    key: (B, D) target embeddings of view 2 (normalised here; no gradient).
    temperature: tau_x (> 0; 0.1, unverified) of the "kl" divergence.
    divergence: "kl" (default) or "mse".
    pairs: "query" (S_q = q @ q.T, default) or "cross" (q @ k.T).
    axis_name: mesh axis inside `jax.shard_map`; query and key split over it (the pairs are
      taken over the global batch).
    precision: of the similarity products (default `lax.Precision.HIGHEST`, see
      `moco_infonce`).

  Returns:
    (reg, metrics) with metrics `cross_consistency` (the same value).
  """
  _core.check_pair(query, key)
  _core.check_temperature(temperature)
  _core.check_choice(divergence, "divergence", {"kl", "mse"})
  _core.check_choice(pairs, "pairs", {"query", "cross"})
  dist = _core.Dist(axis_name, query.shape[0])
  dist.check_split(query=query, key=key)
  q, k = _core.prepare(query, key, dist)
  if q.shape[0] == 1:
    per_row = jnp.zeros((1,), q.dtype) * jnp.sum(q)  # keeps the (zero) dependence on query
  else:
    s_q = _core.off_diagonal(_core.sim(q, q if pairs == "query" else k, precision))
    s_k = _core.off_diagonal(_core.sim(k, k, precision))
    if divergence == "kl":
      log_p = jax.nn.log_softmax(s_q / temperature, axis=-1)
      log_r = jax.nn.log_softmax(s_k / temperature, axis=-1)
      per_row = jnp.sum(jnp.exp(log_r) * (log_r - log_p), axis=-1)
    else:
      per_row = jnp.mean(jnp.square(s_q - s_k), axis=-1)
  reg = dist.batch_mean(per_row)
  return reg, {"cross_consistency": jax.lax.stop_gradient(reg)}


def xmoco_negative_uniformity(query: jax.Array, queue: jax.Array, *, temperature: float = 0.2,
                              per_sample: bool = False, axis_name: Optional[str] = None,
                              queue_valid: Optional[jax.Array] = None,
                              normalize_queue: bool = True,
                              precision: lax.PrecisionLike = _core.HIGHEST
                              ) -> _core.LossOutput:
  """Uniform similarity over the negatives across the batch (interpretation, see module docstring).

      p_i  = softmax(n(query_i) @ sg(n(queue)).T / tau)       # (Bg, K)
      pbar = mean_i p_i                                        # (K,)
      reg  = KL(pbar || uniform) = sum_j pbar_j log(K pbar_j)  # >= 0, 0 iff pbar is uniform
  `per_sample=True`: reg = mean_i KL(p_i || uniform) instead.

  Computed in log space (log pbar = logsumexp_i log p_ij - log Bg), so negatives no query
  looks at give 0 * log 0 = 0 without NaNs. With `axis_name` each device reduces its own K/n
  columns and one psum adds them.

  Args:
    query: (B, D) online embeddings (normalised here).
    queue: (K, D) negatives, rows L2-normalised here unless `normalize_queue=False` (see
      `moco_infonce`); with `axis_name`, this device's K/n rows.
    temperature: tau_u (> 0; 0.2, unverified).
    per_sample: mean of the per-anchor divergences instead of the batch mean's (default False).
    axis_name: mesh axis inside `jax.shard_map`; query, queue and queue_valid split over it.
    queue_valid: optional (K,) bool (see `moco_infonce`): unfilled rows are left out, K becomes
      the number of valid rows; with none the regulariser is 0.
    normalize_queue: as `moco_infonce`.
    precision: of the similarity products (default `lax.Precision.HIGHEST`, see
      `moco_infonce`).

  Returns:
    (reg, metrics) with metrics `negative_uniformity` (the same value).
  """
  _core.check_matrix(query, "query")
  if queue is None:
    raise ValueError("xmoco_negative_uniformity needs a queue (got queue=None)")
  _core.check_queue(queue, query.shape[1])
  _core.check_temperature(temperature)
  per_sample = _core.static_bool(per_sample, "per_sample")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  dist = _core.Dist(axis_name, query.shape[0])
  dist.check_split(query=query, queue=queue, queue_valid=queue_valid)
  q, _ = _core.prepare(query, None, dist)
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  logits = _core.sim(q, block, precision) / temperature                     # (Bg, K_local)
  logits = _core.mask_columns(logits, valid)
  log_p = logits - _core.split_logsumexp(None, logits, dist)[:, None]
  count = _core.num_valid(logits, valid, dist)
  log_k = math.log(count) if valid is None else jnp.log(jnp.maximum(count, 1.0))
  if per_sample:
    terms = _core.mask_columns(jnp.exp(log_p) * (log_p + log_k), valid, 0.0)
    reg = dist.batch_mean(_core.split_sum(None, terms, dist))
  else:
    log_pbar = jax.nn.logsumexp(log_p, axis=0) - math.log(log_p.shape[0])
    terms = jnp.exp(log_pbar) * (log_pbar + log_k)
    reg = dist.psum(jnp.sum(terms if valid is None else jnp.where(valid, terms, 0.0)))
  return reg, {"negative_uniformity": jax.lax.stop_gradient(reg)}
