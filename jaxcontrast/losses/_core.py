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
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


# Similarity products run at full float32 precision unless the caller asks otherwise: XLA's
# default is TF32 on GPU and one bfloat16 pass on TPU (~3 significant digits), which a
# temperature of 0.04-0.2 magnifies into 1e-3 relative errors in the loss.
HIGHEST = lax.Precision.HIGHEST


def sim(a: Array, b: Array, precision) -> Array:
  """a @ b.T at `precision` (None = the backend default)."""
  return jnp.matmul(a, b.T, precision=precision)


def l2_normalize(x: Array, *, axis: int = -1, eps: float = 1e-12) -> Array:
  """Row-wise L2 normalisation, `x / max(||x||_2, eps)` (as torch.nn.functional.normalize)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def as_float(x: Array) -> Array:
  """Promote low-precision floats (bfloat16, float16) to float32; softmaxes stay in float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------- input checks


def check_temperature(value, name: str = "temperature") -> None:
  """Non-positive temperatures raise; traced values (inside a jitted schedule) are not checked."""
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def check_matrix(x, name: str) -> None:
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"{name} must have shape (rows, dim), got shape {getattr(x, 'shape', None)}")


def check_pair(query, key) -> None:
  check_matrix(query, "query")
  check_matrix(key, "key")
  if query.shape != key.shape:
    raise ValueError(f"query and key must have the same shape, got query {query.shape} and key "
                     f"{key.shape}")


def check_queue(queue, dim: int) -> None:
  check_matrix(queue, "queue")
  if queue.shape[1] != dim:
    raise ValueError(f"queue must have shape (K, {dim}) to match the embedding dim, got "
                     f"{queue.shape}")
  if queue.shape[0] < 1:
    raise ValueError("queue must have at least one row")


def check_choice(value, name: str, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


# ----------------------------------------------------------------------------- distribution


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


def prepare(query: Array, key: Optional[Array], dist: Dist):
  """Normalised float32 query (with gradient) and key (without), gathered to the global batch."""
  q = dist.gather(l2_normalize(as_float(query)))
  if key is None:
    return q, None
  k = dist.gather(lax.stop_gradient(l2_normalize(as_float(key))))
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


def queue_block(queue: Array) -> Array:
  """The (local rows of the) queue as float32, without gradient. Rows are stored normalised."""
  return lax.stop_gradient(as_float(queue))


def off_diagonal(x: Array) -> Array:
  """(N, N) -> (N, N-1): each row without its diagonal element."""
  n = x.shape[0]
  return x.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(n, n - 1)
