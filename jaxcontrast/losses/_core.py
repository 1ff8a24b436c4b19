"""Shared machinery of the losses: input checks, normalisation, and reductions over columns that
may be split across devices.

Layout of the logits in every queue-based loss. Rows are the *global* batch (on one device that is
just the batch). Columns come in two parts:
  * a `head` of columns every device can compute itself (the positive logit, in-batch keys), and
  * a `block` of queue columns: the whole queue on one device, or this device's K/n rows of it
    when the loss runs inside `jax.shard_map` with `axis_name` (the K-sharded queue).
Reductions over columns (log-sum-exp, sums, maxima, top-k) therefore combine a local part over the
head with a collective over the blocks; nothing of size K x D ever moves between devices.

Why every device computes all Bg rows: the block needs every query (Bg x D, small), and the head
is cheap. The final mean over the batch then takes only this device's own rows and `psum`s them,
which (a) makes the result replicated, and (b) routes each row's gradient back exactly once.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
# What every public loss returns: the scalar loss and a dict of scalar metrics.
LossOutput = tuple[jax.Array, dict[str, jax.Array]]


# Similarity products run at full float32 precision unless the caller asks otherwise: XLA's
# default is TF32 on GPU and one bfloat16 pass on TPU (~3 significant digits), which a
# temperature of 0.04-0.2 magnifies into 1e-3 relative errors in the loss.
HIGHEST = lax.Precision.HIGHEST


def sim(a: Array, b: Array, precision: lax.PrecisionLike) -> Array:
  """a @ b.T at `precision` (None = the backend default)."""
  return jnp.matmul(a, b.T, precision=precision)


def l2_normalize(x: Array, *, axis: int = -1, eps: float = 1e-12) -> Array:
  """Row-wise L2 normalisation, `x / max(||x||_2, eps)` (as torch.nn.functional.normalize).

  A correctly rounded square root and division (not an approximate reciprocal square root), so
  equal rows give equal results wherever they sit in the array: exact duplicates stay exact
  ties for the similarity searches (mining, kNN, FNC's top-k)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def as_float(x: Array) -> Array:
  """Promote low-precision floats (bfloat16, float16) to float32; softmaxes stay in float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------- input checks


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def concrete_scalar(value, name: str) -> Optional[float]:
  """The float value of a concrete scalar hyper-parameter (Python, NumPy or JAX scalar), or None
  when it is traced (a schedule inside `jax.jit`): only concrete values can be checked."""
  if _is_traced(value):
    return None
  try:
    arr = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{name} must be a real scalar, got {value!r}") from e
  if arr.ndim != 0 or arr.dtype.kind not in "biuf":
    raise ValueError(f"{name} must be a real scalar, got {value!r}")
  return float(arr)


def check_temperature(value, name: str = "temperature") -> None:
  """A concrete temperature must be a finite number > 0, whatever its type; traced values are not
  checked."""
  v = concrete_scalar(value, name)
  if v is not None and not (v > 0 and math.isfinite(v)):
    raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def check_threshold(value, name: str = "threshold") -> None:
  """A concrete threshold must not be NaN (every comparison with NaN is False)."""
  v = concrete_scalar(value, name)
  if v is not None and math.isnan(v):
    raise ValueError(f"{name} must be a number, got NaN")


def check_unit_interval(value, name: str) -> None:
  v = concrete_scalar(value, name)
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {v!r}")


def _static_error(name: str, value) -> ValueError:
  return ValueError(f"{name} must be a static Python value, got the traced {value!r}: under "
                    f"jax.jit pass it in static_argnames (e.g. jax.jit(fn, static_argnames="
                    f"('{name}',))) or close over it")


def static_int(value, name: str, minimum: int = 1) -> int:
  """A static integer option (Python or NumPy integer) >= minimum."""
  if _is_traced(value):
    raise _static_error(name, value)
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  try:
    out = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
  if out < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return out


def static_bool(value, name: str) -> bool:
  """A static boolean option (Python or NumPy bool)."""
  if _is_traced(value):
    raise _static_error(name, value)
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}")
  return bool(value)


def check_matrix(x, name: str) -> None:
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"{name} must have shape (rows, dim), got shape {getattr(x, 'shape', None)}")


def check_pair(query, key, names: tuple[str, str] = ("query", "key")) -> None:
  a, b = names
  check_matrix(query, a)
  check_matrix(key, b)
  if query.shape != key.shape:
    raise ValueError(f"{a} and {b} must have the same shape, got {a} {query.shape} and {b} "
                     f"{key.shape}")


def check_queue(queue, dim: int) -> None:
  check_matrix(queue, "queue")
  if queue.shape[1] != dim:
    raise ValueError(f"queue must have shape (K, {dim}) to match the embedding dim, got "
                     f"{queue.shape}")
  if queue.shape[0] < 1:
    raise ValueError("queue must have at least one row")


def check_choice(value, name: str, choices) -> None:
  if _is_traced(value):
    raise _static_error(name, value)
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


# ----------------------------------------------------------------------------- distribution


def _varying_axes(x) -> Optional[frozenset]:
  """The manual mesh axes `x` varies over inside `jax.shard_map` (check_vma=True), or None when
  this JAX does not say."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None and hasattr(manual, "varying"):
    return frozenset(manual.varying)
  vma = getattr(aval, "vma", None)
  return None if vma is None else frozenset(vma)


@dataclasses.dataclass(frozen=True)
class Dist:
  """The layout: one device (`axis_name=None`) or the batch and queue split over a mesh axis.

  Under a mesh axis the functions run inside `jax.shard_map`: `local_batch` rows of the batch and
  K/n rows of the queue live on each device.
  """
  axis_name: Optional[str]
  local_batch: int

  @property
  def size(self) -> int:
    return 1 if self.axis_name is None else lax.axis_size(self.axis_name)

  @property
  def global_batch(self) -> int:
    return self.local_batch * self.size

  def psum(self, x):
    return x if self.axis_name is None else lax.psum(x, self.axis_name)

  def pmax(self, x):
    return x if self.axis_name is None else lax.pmax(x, self.axis_name)

  def gather(self, x: Array, axis: int = 0) -> Array:
    """The global batch from each device's rows, concatenated in device order."""
    if self.axis_name is None:
      return x
    return lax.all_gather(x, self.axis_name, axis=axis, tiled=True)

  def row_offset(self):
    """Index in the global batch of this device's first row."""
    if self.axis_name is None:
      return 0
    return lax.axis_index(self.axis_name) * self.local_batch

  def check_split(self, **arrays) -> None:
    """Inside `jax.shard_map` with `axis_name`: every array given must vary over that axis
    (split over it, as the docstrings' layouts say). A replicated one (in_specs `P()`) would be
    counted once per device, so the loss would be taken over n tiled copies of it: an error,
    raised at trace time from the arrays' varying manual axes. Needs `check_vma=True` (the
    default of `jax.shard_map`); without it JAX does not track them and nothing is checked."""
    if self.axis_name is None:
      return
    axis = self.axis_name
    if axis not in (_varying_axes(lax.axis_index(axis)) or ()):
      return  # check_vma=False: no varying-axis information to check against
    for name, x in arrays.items():
      if x is None:
        continue
      varying = _varying_axes(x)
      if varying is not None and axis not in varying:
        raise ValueError(
            f"{name} does not vary over mesh axis {axis!r}: it is replicated (shard_map in_specs "
            f"P() or computed from replicated values), so each of the {self.size} devices would "
            f"count the same rows and the loss would see {name} tiled {self.size} times. Split "
            f"it over {axis!r} (see the layout in the docstring), or call without axis_name.")

  def batch_mean(self, per_row: Array) -> Array:
    """Mean over the global batch of a per-row quantity computed for all Bg rows.

    Only this device's own rows enter its partial sum, so the psum counts each row once and the
    gradient of each row flows back once (not n times).
    """
    if self.axis_name is None:
      return jnp.mean(per_row)
    mine = lax.dynamic_slice_in_dim(per_row, self.row_offset(), self.local_batch, axis=0)
    return lax.psum(jnp.sum(mine), self.axis_name) / self.global_batch


def split_logsumexp(head: Optional[Array], block: Optional[Array], dist: Dist) -> Array:
  """Row-wise log-sum-exp over the columns `[head | block_0 | ... | block_{n-1}]`.

  Distributed log-sum-exp: the shift `m` is the global row maximum (pmax of a stop-gradient
  value, so it carries no gradient and needs none), then one psum of the shifted exponentials.
  Columns equal to -inf contribute nothing; at least one column of each row must be finite.
  """
  shift = split_max(head, block, dist)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = 0.0
  if block is not None:
    total = dist.psum(jnp.sum(jnp.exp(block - shift[:, None]), axis=-1))
  if head is not None:
    total = total + jnp.sum(jnp.exp(head - shift[:, None]), axis=-1)
  return shift + jnp.log(total)


def split_sum(head: Optional[Array], block: Optional[Array], dist: Dist) -> Array:
  """Row-wise sum over `[head | all blocks]`."""
  total = 0.0
  if block is not None:
    total = dist.psum(jnp.sum(block, axis=-1))
  if head is not None:
    total = total + jnp.sum(head, axis=-1)
  return total


def split_max(head: Optional[Array], block: Optional[Array], dist: Dist) -> Array:
  """Row-wise maximum over `[head | all blocks]` (no gradient: used for metrics and top-k)."""
  out = None
  if block is not None:
    out = dist.pmax(lax.stop_gradient(jnp.max(block, axis=-1)))
  if head is not None:
    head_max = lax.stop_gradient(jnp.max(head, axis=-1))
    out = head_max if out is None else jnp.maximum(out, head_max)
  return out


def split_kth_largest(head: Optional[Array], block: Optional[Array], k: int, dist: Dist) -> Array:
  """Row-wise k-th largest value over `[head | all blocks]` (k clipped to the column count).

  Sharded top-k: a local top-k of each block, gathered (n * k values per row), then a final
  top-k. No gradient.
  """
  parts = []
  if block is not None:
    local_k = min(k, block.shape[-1])
    values, _ = lax.top_k(lax.stop_gradient(block), local_k)
    parts.append(dist.gather(values, axis=1))
  if head is not None:
    parts.append(lax.stop_gradient(head))
  candidates = jnp.concatenate(parts, axis=-1)
  values, _ = lax.top_k(candidates, min(k, candidates.shape[-1]))
  return values[:, -1]


def split_top_k_mask(head: Optional[Array], block: Optional[Array], k: int, dist: Dist
                     ) -> tuple[Optional[Array], Optional[Array]]:
  """Row-wise membership of the k largest values of `[head | all blocks]`: exactly k per row
  (every column when there are fewer), ties at the k-th value going to the lower global column
  index, as `tf.math.top_k` (FNC's official code) and `lax.top_k` order them. Global column
  order: the head's columns, then the blocks in device order. No gradient.

      kth   = k-th largest value of the row
      keep  = (s > kth) | (s == kth & rank among the row's ties <= k - #(s > kth))

  Returns (in_head, in_block) boolean masks shaped like `head` and `block` (None for None).
  """
  head = None if head is None else lax.stop_gradient(head)
  block = None if block is None else lax.stop_gradient(block)
  kth = split_kth_largest(head, block, k, dist)[:, None]
  greater = 0
  if head is not None:
    greater = greater + jnp.sum(head > kth, axis=-1)
  if block is not None:
    greater = greater + dist.psum(jnp.sum(block > kth, axis=-1))
  room = (k - greater)[:, None]            # ties admitted, lowest global index first
  in_head = in_block = None
  ties_before = jnp.zeros(kth.shape, jnp.int32)
  if head is not None:
    tie = head == kth
    in_head = (head > kth) | (tie & (jnp.cumsum(tie, axis=-1) <= room))
    ties_before = ties_before + jnp.sum(tie, axis=-1, keepdims=True)
  if block is not None:
    tie = block == kth
    if dist.axis_name is not None:       # ties on the devices before this one
      counts = lax.all_gather(jnp.sum(tie, axis=-1), dist.axis_name)         # (n, Bg)
      earlier = jnp.arange(counts.shape[0])[:, None] < lax.axis_index(dist.axis_name)
      ties_before = ties_before + jnp.sum(jnp.where(earlier, counts, 0), axis=0)[:, None]
    in_block = (block > kth) | (tie & (ties_before + jnp.cumsum(tie, axis=-1) <= room))
  return in_head, in_block


def infonce_metrics(pos: Array, neg_sum: Array, neg_count: int, neg_max: Array,
                    dist: Dist) -> dict:
  """Mean positive logit, mean negative logit, and the fraction of rows whose positive is ranked
  first (positive >= every negative). All arguments are per-row over the global batch."""
  metrics = {"pos_logit": dist.batch_mean(lax.stop_gradient(pos))}
  if isinstance(neg_count, int) and neg_count == 0:
    # A global batch of one with in-batch negatives: nothing to rank against.
    metrics["neg_logit"] = jnp.zeros((), pos.dtype)
    metrics["acc"] = jnp.ones((), pos.dtype)
  else:  # A traced count (masked queue) may be 0: then neg_sum is 0 and neg_max is MASKED.
    metrics["neg_logit"] = dist.batch_mean(lax.stop_gradient(neg_sum) / jnp.maximum(neg_count, 1))
    metrics["acc"] = dist.batch_mean((lax.stop_gradient(pos) >= neg_max).astype(jnp.float32))
  return metrics


def prepare(query: Array, key: Optional[Array], dist: Dist, stop_gradient: bool = True):
  """Normalised float32 query (with gradient) and key (without, unless `stop_gradient` is False),
  gathered to the global batch."""
  q = dist.gather(l2_normalize(as_float(query)))
  if key is None:
    return q, None
  k = l2_normalize(as_float(key))
  k = dist.gather(lax.stop_gradient(k) if stop_gradient else k)
  return q, k


# The logit of a masked (unfilled) queue row: finite, so 0 * MASKED stays 0 where -inf would give
# NaN, and far enough below any real logit (|l| <= 1 / temperature) that exp underflows to 0.
MASKED = -1e30


def check_queue_valid(queue_valid, rows: int) -> Optional[Array]:
  """None, or the (rows,) boolean mask of queue rows holding real keys, without gradient."""
  if queue_valid is None:
    return None
  if getattr(queue_valid, "shape", None) != (rows,):
    raise ValueError(f"queue_valid must have shape ({rows},) (one flag per queue row on this "
                     f"device), got {getattr(queue_valid, 'shape', None)}")
  return lax.stop_gradient(jnp.asarray(queue_valid, bool))


def mask_columns(logits: Array, valid: Optional[Array], fill: float = MASKED) -> Array:
  """(Bg, K_local) logits with the columns of invalid queue rows set to `fill`."""
  return logits if valid is None else jnp.where(valid[None, :], logits, fill)


def num_valid(block: Array, valid: Optional[Array], dist: Dist):
  """How many queue columns count, over all devices: an int, or a scalar array when masked."""
  if valid is None:
    return block.shape[1] * dist.size
  return dist.psum(jnp.sum(valid.astype(jnp.float32)))


def negative_metrics(pos: Array, neg: Array, valid: Optional[Array], dist: Dist) -> dict:
  """`infonce_metrics` over the valid queue columns of `neg` (Bg, K_local)."""
  neg_sum = split_sum(None, neg if valid is None else jnp.where(valid[None, :], neg, 0.0), dist)
  return infonce_metrics(pos, neg_sum, num_valid(neg, valid, dist), split_max(None, neg, dist),
                         dist)


# How far from 1 the norm of a queue row passed with `normalize_queue=False` may be: float32
# rounding of a normalised row is ~1e-7; a bfloat16 one ~4e-3.
UNIT_ROW_TOLERANCE = 1e-2


def queue_block(queue: Array, normalize: bool = True, valid: Optional[Array] = None) -> Array:
  """The (local rows of the) queue as float32, without gradient, rows L2-normalised unless
  `normalize` is False: then the caller promises unit rows, which is checked when the queue is
  concrete (an eager call; inside `jax.jit` it cannot be), rows with `valid` False excepted."""
  block = as_float(queue)
  if normalize:
    return lax.stop_gradient(l2_normalize(block))
  if not _is_traced(block) and (valid is None or not _is_traced(valid)):
    norms = np.linalg.norm(np.asarray(block, np.float64), axis=-1)
    bad = np.abs(norms - 1.0) > UNIT_ROW_TOLERANCE
    if valid is not None and np.shape(valid) == bad.shape:  # else check_queue_valid raises
      bad &= np.asarray(valid, bool)
    if bad.any():
      row = int(np.argmax(bad))
      raise ValueError(f"queue rows must be L2-normalised with normalize_queue=False: row {row} "
                       f"has norm {norms[row]:.4g} ({int(bad.sum())} rows off); pass "
                       f"normalize_queue=True (the default) to normalise them in the loss")
  return lax.stop_gradient(block)


def off_diagonal(x: Array) -> Array:
  """(N, N) -> (N, N-1): each row without its diagonal element."""
  n = x.shape[0]
  return x.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


# ----------------------------------------------------------------------------- shared losses


def max_similarity(views: Array, block: Array, precision: lax.PrecisionLike) -> Array:
  """max over views v of views[:, v] @ block.T, one view at a time: (Bg, V, D) x (K, D) ->
  (Bg, K) without materialising (Bg, V, K)."""
  sims = sim(views[:, 0], block, precision)
  for v in range(1, views.shape[1]):
    sims = jnp.maximum(sims, sim(views[:, v], block, precision))
  return sims


def detect_false_negatives(views: Array, queue_block: Array, *, threshold, top_k: int,
                           dist: Dist, head_similarity=None, valid=None,
                           precision: lax.PrecisionLike = HIGHEST):
  """FNC detection (official code): the max cosine similarity of each candidate to any of the
  anchor's target views, kept when above `threshold` and among the row's `top_k`.

      s  = max_v views[:, v] @ candidates.T
      fn = (s > threshold) & top_k(s, top_k)

  `top_k` is the official code's `tf.math.top_k` indices: exactly k candidates per row, a tie at
  the k-th value going to the lower index (head columns, then the queue rows in order). Rows
  with `valid` False are not candidates. Returns (fn_head, fn_block) boolean masks (no gradient).
  """
  s_block = mask_columns(max_similarity(views, queue_block, precision), valid, -jnp.inf)
  top_head, top_block = split_top_k_mask(head_similarity, s_block, top_k, dist)
  fn_block = (s_block > threshold) & top_block
  fn_head = None
  if head_similarity is not None:
    fn_head = (head_similarity > threshold) & top_head
  return fn_head, fn_block


def multi_positive_from_logits(pos: Array, neg: Array, mask: Array, dist: Dist,
                               valid: Optional[Array] = None):
  """Multi-positive InfoNCE from the positive logit (Bg,) and the queue logits (Bg, K_local):
  `loss_i = logsumexp(logits_i) - mean_{c in {0} U mask_i} logits_i[c]`. Shared by
  `multi_positive_infonce` and FNC attraction."""
  if valid is not None:
    mask = mask & valid[None, :]
  lse = split_logsumexp(pos[:, None], neg, dist)
  num_pos = split_sum(None, mask.astype(neg.dtype), dist)
  pos_sum = pos + split_sum(None, jnp.where(mask, neg, 0.0), dist)
  loss = dist.batch_mean(lse - pos_sum / (1.0 + num_pos))
  metrics = negative_metrics(pos, neg, valid, dist)
  metrics["num_positives"] = dist.batch_mean(num_pos)
  return loss, metrics
