"""Queue enqueue/wrap-around/re-blocking, EMA formula and schedule, BN-shuffle permutations.

References here are plain NumPy simulations written from METHODS.md section 0 / DESIGN.md.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrast.sharding import make_mesh
from jaxcontrast.step import bn_shuffle, ema
from jaxcontrast.step import queue as queue_lib


def _numpy_fifo(size, dim, batches):
  """Reference: a ring buffer written row by row at ptr, ptr advancing by one per key."""
  rows = np.zeros((size, dim), np.float32)
  ptr = 0
  for batch in batches:
    for key in batch:
      rows[ptr] = key
      ptr = (ptr + 1) % size
  return rows, ptr


# Jitted as in the train step: one program per shape instead of one per jnp op in eager mode.
_enqueue = jax.jit(queue_lib.enqueue)


@pytest.mark.parametrize("size,batch,steps", [(10, 4, 3), (12, 4, 5), (5, 8, 2), (7, 7, 1)])
def test_replicated_enqueue_wraps_modularly(size, batch, steps):
  """K not a multiple of B (and B > K): every key lands once, at (ptr + i) mod K."""
  rng = np.random.RandomState(0)
  batches = [rng.randn(batch, 3).astype(np.float32) for _ in range(steps)]
  q = queue_lib.init_queue(jax.random.key(0), size, 3)
  q = q.replace(keys=jnp.zeros_like(q.keys))
  for i, b in enumerate(batches):
    q = _enqueue(q, jnp.asarray(b), jnp.arange(batch) + 100 * i)
  want, ptr = _numpy_fifo(size, 3, batches)
  np.testing.assert_array_equal(np.asarray(q.keys), want)
  assert int(q.ptr) == ptr
  assert int(q.filled) == min(size, batch * steps)


def test_init_queue_is_normalised_noise():
  q = queue_lib.init_queue(jax.random.key(1), 32, 8)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q.keys), axis=1), 1.0, rtol=1e-6)
  assert (np.asarray(q.ids) == -1).all() and int(q.ptr) == 0 and int(q.filled) == 0


# One jitted function per device count for the whole module: jit's cache then compiles each
# input shape once across the parametrized cases.
@functools.cache
def _enqueue_sharded(num_devices):
  mesh = make_mesh(num_devices)
  return jax.jit(lambda q, k, i: queue_lib.enqueue_sharded(q, k, i, mesh=mesh, axis_name="data"))


@functools.cache
def _push_sharded(num_devices):
  mesh = make_mesh(num_devices)
  return jax.jit(lambda q, k, i, l: queue_lib.push(q, k, i, l, mode="sharded", mesh=mesh))


def _run_sharded(num_devices, size, batches):
  q = queue_lib.init_queue(jax.random.key(0), size, batches[0].shape[1], num_devices)
  fn = _enqueue_sharded(num_devices)
  for step, b in enumerate(batches):
    q = fn(q, jnp.asarray(b), jnp.arange(len(b), dtype=jnp.int32) + 1000 * step)
  return jax.device_get(q)


def test_sharded_enqueue_writes_only_local_blocks():
  """Device i's keys land in rows [i K/n, (i+1) K/n) at the shared local pointer."""
  size, n, batch = 32, 8, 16
  b = np.arange(batch * 2, dtype=np.float32).reshape(batch, 2)
  q = _run_sharded(n, size, [b])
  keys, local = np.asarray(q.keys), size // n
  for dev in range(n):
    np.testing.assert_array_equal(keys[dev * local: dev * local + 2], b[2 * dev: 2 * dev + 2])
  assert int(q.ptr) == 2 and int(q.filled) == batch


def test_sharded_queue_reblocks_to_the_replicated_queue():
  """With one key per device per step the chronological order is exact: re-blocking the
  8-device queue to one block gives the replicated queue in age order (oldest first)."""
  size, n = 24, 8
  rng = np.random.RandomState(1)
  batches = [rng.randn(n, 4).astype(np.float32) for _ in range(5)]   # 40 keys: wraps around
  sharded = _run_sharded(n, size, batches)
  rep = queue_lib.init_queue(jax.random.key(0), size, 4)
  for step, b in enumerate(batches):
    rep = _enqueue(rep, jnp.asarray(b), jnp.arange(n) + 1000 * step)
  one = queue_lib.reblock(sharded, n, 1)
  aged = np.roll(np.asarray(rep.keys), -int(rep.ptr), axis=0)
  np.testing.assert_allclose(np.asarray(one.keys), aged, rtol=0, atol=0)
  np.testing.assert_array_equal(np.asarray(one.ids), np.roll(np.asarray(rep.ids), -int(rep.ptr)))


