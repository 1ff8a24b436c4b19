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

from jaxcontrast.losses import _core


def xmoco_cross_consistency(query: jax.Array, key: jax.Array, *, temperature: float = 0.1,
                            divergence: str = "kl", pairs: str = "query",
                            axis_name: Optional[str] = None, precision=_core.HIGHEST):
  """Cross-similarity consistency over the global batch (interpretation, see module docstring).

  The similarity of image i to image j under view 1 (online) should match the same similarity
  under view 2 (target), for every pair i != j:

      q = n(query); k = sg(n(key))                       # (Bg, D), gathered over devices
      S_q = q @ q.T    (pairs="query")  |  q @ k.T  (pairs="cross")
      S_k = k @ k.T
      divergence="kl":  reg = mean_i KL(softmax(S_k[i, j!=i] / tau) || softmax(S_q[i, j!=i] / tau))
      divergence="mse": reg = mean_{i != j} (S_q[i, j] - S_k[i, j])^2      (raw cosines)

  A global batch of one has no pairs: the value is 0. `precision`: of the similarity products
  (default `lax.Precision.HIGHEST`, see `moco_infonce`).

  Returns:
    (reg, metrics) with metrics `cross_consistency` (the same value).
  """
  _core.check_pair(query, key)
  _core.check_temperature(temperature)
  _core.check_choice(divergence, "divergence", {"kl", "mse"})
  _core.check_choice(pairs, "pairs", {"query", "cross"})
  dist = _core.Dist(axis_name, query.shape[0])
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
                              queue_valid: Optional[jax.Array] = None, precision=_core.HIGHEST):
  """Uniform similarity over the negatives across the batch (interpretation, see module docstring).

      p_i  = softmax(n(query_i) @ sg(queue).T / tau)          # (Bg, K)
      pbar = mean_i p_i                                        # (K,)
      reg  = KL(pbar || uniform) = sum_j pbar_j log(K pbar_j)  # >= 0, 0 iff pbar is uniform
  `per_sample=True`: reg = mean_i KL(p_i || uniform) instead.

  Computed in log space (log pbar = logsumexp_i log p_ij - log Bg), so negatives no query
  looks at give 0 * log 0 = 0 without NaNs. With `axis_name` each device reduces its own K/n
  columns and one psum adds them. `queue_valid` (optional, see `moco_infonce`) leaves unfilled
  rows out: K becomes the number of valid rows; with none the regulariser is 0. `precision`: of
  the similarity products (default `lax.Precision.HIGHEST`, see `moco_infonce`).

  Returns:
    (reg, metrics) with metrics `negative_uniformity` (the same value).
  """
  _core.check_matrix(query, "query")
  _core.check_queue(queue, query.shape[1])
  _core.check_temperature(temperature)
  dist = _core.Dist(axis_name, query.shape[0])
  q, _ = _core.prepare(query, None, dist)
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  logits = _core.sim(q, _core.queue_block(queue), precision) / temperature   # (Bg, K_local)
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
