"""The negative queue: its config section, its layouts, its one push, and what the objective
sees of it (`Negatives`), as pytrees.

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
import ml_collections
import numpy as np

from jaxcontrast.config_check import fail
from jaxcontrast.losses import l2_normalize
from jaxcontrast.losses import queue as core_queue

MODES = ("replicated", "sharded")


def default_queue_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.size = 4096            # K; 0 = no queue: the other keys of the global batch are the negatives
  c.mode = "replicated"    # "replicated" | "sharded" (rows split over devices, K % devices == 0)
  c.store_ids = False      # keep each row's source image id (SePP multi_positive, diagnostics)
  c.store_labels = True    # keep each row's class label (batch "label"): "diag/..." metrics
  c.mask_unfilled = False  # leave rows not yet written out of every loss (MoCo: False, noise)
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first invalid key of the `queue` section."""
  if c.mode not in MODES:
    fail("queue", "mode", c.mode, f"one of {MODES}")
  if c.size < 0:
    fail("queue", "size", c.size, "an int >= 0 (0: in-batch negatives)")
  if c.size == 0 and c.mode == "sharded":
    fail("queue", "mode", c.mode, "'replicated' when queue.size = 0 (no queue to shard)")


def num_blocks(mode: str, devices: int) -> int:
  """Blocks of the layout: one per device when `sharded`, else one."""
  return devices if mode == "sharded" else 1


@flax.struct.dataclass
class Negatives:
  """What the objective sees of the queue as it was before this step: keys (K, D); ids (K,),
  the rows' source image ids (SePP's multi-positive mask); labels (K,), their class labels (the
  label diagnostics; None: off); valid (K,) bool, the rows holding real keys
  (`queue.mask_unfilled`; None: every row counts). In the sharded layout every field is split by
  rows over the devices."""
  keys: jax.Array
  ids: Optional[jax.Array] = None
  labels: Optional[jax.Array] = None
  valid: Optional[jax.Array] = None


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
  keys = core_queue.init(rng, size, dim).keys
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
  ptr, filled = core_queue.advance(queue.ptr, queue.filled, n, size)
  write = lambda buffer, rows: core_queue.write_rows(buffer, queue.ptr, rows)
  return QueueState(keys=write(queue.keys, keys), ids=write(queue.ids, ids),
                    labels=write(queue.labels, labels), ptr=ptr, filled=filled)


def negatives(queue: Optional[QueueState], config: ml_collections.ConfigDict, *, devices: int,
              with_labels: bool) -> Optional[Negatives]:
  """The objective's view of `queue` under the `queue` config section (None: no queue)."""
  if queue is None:
    return None
  valid = (valid_rows(queue, num_blocks(config.mode, devices)) if config.mask_unfilled
           else None)
  return Negatives(keys=queue.keys, ids=queue.ids,
                   labels=queue.labels if with_labels and config.store_labels else None,
                   valid=valid)


def valid_rows(queue: QueueState, num_blocks: int = 1) -> jax.Array:
  """(K,) bool: the rows holding real keys, i.e. the `filled` newest rows (METHODS.md's "valid
  count"), for a queue laid out in `num_blocks` blocks (1: replicated; n: sharded over n devices).

  Local row j of block b has local age a = (j - ptr) mod K/n (0 = oldest) and global age
  g = a * n + b, as `age_order` orders them; the row is valid iff g >= K - filled. This holds for
  a fresh queue and after `reblock` alike. Traceable (used inside the jitted step).
  """
  return core_queue.valid_rows_mask(queue.keys.shape[0], queue.ptr, queue.filled, num_blocks)


def age_order(keys: np.ndarray, ptr: int, num_blocks: int) -> np.ndarray:
  """Row indices of a queue laid out in `num_blocks` blocks, oldest first.

  In each block the oldest row sits at the (local) pointer. Rows of equal local age in different
  blocks were written in the same step; they are ordered by block (device) index.
  """
  return _age_rows(keys.shape[0], ptr, num_blocks)


def _age_rows(size: int, ptr: int, num_blocks: int) -> np.ndarray:
  if size % num_blocks:
    raise ValueError(f"queue size {size} is not divisible by {num_blocks} blocks")
  local = size // num_blocks
  ages = (ptr + np.arange(local)) % local                   # local rows, oldest first
  return (np.arange(num_blocks)[None, :] * local + ages[:, None]).reshape(-1)