def test_reblock_between_device_counts_keeps_keys_and_age():
  """8 -> 2 -> 1 equals 8 -> 1; and a queue re-blocked to 2 devices then written to by 2 devices
  overwrites its oldest rows first."""
  size = 32
  rng = np.random.RandomState(2)
  batches = [rng.randn(16, 3).astype(np.float32) for _ in range(3)]
  q8 = _run_sharded(8, size, batches)
  via2 = queue_lib.reblock(queue_lib.reblock(q8, 8, 2), 2, 1)
  direct = queue_lib.reblock(q8, 8, 1)
  np.testing.assert_array_equal(np.asarray(via2.keys), np.asarray(direct.keys))
  # The set of keys is kept.
  assert sorted(map(tuple, np.asarray(direct.keys))) == sorted(map(tuple, np.asarray(q8.keys)))
  # 48 keys went into 32 rows: step 0's are gone, step 1's (ids 1000..1015) are the oldest, and
  # exactly those are overwritten first after re-blocking to 2 devices.
  q2 = queue_lib.reblock(q8, 8, 2)
  after = _enqueue_sharded(2)(q2, jnp.zeros((16, 3)), jnp.full((16,), -7, jnp.int32))
  ids_before, ids_after = np.asarray(q2.ids), np.asarray(after.ids)
  overwritten = ids_before[ids_after == -7]
  np.testing.assert_array_equal(np.sort(overwritten), np.arange(1000, 1016))


def _pushed(num_devices, size, steps, views, batch=16, dim=3):
  """The sharded queue of a `num_devices` run after `steps` pushes of `views` key views (the
  train step's `push`); keys, ids and labels are functions of (step, view, batch row) only."""
  q = queue_lib.init_queue(jax.random.key(0), size, dim, num_devices)
  fn = _push_sharded(num_devices)
  for t in range(steps):
    keys = tuple(jnp.asarray(np.random.RandomState(100 * t + v).randn(batch, dim), jnp.float32)
                 for v in range(views))
    ids = tuple(jnp.arange(batch, dtype=jnp.int32) + 1000 * t + 100 * v for v in range(views))
    q = fn(q, keys, ids, ids)
  return jax.device_get(q)


@pytest.mark.parametrize("views,steps", [(1, 1), (1, 7), (2, 2), (2, 5)])
@pytest.mark.parametrize("num_from,num_to", [(8, 4), (4, 8), (8, 1), (2, 8)])
def test_reblock_gives_the_queue_the_other_device_count_would_have(views, steps, num_from,
                                                                   num_to):
  """Resume on another device count: the re-blocked queue is, row for row and with its
  pointer, the queue a run on the new count fills with the same pushes (partly filled or
  wrapped; one or two key views per step). Rows never written keep id -1 (noise)."""
  size, batch = 64, 16
  before = _pushed(num_from, size, steps, views)
  want = _pushed(num_to, size, steps, views)
  got = queue_lib.reblock(before, num_from, num_to, batch=batch, views=views)
  np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(want.ids))
  written = np.asarray(want.ids) >= 0
  np.testing.assert_array_equal(np.asarray(got.keys)[written], np.asarray(want.keys)[written])
  np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(want.labels))
  assert int(got.ptr) == int(want.ptr) and int(got.filled) == int(want.filled)
  # Without the batch (or when views x batch does not divide K): age order, pointer 0.
  aged = queue_lib.reblock(before, num_from, num_to)
  assert int(aged.ptr) == 0
  assert sorted(np.asarray(aged.ids)) == sorted(np.asarray(want.ids))


def test_reblock_to_one_block_is_the_replicated_queue():
  """8 devices -> 1 block: the replicated queue of the same pushes, pointer included."""
  size, batch = 64, 16
  rep = queue_lib.init_queue(jax.random.key(0), size, 3)
  for t in range(5):
    keys = tuple(jnp.asarray(np.random.RandomState(100 * t + v).randn(batch, 3), jnp.float32)
                 for v in range(2))
    ids = tuple(jnp.arange(batch, dtype=jnp.int32) + 1000 * t + 100 * v for v in range(2))
    rep = queue_lib.push(rep, keys, ids, ids, mode="replicated", mesh=None)
  got = queue_lib.reblock(_pushed(8, size, 5, 2), 8, 1, batch=batch, views=2)
  np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(rep.ids))
  np.testing.assert_allclose(np.asarray(got.keys), np.asarray(rep.keys), rtol=1e-6)
  assert int(got.ptr) == int(rep.ptr)


