"""CO2: consistency contrast (Wei et al., ICLR 2021)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax import lax

from jaxcontrast.losses import _core


def co2_consistency(query: jax.Array, key: jax.Array, queue: jax.Array, *,
                    temperature: float = 0.04, include_positive: bool = False,
                    axis_name: Optional[str] = None, queue_valid: Optional[jax.Array] = None,
                    normalize_queue: bool = True,
                    precision: lax.PrecisionLike = _core.HIGHEST) -> _core.LossOutput:
  """CO2 consistency regulariser: symmetric KL between the query's and the key's similarity
  distributions over the same negatives (the key's acts as a pseudo-label).

      q = n(query); k = sg(n(key)); Q = sg(n(queue))
      log_p = log_softmax(q @ Q.T / tau_con)          # query vs the negatives, K-way
      log_r = log_softmax(k @ Q.T / tau_con)          # key vs the same negatives
      reg   = mean_i(0.5 KL(p_i || r_i) + 0.5 KL(r_i || p_i))
            = mean_i(0.5 sum_j (p_ij - r_ij)(log p_ij - log r_ij))

  `include_positive=True` reproduces lightly's `CO2Regularizer`: (1+K)-way distributions whose
  column 0 is the positive logit q.k in both (`[q.k, q@Q.T]` and `[q.k, k@Q.T]`, each / tau_con).
  That column depends on the query, so it carries gradient in both distributions. Unlike
  lightly's implementation (which wraps the value in `torch.tensor`, detaching it) this one has a
  gradient.

  The value returned is unweighted: the objective multiplies it by alpha. tau_con (0.04) and
  alpha (10 on MoCo v1) come from the paper's text and are *unverified* (no official code).

  Args:
    query: (B, D) online embeddings (normalised here).
    key: (B, D) target embeddings of the other view (normalised here; no gradient).
    queue: (K, D) negatives, rows L2-normalised here unless `normalize_queue=False` (see
      `moco_infonce`); with `axis_name`, this device's K/n rows.
    temperature: tau_con (> 0; 0.04, the paper's, unverified).
    include_positive: lightly's (1+K)-way variant (default False: the paper's K-way form).
    axis_name: mesh axis inside `jax.shard_map`; query, key, queue, queue_valid split over it.
    queue_valid: optional (K,) bool (see `moco_infonce`): unfilled queue rows are left out of
      both distributions; with no valid row (and no positive column) the regulariser is 0.
    normalize_queue: as `moco_infonce`.
    precision: of the similarity products (default `lax.Precision.HIGHEST`, see
      `moco_infonce`).

  Returns:
    (reg, metrics) with metrics `symmetric_kl` (the same value, for logging).
  """
  _core.check_pair(query, key)
  if queue is None:
    raise ValueError("co2_consistency needs a queue (got queue=None)")
  _core.check_queue(queue, query.shape[1])
  _core.check_temperature(temperature)
  include_positive = _core.static_bool(include_positive, "include_positive")
  normalize_queue = _core.static_bool(normalize_queue, "normalize_queue")
  dist = _core.Dist(axis_name, query.shape[0])
  dist.check_split(query=query, key=key, queue=queue, queue_valid=queue_valid)
  q, k = _core.prepare(query, key, dist)
  block = _core.queue_block(queue, normalize_queue, queue_valid)
  valid = _core.check_queue_valid(queue_valid, queue.shape[0])
  lp = _core.mask_columns(_core.sim(q, block, precision) / temperature, valid)
  lr = _core.mask_columns(_core.sim(k, block, precision) / temperature, valid)
  head = jnp.sum(q * k, axis=-1, keepdims=True) / temperature if include_positive else None
  lse_p = _core.split_logsumexp(head, lp, dist)[:, None]
  lse_r = _core.split_logsumexp(head, lr, dist)[:, None]
  # (p - r)(log p - log r), summed over columns, is KL(p||r) + KL(r||p).
  sym = lambda log_a, log_b: (jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b)
  head_terms = sym(head - lse_p, head - lse_r) if include_positive else None
  block_terms = _core.mask_columns(sym(lp - lse_p, lr - lse_r), valid, 0.0)
  per_row = 0.5 * _core.split_sum(head_terms, block_terms, dist)
  reg = dist.batch_mean(per_row)
  return reg, {"symmetric_kl": jax.lax.stop_gradient(reg)}