def reblock(queue: QueueState, num_from: int, num_to: int, *, batch: Optional[int] = None,
            views: int = 1, out_shardings=None) -> QueueState:
  """Re-lay a sharded queue written by `num_from` devices out for `num_to` devices.

  With `batch` (the global batch of the run that wrote it) and `views` (key views pushed per
  step, `views_pushed`): when batch x views divides K, the result is exactly the queue a run on
  `num_to` devices would hold after the same steps: every key in the row, and the pointer at
  the position, where `num_to` devices would have written it. Each step pushes N = views x batch
  keys and device d writes its b = batch / n rows of each view, view after view, into its block
  of L = K / n rows, so the key of global batch row r, view v, pushed at step t sits at local row
  (t x views x b + v x b + r mod b) mod L of block r // b; with N | K the row (t mod K / N, v, r)
  of any layout is a bijection, and the queue is moved through it. Rows never written (noise,
  id -1) move with the rest: they stay rows not yet written, but hold the noise drawn for the
  old layout.

  Otherwise (no `batch`, or N not dividing K): every key keeps its age; rows are put in age
  order (`age_order`) and dealt round-robin to the new blocks, oldest first, with the pointer at
  0, so each device next overwrites its oldest rows.

  The row map depends only on the sizes and the pointer (`reblock_rows`), so the move is one
  jitted gather: `queue` may be numpy arrays or global `jax.Array`s spanning several processes
  (nothing is fetched to a host but the replicated pointer); `out_shardings` (a QueueState of
  shardings, or one sharding) places the result, e.g. rows split over the new mesh.
  """
  source, new_ptr = reblock_rows(queue.keys.shape[0], int(np.asarray(queue.ptr)), num_from,
                                 num_to, batch=batch, views=views)

  def move(q):
    return QueueState(keys=q.keys[source], ids=q.ids[source], labels=q.labels[source],
                      ptr=jnp.asarray(new_ptr, jnp.int32), filled=q.filled.astype(jnp.int32))

  return jax.jit(move, out_shardings=out_shardings)(queue)


def reblock_rows(size: int, ptr: int, num_from: int, num_to: int, *,
                 batch: Optional[int] = None, views: int = 1) -> tuple[np.ndarray, int]:
  """(source, new_ptr) of `reblock`: row i of the re-blocked queue is row `source[i]` of the
  queue laid out in `num_from` blocks with (local) pointer `ptr`; `new_ptr` is its pointer."""
  if size % num_to:
    raise ValueError(f"queue size {size} is not divisible by the new device count {num_to}")
  rows_from = _step_rows(size, num_from, batch, views, ptr)
  if rows_from is not None and batch % num_to == 0:
    (step, view, row), step_ptr = rows_from, ptr // (views * batch // num_from)
    b_to = batch // num_to
    local_to = size // num_to
    new_rows = row // b_to * local_to + (step * views * b_to + view * b_to + row % b_to)
    order, new_ptr = np.arange(size), step_ptr * views * b_to % local_to
  else:
    order = _age_rows(size, ptr, num_from)     # global age index -> old row
    new_rows, new_ptr = _deal_rows(size, num_to), 0
  source = np.empty(size, np.int32)
  source[new_rows] = order
  return source, int(new_ptr)


def _step_rows(size: int, devices: int, batch: Optional[int], views: int, ptr: int):
  """For each row of a `devices`-block layout: (step mod K / N, view, global batch row) of the
  key written there, as three (K,) arrays; None when the layout is not a whole number of steps
  (no batch, N = views x batch not dividing K or the devices, or a pointer off a step)."""
  if batch is None:
    return None
  per_step = views * batch
  if size % per_step or batch % devices or (ptr * devices) % per_step:
    return None
  b, local = batch // devices, size // devices
  rows = np.arange(size)
  block, j = rows // local, rows % local
  within = j % (views * b)
  return j // (views * b), within // b, block * b + within % b


def views_pushed(objective_config) -> int:
  """Key views the train step enqueues per step: both views' keys when the loss is symmetric."""
  return 2 if objective_config.get("symmetric") else 1


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


def _concat_per_device(parts, devices: int) -> jax.Array:
  """[a; b; ...] arranged so each device's rows of the result are its own rows of a, then of b,
  ...: what each device writes into its own block of a sharded queue."""
  shape = parts[0].shape[1:]
  return jnp.concatenate([p.reshape(devices, -1, *shape) for p in parts],
                         axis=1).reshape(-1, *shape)


def push(queue: QueueState, keys, ids, labels, *, mode: str, mesh,
         axis_name: str = "data") -> QueueState:
  """Enqueue one step's keys, normalised, with their source ids and class labels: the only
  write into the queue, in either layout.

  keys: tuple of global (B, D) keys, one per enqueued view: `(k2,)`, or `(k1, k2)` when the
  loss is symmetric; ids, labels: tuples of (B,) int32 (or None: -1, unknown) in the same order.
  Replicated: the views one after the other, [k1; k2] (each in device order), at `ptr`. Sharded:
  device i writes its own rows of k1 then of k2 into its own block, without communication.
  """
  n = keys[0].shape[0]
  ids = tuple(_row_values(v, n) for v in ids)
  labels = tuple(_row_values(v, n) for v in labels)
  if mode == "sharded":
    devices = mesh.shape[axis_name]
    join = lambda parts: parts[0] if len(parts) == 1 else _concat_per_device(parts, devices)
  else:
    join = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  new_keys, new_ids, new_labels = join(keys), join(ids), join(labels)
  new_keys = l2_normalize(new_keys)
  if mode == "sharded":
    return enqueue_sharded(queue, new_keys, new_ids, new_labels, mesh=mesh, axis_name=axis_name)
  return enqueue(queue, new_keys, new_ids, new_labels)
