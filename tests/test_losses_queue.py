"""`jaxcontrast.losses.queue`: the negative queue as pure jax.numpy functions, against a NumPy
model of a FIFO; the train step's queue built on them. (Importable without the `train` extra:
test_losses_api.py, test_import_pulls_in_neither_flax_nor_tensorflow.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrast import losses
from jaxcontrast.losses import queue as core_queue

SIZE, DIM = 5, 3


class NumpyFifo:
  """The reference: a list of the rows ever written, the queue holding the newest SIZE at the
  positions a ring buffer puts them (row i of the buffer written by the i-th, (i+K)-th, ...
  key)."""

  def __init__(self, keys):
    self.keys = np.array(keys, np.float64)
    self.written = 0
    self.valid = np.zeros(len(keys), bool)

  def push(self, rows):
    for row in np.asarray(rows, np.float64):
      i = self.written % len(self.keys)
      self.keys[i] = row / np.linalg.norm(row)
      self.valid[i] = True
      self.written += 1


def test_enqueue_and_valid_rows_match_a_numpy_fifo():
  rng = np.random.default_rng(0)
  queue = core_queue.init(jax.random.PRNGKey(0), SIZE, DIM)
  np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=1), 1.0, rtol=1e-6)
  assert int(queue.ptr) == 0 and int(queue.filled) == 0
  assert not np.asarray(core_queue.valid_rows(queue)).any()
  model = NumpyFifo(queue.keys)
  enqueue = jax.jit(core_queue.enqueue)
  for n in (2, 2, 7, 1, 5):          # 7 > K: only the newest 5 land, each once
    rows = rng.normal(size=(n, DIM)).astype(np.float32) * 3
    queue = enqueue(queue, rows)
    model.push(rows)
    np.testing.assert_allclose(queue.keys, model.keys, rtol=1e-6, atol=1e-6)
    assert int(queue.ptr) == model.written % SIZE
    assert int(queue.filled) == min(model.written, SIZE)
    np.testing.assert_array_equal(core_queue.valid_rows(queue), model.valid)


def test_valid_rows_with_blocks_split_over_devices():
  """Two blocks, each device writing its own keys into its own half at the shared local
  pointer: the valid mask marks exactly the rows written."""
  rng = np.random.default_rng(1)
  blocks = [core_queue.init(jax.random.PRNGKey(i), 4, DIM) for i in range(2)]
  models = [NumpyFifo(b.keys) for b in blocks]
  filled = 0
  for n in (1, 2, 3):
    for i in range(2):
      rows = rng.normal(size=(n, DIM)).astype(np.float32)
      blocks[i] = core_queue.enqueue(blocks[i], rows)
      models[i].push(rows)
    filled = min(filled + 2 * n, 8)
    mask = core_queue.valid_rows_mask(8, blocks[0].ptr, filled, num_blocks=2)
    np.testing.assert_array_equal(mask, np.concatenate([m.valid for m in models]))


def test_loss_on_a_core_queue_leaves_the_noise_out():
  """What a core-only user writes: the loss with `queue_valid=valid_rows(queue)` equals the
  loss over the rows actually written (here: 3 of 5)."""
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(2, 4, DIM)).astype(np.float32)
  queue = core_queue.enqueue(core_queue.init(jax.random.PRNGKey(3), SIZE, DIM),
                             rng.normal(size=(3, DIM)).astype(np.float32))
  got = losses.moco_infonce(q, k, queue.keys, queue_valid=core_queue.valid_rows(queue))[0]
  want = losses.moco_infonce(q, k, queue.keys[:3])[0]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_enqueue_rejects_wrong_dim():
  queue = core_queue.init(jax.random.PRNGKey(0), SIZE, DIM)
  with pytest.raises(ValueError, match="keys must have shape"):
    core_queue.enqueue(queue, jnp.zeros((2, DIM + 1)))


def test_train_step_queue_is_built_on_the_core_functions(monkeypatch):
  """`jaxcontrast.step.queue` writes and masks through `losses.queue` (one implementation),
  and its state keeps its own pytree (keys, ids, labels, ptr, filled)."""
  from jaxcontrast.step import queue as step_queue  # pylint: disable=g-import-not-at-top
  state = step_queue.init_queue(jax.random.PRNGKey(0), SIZE, DIM)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert paths == [".keys", ".ids", ".labels", ".ptr", ".filled"]
  rows = np.random.default_rng(4).normal(size=(3, DIM)).astype(np.float32)
  new = step_queue.enqueue(state, rows, ids=np.arange(3))
  core = core_queue.enqueue(core_queue.Queue(state.keys, state.ptr, state.filled), rows,
                            normalize=False)
  np.testing.assert_array_equal(new.keys, core.keys)
  assert int(new.ptr) == int(core.ptr) and int(new.filled) == int(core.filled)
  np.testing.assert_array_equal(new.ids[:3], [0, 1, 2])
  calls = []
  real = core_queue.write_rows
  monkeypatch.setattr(core_queue, "write_rows", lambda *a: calls.append(1) or real(*a))
  step_queue.enqueue(state, rows)
  assert len(calls) == 3          # keys, ids, labels
