"""The negative queue as a pytree: initialisation, enqueue, and re-blocking.

Two layouts (DESIGN.md, "The negative queue on many devices"):

* `replicated`: one (K, D) array, the same on every device. The keys of the global batch are
  written in device order at `ptr`, `ptr <- (ptr + Bg) mod K` (modular indices when K is not a
  multiple of Bg). Same contents and order as the PyTorch reference.
* `sharded`: the (K, D) array is split by rows over the `data` axis; device i owns rows
  [i*K/n, (i+1)*K/n) and writes only its own local keys into them, at a *local* pointer,
  `ptr <- (ptr + B) mod K/n`. No communication on enqueue; memory K*D/n per device.

Both layouts hold the same set of keys after the same steps, in a different row order (the losses
are invariant to the order of the negatives). Each row may carry its source image id and its class
label (-1: noise or unknown); they are written with the keys, by the same indices, and move with
them when re-blocked. `reblock` converts a sharded queue between device
counts (resume on a different slice) and, with `num_to=1`, to an age-ordered single block.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class QueueState:
  """keys: (K, D) float32 normalised rows; ids: (K,) int32 source image ids and labels: (K,)
  int32 class labels of the rows (-1: noise, unknown, or not stored: `queue.store_ids` /
  `queue.store_labels`); ptr: int32 scalar, the next row to write (local to each block in sharded
  mode); filled: int32 scalar, how many rows hold real keys (saturates at K).

  `labels` is always an array (K int32s), stored or not, so the state has the same pytree of
  arrays whatever the config, and checkpoints restore across configs."""
  keys: jax.Array
  ids: jax.Array
  labels: jax.Array
  ptr: jax.Array
  filled: jax.Array

  @property
  def size(self) -> int:
    return self.keys.shape[0]


def init_queue(rng: jax.Array, size: int, dim: int, num_blocks: int = 1) -> QueueState:
  """MoCo's initialisation: normalised Gaussian noise, ids and labels -1, nothing filled.

  With `num_blocks` > 1 (sharded layout) the same noise rows are dealt to the blocks in age order
  (`reblock` from one block), so that a sharded queue overwrites the same noise rows, step after
  step, as a replicated one: both hold the same set of keys and noise after any number of steps.
  """
  if size < 1 or dim < 1:
    raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
  if size % num_blocks:
    raise ValueError(f"queue size {size} is not divisible by {num_blocks} devices")
  keys = jax.random.normal(rng, (size, dim), jnp.float32)
  keys = keys / jnp.linalg.norm(keys, axis=1, keepdims=True)
  keys = keys[np.argsort(_deal_rows(size, num_blocks))]
  unknown = jnp.full((size,), -1, jnp.int32)
  return QueueState(keys=keys, ids=unknown, labels=unknown, ptr=jnp.zeros((), jnp.int32),
                    filled=jnp.zeros((), jnp.int32))


def _deal_rows(size: int, num_blocks: int) -> np.ndarray:
  """Row, in a `num_blocks` layout with pointer 0, of the key of global age g (oldest first):
  ages are dealt round-robin to the blocks."""
  g = np.arange(size)
  return (g % num_blocks) * (size // num_blocks) + g // num_blocks


def _row_values(values: Optional[jax.Array], n: int) -> jax.Array:
  """(n,) int32 per-key ids or labels; None -> -1 (unknown)."""
  return jnp.full((n,), -1, jnp.int32) if values is None else jnp.asarray(values, jnp.int32)


def enqueue(queue: QueueState, keys: jax.Array, ids: Optional[jax.Array] = None,
            labels: Optional[jax.Array] = None) -> QueueState:
  """Write `keys` (N, D) at `ptr` with modular indices; every key lands once, with its id and
  label ((N,) int32 each; None writes -1) in the same rows.

  Works on the whole queue (replicated layout, N = global batch) and, called inside
  `jax.shard_map`, on one device's block (sharded layout, N = local batch). When N exceeds the
  number of rows only the last rows' worth of keys is kept (the older ones would be overwritten
  in the same step anyway), so the scatter never has duplicate indices.
  """
  size, n = queue.keys.shape[0], keys.shape[0]
  if keys.ndim != 2 or keys.shape[1] != queue.keys.shape[1]:
    raise ValueError(f"keys must have shape (N, {queue.keys.shape[1]}), got {keys.shape}")
  ids, labels = _row_values(ids, n), _row_values(labels, n)
  start = queue.ptr
  if n > size:
    keys, ids, labels = keys[n - size:], ids[n - size:], labels[n - size:]
    start = (start + (n - size)) % size
  rows = (start + jnp.arange(keys.shape[0])) % size
  return QueueState(
      keys=queue.keys.at[rows].set(jax.lax.stop_gradient(keys).astype(queue.keys.dtype),
                                   unique_indices=True),
      ids=queue.ids.at[rows].set(ids, unique_indices=True),
      labels=queue.labels.at[rows].set(labels, unique_indices=True),
      ptr=((queue.ptr + n) % size).astype(jnp.int32),
      filled=jnp.minimum(queue.filled + n, size).astype(jnp.int32))


def valid_rows(queue: QueueState, num_blocks: int = 1) -> jax.Array:
  """(K,) bool: the rows holding real keys, i.e. the `filled` newest rows (METHODS.md's "valid
  count"), for a queue laid out in `num_blocks` blocks (1: replicated; n: sharded over n devices).

  Local row j of block b has local age a = (j - ptr) mod K/n (0 = oldest) and global age
  g = a * n + b, as `age_order` orders them; the row is valid iff g >= K - filled. This holds for
  a fresh queue and after `reblock` alike. Traceable (used inside the jitted step).
  """
  size = queue.keys.shape[0]
  if size % num_blocks:
    raise ValueError(f"queue size {size} is not divisible by {num_blocks} blocks")
  local = size // num_blocks
  rows = jnp.arange(size)
  age = (rows % local - queue.ptr) % local * num_blocks + rows // local
  return age >= size - queue.filled


def age_order(keys: np.ndarray, ptr: int, num_blocks: int) -> np.ndarray:
  """Row indices of a queue laid out in `num_blocks` blocks, oldest first.

  In each block the oldest row sits at the (local) pointer. Rows of equal local age in different
  blocks were written in the same step; they are ordered by block (device) index.
  """
  size = keys.shape[0]
  if size % num_blocks:
    raise ValueError(f"queue size {size} is not divisible by {num_blocks} blocks")
  local = size // num_blocks
  ages = (ptr + np.arange(local)) % local                   # local rows, oldest first
  return (np.arange(num_blocks)[None, :] * local + ages[:, None]).reshape(-1)


def reblock(queue: QueueState, num_from: int, num_to: int) -> QueueState:
  """Re-lay a sharded queue written by `num_from` devices out for `num_to` devices.

  Keeps every key and its age: the rows are put in age order (`age_order`) and dealt round-robin
  to the new blocks, oldest first, with the pointer at 0, so each device next overwrites its
  oldest rows. Host-side (numpy) utility for resuming on a different device count; the result
  has plain arrays to be placed with the new sharding.
  """
  size = queue.keys.shape[0]
  if size % num_to:
    raise ValueError(f"queue size {size} is not divisible by the new device count {num_to}")
  order = age_order(queue.keys, int(queue.ptr), num_from)     # global age index -> old row
  new_rows = _deal_rows(size, num_to)

  def move(rows):
    rows = np.asarray(rows)
    out = np.empty_like(rows)
    out[new_rows] = rows[order]
    return jnp.asarray(out)

  return QueueState(keys=move(queue.keys), ids=move(queue.ids), labels=move(queue.labels),
                    ptr=jnp.zeros((), jnp.int32), filled=jnp.asarray(queue.filled, jnp.int32))


def enqueue_sharded(queue: QueueState, keys: jax.Array, ids: Optional[jax.Array],
                    labels: Optional[jax.Array] = None, *, mesh: jax.sharding.Mesh,
                    axis_name: str) -> QueueState:
  """Sharded layout: each device writes its own rows of `keys` (global (N, D), split on
  `axis_name`), with their ids and labels (global (N,), None -> -1), into its own block at the
  shared local pointer. No collective is involved.

  `ptr` is the local pointer (the same on every device: all write N/n rows); `filled` counts
  rows over the whole queue.
  """
  P = jax.sharding.PartitionSpec
  n_dev = mesh.shape[axis_name]
  size, n = queue.keys.shape[0], keys.shape[0]
  if size % n_dev or n % n_dev:
    raise ValueError(f"sharded queue: queue size {size} and batch {n} must be divisible by the "
                     f"{n_dev} devices of mesh axis {axis_name!r}")
  ids, labels = _row_values(ids, n), _row_values(labels, n)

  def write_block(block_keys, block_ids, block_labels, ptr, local_keys, local_ids, local_labels):
    local = QueueState(keys=block_keys, ids=block_ids, labels=block_labels, ptr=ptr,
                       filled=jnp.zeros((), jnp.int32))
    new = enqueue(local, local_keys, local_ids, local_labels)
    return new.keys, new.ids, new.labels

  rows = P(axis_name)
  new_keys, new_ids, new_labels = jax.shard_map(
      write_block, mesh=mesh, in_specs=(rows, rows, rows, P(), rows, rows, rows),
      out_specs=(rows, rows, rows), check_vma=True)(
          queue.keys, queue.ids, queue.labels, queue.ptr, keys, ids, labels)
  local_size, local_n = size // n_dev, n // n_dev
  return QueueState(keys=new_keys, ids=new_ids, labels=new_labels,
                    ptr=((queue.ptr + local_n) % local_size).astype(jnp.int32),
                    filled=jnp.minimum(queue.filled + n, size).astype(jnp.int32))
