"""The negative queue as pure `jax.numpy` functions: no Flax, no ml_collections.

A MoCo queue is a (K, D) array of past keys, a write pointer and a count of rows holding real
keys. Each step the loss reads the queue as it was, then the step's keys are written at the
pointer, the oldest rows first overwritten:

    queue = losses.queue.init(rng, size=4096, dim=128)              # normalised noise, as MoCo
    loss, metrics = losses.moco_infonce(q, k, queue.keys,
                                        queue_valid=losses.queue.valid_rows(queue))  # optional
    queue = losses.queue.enqueue(queue, k)                          # after the loss

`Queue` is a NamedTuple, so it is a pytree: it goes through `jax.jit`, into a train state and
into a checkpoint as it is. The array-level functions (`write_rows`, `advance`,
`valid_rows_mask`) are what `jaxcontrast.step.queue` builds its train-state queue (with source
ids and class labels per row, and a layout split over devices) from.

Under `jax.shard_map` with the queue split by rows over the devices, each device calls
`enqueue` on its own (K/n, D) block with its own (B/n, D) keys: every block then holds its own
devices' keys and the losses, given `axis_name`, see the union (the order of negatives does not
matter to any loss).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcontrast.losses._core import l2_normalize


class Queue(NamedTuple):
  """keys: (K, D) float32 unit rows; ptr: int32 scalar, the next row to write; filled: int32
  scalar, how many rows hold real keys (saturates at K)."""
  keys: jax.Array
  ptr: jax.Array
  filled: jax.Array


def init(rng: jax.Array, size: int, dim: int) -> Queue:
  """MoCo's initialisation: rows of L2-normalised Gaussian noise, pointer 0, nothing filled."""
  if size < 1 or dim < 1:
    raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
  keys = l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
  zero = jnp.zeros((), jnp.int32)
  return Queue(keys=keys, ptr=zero, filled=zero)


def write_rows(buffer: jax.Array, ptr, rows: jax.Array) -> jax.Array:
  """`buffer` (K, ...) with `rows` (N, ...) written at `ptr`, `ptr + 1`, ... modulo K.

  When N exceeds K only the last K rows are written (the older ones would be overwritten in
  the same step anyway), so the scatter never has duplicate indices. No gradient flows into the
  buffer."""
  size, n = buffer.shape[0], rows.shape[0]
  if rows.shape[1:] != buffer.shape[1:]:
    raise ValueError(f"rows must have shape (N, {', '.join(map(str, buffer.shape[1:]))}) to "
                     f"match the buffer {buffer.shape}, got {rows.shape}")
  start = jnp.asarray(ptr, jnp.int32)
  if n > size:
    rows = rows[n - size:]
    start = (start + (n - size)) % size
  index = (start + jnp.arange(rows.shape[0])) % size
  return buffer.at[index].set(lax.stop_gradient(rows).astype(buffer.dtype), unique_indices=True)


def advance(ptr, filled, n: int, size: int) -> tuple[jax.Array, jax.Array]:
  """(ptr, filled) after writing n rows into a buffer of `size` rows."""
  ptr = (jnp.asarray(ptr, jnp.int32) + n) % size
  filled = jnp.minimum(jnp.asarray(filled, jnp.int32) + n, size)
  return ptr.astype(jnp.int32), filled.astype(jnp.int32)


def enqueue(queue: Queue, keys: jax.Array, *, normalize: bool = True) -> Queue:
  """Write `keys` (N, D) at the pointer (after the step's loss), L2-normalised unless
  `normalize=False`; every key lands once; the pointer moves by N modulo K."""
  size, dim = queue.keys.shape
  if getattr(keys, "ndim", None) != 2 or keys.shape[1] != dim:
    raise ValueError(f"keys must have shape (N, {dim}), got {getattr(keys, 'shape', None)}")
  keys = l2_normalize(keys.astype(jnp.float32)) if normalize else keys
  ptr, filled = advance(queue.ptr, queue.filled, keys.shape[0], size)
  return Queue(keys=write_rows(queue.keys, queue.ptr, keys), ptr=ptr, filled=filled)


def valid_rows_mask(size: int, ptr, filled, num_blocks: int = 1) -> jax.Array:
  """(size,) bool: the rows holding real keys, i.e. the `filled` newest rows (METHODS.md's
  "valid count"), for a queue laid out in `num_blocks` blocks (1: one array; n: split by rows
  over n devices, each writing its own block at the shared local pointer `ptr`).

  Local row j of block b has local age a = (j - ptr) mod (size / n) (0 = oldest) and global
  age g = a * n + b; the row is valid iff g >= size - filled. Traceable."""
  if size % num_blocks:
    raise ValueError(f"queue size {size} is not divisible by {num_blocks} blocks")
  local = size // num_blocks
  rows = jnp.arange(size)
  age = (rows % local - ptr) % local * num_blocks + rows // local
  return age >= size - filled


def valid_rows(queue: Queue, num_blocks: int = 1) -> jax.Array:
  """(K,) bool mask of the rows of `queue` holding real keys: the `queue_valid` of the losses
  (leave the initial noise out of the negatives)."""
  return valid_rows_mask(queue.keys.shape[0], queue.ptr, queue.filled, num_blocks)

