"""Plain NumPy (float64) reference implementations of `jaxcontrast.losses`.

Written from docs/METHODS.md sections 1-6 only, independently of the library source, so that
the tests compare two implementations of the same formulas. Everything is computed in float64
with explicit loops where that makes the formula easier to read; speed does not matter here.

Each InfoNCE-like function returns `(loss, metrics)` with the metrics named as in the library;
the regularisers return the scalar value only. Inputs are converted to float64 first.
"""
from __future__ import annotations

import numpy as np


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def logsumexp(x, axis=-1):
  """Stable log(sum(exp(x))) along `axis`; rows of all -inf give -inf."""
  x = _f64(x)
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
  return np.squeeze(out, axis=axis)


def log_softmax(x):
  """log softmax along the last axis."""
  x = _f64(x)
  return x - logsumexp(x, axis=-1)[..., None]


def softmax(x):
  """softmax along the last axis."""
  return np.exp(log_softmax(x))


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps) along `axis`."""
  x = _f64(x)
  norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
  return x / np.maximum(norm, eps)


def top_k_mask(s, k):
  """tf.math.top_k's indices per row as a mask: exactly the k largest entries, a tie at the k-th
  value going to the lower index (a stable sort of -s). k larger than the row: every entry."""
  s = _f64(s)
  kk = min(int(k), s.shape[-1])
  order = np.argsort(-s, axis=-1, kind="stable")[..., :kk]
  mask = np.zeros(s.shape, dtype=bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return mask


def _infonce_metrics(logits, pos_col, neg_mask):
  """pos_logit, neg_logit, acc of an InfoNCE logits matrix.

  Args:
    logits: (B, C) logits (already divided by the temperature).
    pos_col: (B,) column of each row's positive.
    neg_mask: (B, C) bool, the negatives of each row.
  """
  b = logits.shape[0]
  pos = logits[np.arange(b), pos_col]
  negs = np.where(neg_mask, logits, -np.inf)
  metrics = {
      "pos_logit": float(np.mean(pos)),
      "acc": float(np.mean(pos >= np.max(negs, axis=1))),
  }
  if neg_mask.any():
    metrics["neg_logit"] = float(np.mean(logits[neg_mask]))
  return metrics


def _queue_logits(q, k, queue, temperature):
  """concat([q.k, q @ Q.T], 1) / temperature, shape (B, 1+K)."""
  l_pos = np.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ l2_normalize(queue).T
  return np.concatenate([l_pos, l_neg], axis=1) / temperature


def moco_infonce(query, key, queue=None, *, temperature=0.2):
  """MoCo v2 InfoNCE (METHODS section 1); queue=None: in-batch negatives, positive on diagonal."""
  q = l2_normalize(query)
  k = l2_normalize(key)
  b = q.shape[0]
  if queue is None:
    logits = q @ k.T / temperature
    pos_col = np.arange(b)
    neg_mask = ~np.eye(b, dtype=bool)
  else:
    logits = _queue_logits(q, k, queue, temperature)
    pos_col = np.zeros(b, dtype=int)
    neg_mask = np.zeros(logits.shape, dtype=bool)
    neg_mask[:, 1:] = True
  per_row = logsumexp(logits, axis=1) - logits[np.arange(b), pos_col]
  return float(np.mean(per_row)), _infonce_metrics(logits, pos_col, neg_mask)


def sce(query, key, queue, *, temperature=0.1, target_temperature=0.07, coeff=0.5,
        mask_self=False):
  """SCE, official-code semantics (METHODS section 2); mask_self=True: self column -inf."""
  q = l2_normalize(query)
  k = l2_normalize(key)
  queue = l2_normalize(queue)
  b = q.shape[0]
  lq = _queue_logits(q, k, queue, temperature)
  self_col = np.full((b, 1), -np.inf if mask_self else 0.0)
  lk = np.concatenate([self_col, k @ queue.T], axis=1) / target_temperature
  onehot = np.zeros_like(lq)
  onehot[:, 0] = 1.0
  w = coeff * onehot + (1.0 - coeff) * softmax(lk)
  loss = float(np.mean(-np.sum(w * log_softmax(lq), axis=1)))
  neg_mask = np.zeros(lq.shape, dtype=bool)
  neg_mask[:, 1:] = True
  return loss, _infonce_metrics(lq, np.zeros(b, dtype=int), neg_mask)


def _sym_kl(log_p, log_r):
  """Per-row 0.5 * KL(p||r) + 0.5 * KL(r||p)."""
  p = np.exp(log_p)
  r = np.exp(log_r)
  return 0.5 * np.sum(p * (log_p - log_r), axis=-1) + 0.5 * np.sum(r * (log_r - log_p), axis=-1)


def co2_consistency(query, key, queue, *, temperature=0.04, include_positive=False):
  """CO2 unweighted symmetric-KL regulariser (METHODS section 3)."""
  q = l2_normalize(query)
  k = l2_normalize(key)
  queue = l2_normalize(queue)
  sq = q @ queue.T
  sk = k @ queue.T
  if include_positive:
    pos = np.sum(q * k, axis=-1, keepdims=True)
    sq = np.concatenate([pos, sq], axis=1)
    sk = np.concatenate([pos, sk], axis=1)
  log_p = log_softmax(sq / temperature)
  log_r = log_softmax(sk / temperature)
  return float(np.mean(_sym_kl(log_p, log_r)))


def xmoco_cross_consistency(query, key, *, temperature=0.1, divergence="kl", pairs="query"):
  """XMoCo cross-similarity consistency (METHODS section 4a, our interpretation)."""
  q = l2_normalize(query)
  k = l2_normalize(key)
  b = q.shape[0]
  if b < 2:
    return 0.0
  sim_q = q @ (q if pairs == "query" else k).T
  sim_k = k @ k.T
  off = ~np.eye(b, dtype=bool)
  if divergence == "mse":
    return float(np.mean((sim_q[off] - sim_k[off]) ** 2))
  total = 0.0
  for i in range(b):
    lp = log_softmax(sim_q[i, off[i]] / temperature)
    lr = log_softmax(sim_k[i, off[i]] / temperature)
    total += np.sum(np.exp(lr) * (lr - lp))
  return float(total / b)


def xmoco_negative_uniformity(query, queue, *, temperature=0.2, per_sample=False):
  """XMoCo uniformity of the similarity over the negatives (METHODS section 4b)."""
  q = l2_normalize(query)
  queue = l2_normalize(queue)
  n_neg = queue.shape[0]
  log_p = log_softmax(q @ queue.T / temperature)  # (B, K)
  if per_sample:
    return float(np.mean(np.sum(np.exp(log_p) * (log_p + np.log(n_neg)), axis=1)))
  log_pbar = logsumexp(log_p, axis=0) - np.log(q.shape[0])  # (K,)
  return float(np.sum(np.exp(log_pbar) * (log_pbar + np.log(n_neg))))


def fnc_detect(key, support_keys, queue, *, threshold, top_k):
  """False-negative mask (B, K): max cosine over the key view and the S support views (None:
  none). The queue rows are normalised (the library's contract)."""
  views = _f64(key)[:, None, :]
  if support_keys is not None:
    views = np.concatenate([views, _f64(support_keys)], axis=1)  # (B, 1+S, D)
  queue = l2_normalize(queue)
  views = l2_normalize(views)
  s = np.max(np.einsum("bvd,kd->bvk", views, _f64(queue)), axis=1)  # (B, K)
  return (s > threshold) & top_k_mask(s, top_k)


def fnc(query, key, queue, support_keys=None, *, temperature=0.1, threshold=0.7, top_k=10,
        mode="attraction"):
  """FNC, MoCo-queue form (METHODS section 5): attraction or elimination.

  Metrics: pos_logit is the key column; neg_logit and acc here use all K queue columns, which is
  unambiguous only when nothing is detected (the tests compare them only in that case).
  """
  q = l2_normalize(query)
  k = l2_normalize(key)
  b = q.shape[0]
  fn = fnc_detect(key, support_keys, queue, threshold=threshold, top_k=top_k)
  logits = _queue_logits(q, k, queue, temperature)
  per_row = np.zeros(b)
  for i in range(b):
    if mode == "attraction":
      pos = np.concatenate([[True], fn[i]])
      per_row[i] = logsumexp(logits[i]) - np.mean(logits[i, pos])
    elif mode == "elimination":
      keep = np.concatenate([[True], ~fn[i]])
      per_row[i] = logsumexp(logits[i, keep]) - logits[i, 0]
    else:
      raise ValueError(mode)
  neg_mask = np.zeros(logits.shape, dtype=bool)
  neg_mask[:, 1:] = True
  metrics = _infonce_metrics(logits, np.zeros(b, dtype=int), neg_mask)
  metrics["num_false_negatives"] = float(np.mean(np.sum(fn, axis=1)))
  return float(np.mean(per_row)), metrics


def fnc_multiview_detect(target_views, queue, *, threshold, top_k):
  """(B, M) false-negative mask over the memory [E.reshape(V*B, D), queue] (own rows never)."""
  e = l2_normalize(target_views)
  v_count, b, d = e.shape
  rows = [e.reshape(v_count * b, d)] + ([] if queue is None else [l2_normalize(queue)])
  mem = np.concatenate(rows, axis=0)
  s = np.max(np.einsum("vbd,md->vbm", e, mem), axis=0)  # (B, M)
  for bi in range(b):
    for v in range(v_count):
      s[bi, v * b + bi] = -np.inf
  return (s > threshold) & top_k_mask(s, top_k), mem


def fnc_multiview(views, target_views, queue, *, temperature=0.1, threshold=0.7, top_k=10):
  """FNC official multi-view attraction form (METHODS section 5), scaled by 2/V.

  Metrics: num_false_negatives, and pos_logit as the mean over (anchor view a, image b, other
  view v != a) of Z[a,b].E[v,b] / tau (the false negatives are not included).
  """
  z = l2_normalize(views)
  v_count, b, _ = z.shape
  fn, mem = fnc_multiview_detect(target_views, queue, threshold=threshold, top_k=top_k)
  total = 0.0
  pos_logits = []
  for a in range(v_count):
    logits = z[a] @ mem.T / temperature  # (B, M)
    loss_a = 0.0
    for bi in range(b):
      own = a * b + bi
      den = np.delete(logits[bi], own)
      pos = fn[bi].copy()
      for v in range(v_count):
        if v != a:
          pos[v * b + bi] = True
          pos_logits.append(logits[bi, v * b + bi])
      loss_a += logsumexp(den) - np.mean(logits[bi, pos])
    total += loss_a / b
  metrics = {"num_false_negatives": float(np.mean(np.sum(fn, axis=1)))}
  if pos_logits:
    metrics["pos_logit"] = float(np.mean(pos_logits))
  return float(2.0 / v_count * total), metrics


def multi_positive_infonce(query, key, queue, positive_mask, *, temperature=0.2):
  """Multi-positive InfoNCE: loss_i = logsumexp(logits_i) - mean over positives of logits_i.

  The key column is always a positive; positive_mask (B, K) marks extra positives in the queue.
  Metrics as in `fnc` (neg_logit/acc over all queue columns: compared only for an empty mask).
  """
  q = l2_normalize(query)
  k = l2_normalize(key)
  b = q.shape[0]
  mask = np.asarray(positive_mask, dtype=bool)
  logits = _queue_logits(q, k, queue, temperature)
  per_row = np.zeros(b)
  for i in range(b):
    pos = np.concatenate([[True], mask[i]])
    per_row[i] = logsumexp(logits[i]) - np.mean(logits[i, pos])
  neg_mask = np.zeros(logits.shape, dtype=bool)
  neg_mask[:, 1:] = True
  return float(np.mean(per_row)), _infonce_metrics(logits, np.zeros(b, dtype=int), neg_mask)


def nt_xent(view1, view2, *, temperature=0.1):
  """SimCLR NT-Xent over 2N anchors: z = [n(view1); n(view2)], row i's positive is the other
  view of its image, its negatives the 2N - 2 other rows; loss and metrics, loop per anchor."""
  z = np.concatenate([l2_normalize(view1), l2_normalize(view2)])
  n2 = z.shape[0]
  n = n2 // 2
  logits = z @ z.T / temperature
  per_row, pos, neg, acc = [], [], [], []
  for i in range(n2):
    p = (i + n) % n2
    others = [j for j in range(n2) if j != i]
    negs = [j for j in others if j != p]
    per_row.append(logsumexp(logits[i, others]) - logits[i, p])
    pos.append(logits[i, p])
    neg.extend(logits[i, negs])
    acc.append(float(not negs or logits[i, p] >= np.max(logits[i, negs])))
  metrics = {"pos_logit": float(np.mean(pos)), "acc": float(np.mean(acc)),
             "neg_logit": float(np.mean(neg)) if neg else 0.0}
  return float(np.mean(per_row)), metrics


def nt_xent_grad(view1, view2, *, temperature=0.1, stop_gradient=False):
  """Analytic d NT-Xent / d (view1, view2). With s_ij = z_i . c_j / tau, c = z (the columns)
  and G_ij = dL/ds_ij = (softmax_{j != i}(s_i)_j - [j = pos(i)]) / 2N:
      dL/dz = (G @ c + [not stop_gradient] G.T @ z) / tau
  then through z = x / |x|: dL/dx = (dL/dz - z (z . dL/dz)) / |x|."""
  x = np.concatenate([_f64(view1), _f64(view2)])
  norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
  z = x / norm
  n2 = z.shape[0]
  s = z @ z.T / temperature
  np.fill_diagonal(s, -np.inf)
  g = softmax(s)
  g[np.arange(n2), (np.arange(n2) + n2 // 2) % n2] -= 1.0
  g /= n2
  dz = g @ z / temperature
  if not stop_gradient:
    dz = dz + g.T @ z / temperature
  dx = (dz - z * np.sum(z * dz, axis=-1, keepdims=True)) / norm
  return dx[:n2 // 2], dx[n2 // 2:]


def numerical_grad(f, x, h=1e-6):
  """Central finite differences of scalar f at x (float64), same shape as x."""
  x = _f64(x).copy()
  g = np.zeros_like(x)
  flat = x.reshape(-1)
  gflat = g.reshape(-1)
  for i in range(flat.size):
    orig = flat[i]
    flat[i] = orig + h
    fp = f(x)
    flat[i] = orig - h
    fm = f(x)
    flat[i] = orig
    gflat[i] = (fp - fm) / (2 * h)
  return g