@pytest.mark.parametrize("num_devices,size,batch,steps", [
    (1, 10, 4, 1), (1, 10, 4, 2), (1, 10, 4, 3), (1, 7, 7, 1), (8, 32, 16, 1), (8, 64, 16, 3),
    (8, 32, 8, 5), (2, 12, 4, 2)])
def test_valid_rows_are_the_rows_holding_keys(num_devices, size, batch, steps):
  """`valid_rows` (from ptr and filled alone) marks exactly the rows whose id is a real key's
  (all keys here have ids >= 0, noise has -1): fresh, partly filled, wrapped, and re-blocked."""
  batches = [np.ones((batch, 2), np.float32) for _ in range(steps)]
  if num_devices == 1:
    q = queue_lib.init_queue(jax.random.key(0), size, 2)
    for step, b in enumerate(batches):
      q = _enqueue(q, jnp.asarray(b), jnp.arange(batch) + 1000 * step)
  else:
    q = _run_sharded(num_devices, size, batches)
  np.testing.assert_array_equal(np.asarray(queue_lib.valid_rows(q, num_devices)),
                                np.asarray(q.ids) >= 0)
  for num_to in [n for n in (1, 2) if size % n == 0]:
    moved = queue_lib.reblock(q, num_devices, num_to)
    np.testing.assert_array_equal(np.asarray(queue_lib.valid_rows(moved, num_to)),
                                  np.asarray(moved.ids) >= 0)


def test_reblock_rejects_indivisible_counts():
  q = queue_lib.init_queue(jax.random.key(0), 30, 2)
  with pytest.raises(ValueError, match="divisible"):
    queue_lib.reblock(q, 1, 4)


@pytest.mark.parametrize("base,total", [(0.99, 100), (0.996, 7)])
def test_cosine_momentum_formula_and_end_point(base, total):
  """m_t = 1 - (1 - m0)(cos(pi t / T) + 1) / 2 over T = total steps (METHODS, BYOL, SCE): m0 at
  the first step, below 1 at the last (t = T - 1), exactly 1 from t = T on."""
  steps = np.arange(total)
  got = np.array([float(ema.momentum(t, base=base, schedule="cosine", total_steps=total))
                  for t in steps])
  want = 1 - (1 - base) * (np.cos(np.pi * steps / total) + 1) / 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(base) and got[-1] < 1.0
  assert got[-1] == pytest.approx(1 - (1 - base) * (1 - np.cos(np.pi / total)) / 2, rel=1e-6)
  for late in (total, total + 3):
    assert float(ema.momentum(late, base=base, schedule="cosine", total_steps=total)) == 1.0
  assert float(ema.momentum(5, base=base, schedule="constant", total_steps=total)) == \
      pytest.approx(base)


def test_ema_update_formula():
  target = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
  online = {"w": jnp.array([0.0, 4.0]), "b": jnp.array(-1.0)}
  out = ema.update(target, online, 0.9)
  np.testing.assert_allclose(out["w"], [0.9, 2.2], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 2.6, rtol=1e-6)


@pytest.mark.parametrize("batch,groups", [(16, 2), (32, 8), (64, 4), (24, 3)])
def test_ghost_permutation_moves_every_key_out_of_its_query_group(batch, groups):
  """Strided groups (group s = samples s, s+G, ...): the key of image i never sits in group
  i mod G, the permutation is a bijection, and each key group mixes the other groups."""
  # Jitted (batch and groups static): one compilation per case, not one per op and seed.
  permutation = jax.jit(bn_shuffle.ghost_permutation, static_argnums=(1, 2))
  for seed in range(3):
    perm = np.asarray(permutation(jax.random.key(seed), batch, groups))
    assert sorted(perm) == list(range(batch))
    positions = np.arange(batch)
    assert ((perm % groups) != (positions % groups)).all()
    for h in range(groups):
      sources = set(perm[positions % groups == h] % groups)
      assert h not in sources
      assert len(sources) == min(groups - 1, batch // groups)


def test_ghost_permutation_is_random_and_unpermute_inverts():
  a = np.asarray(bn_shuffle.ghost_permutation(jax.random.key(0), 32, 4))
  b = np.asarray(bn_shuffle.ghost_permutation(jax.random.key(1), 32, 4))
  assert (a != b).any()
  x = jnp.arange(32.0)[:, None] * jnp.ones((1, 3))
  np.testing.assert_array_equal(bn_shuffle.unpermute(x[a], jnp.asarray(a)), x)


def test_ghost_permutation_rejects_bad_groups():
  with pytest.raises(ValueError, match="at least 2"):
    bn_shuffle.ghost_permutation(jax.random.key(0), 8, 1)
  with pytest.raises(ValueError, match="divisible"):
    bn_shuffle.ghost_permutation(jax.random.key(0), 10, 4)
