"""Every loss under `jax.shard_map` on 8 devices equals the single-device call.

Layout (DESIGN.md, "The negative queue on many devices"): query, key and support_keys split on
the batch axis, the queue split by rows (device i holds rows [i*K/8, (i+1)*K/8)), views and
target_views on their batch axis 1, positive_mask by columns (matching the queue rows); loss and
metrics come out replicated. Compared: loss, every metric, and the gradient w.r.t. the query
(views for fnc_multiview) taken through the whole shard_map-wrapped function.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcontrast import losses
from jaxcontrast.sharding import make_mesh

import test_losses as tl

N_DEV = 8
BG, K, D = 16, 64, 8
ROWS = P("data")
COLS = P(None, "data")
SPECS = {"query": ROWS, "key": ROWS, "queue": ROWS, "support_keys": ROWS, "views": COLS,
         "target_views": COLS, "positive_mask": COLS, "view1": ROWS, "view2": ROWS}


def mesh():
  """The N_DEV-device mesh of the sharded loss tests.

  On CPU the suite simulates 8 devices, so fewer is a set-up error and the test fails. On an
  accelerator with fewer (one GPU, where docs/CONTRIBUTING.md runs the loss tests) it skips.
  """
  if jax.default_backend() != "cpu" and jax.device_count() < N_DEV:
    pytest.skip(f"needs {N_DEV} devices, {jax.default_backend()} has {jax.device_count()}")
  return make_mesh(N_DEV)


def _fnc_sharded_inputs(seed):
  """FNC inputs whose planted false negatives are spread over the 8 queue blocks.

  Anchor b gets rows near its key in several blocks (more than top_k for the even anchors, so
  the per-block top-k merge matters); anchor 3 gets two rows near a support view.
  """
  rng = np.random.default_rng(seed)
  query, key = tl._query_key(rng, BG, D)
  support = rng.normal(size=(BG, 2, D))
  queue = tl._queue(rng, K, D)
  for b in range(BG):
    n_plant = 5 if b % 2 == 0 else 1
    for j in range(n_plant):
      row = (8 * j + 3 * b + 1) % K
      queue[row] = tl._near(rng, key[b], 0.1 + 0.12 * j)
  queue[(3 * 3 + 5) % K] = tl._near(rng, support[3, 1], 0.2)
  return tl._f32(query=query, key=key, queue=queue, support_keys=support)


TIED_ROWS = (2, 19, 36, 62)   # in queue blocks 0, 2, 4 and 7 of 8


def _fnc_sharded_ties(seed):
  """`_fnc_sharded_inputs` plus four identical queue rows equal to anchor 0's key, in four
  different blocks: with top_k 3 the tie at the top must keep the three lowest global indices,
  across devices, as the official tf.math.top_k does."""
  arrays = _fnc_sharded_inputs(seed)
  key = arrays["key"][0].astype(np.float64)
  for row in TIED_ROWS:
    arrays["queue"][row] = (key / np.linalg.norm(key)).astype(np.float32)
  return arrays


def _multiview_sharded_inputs(seed):
  rng = np.random.default_rng(seed)
  arrays = tl.multiview_inputs(seed, 2, BG, K, D)
  queue = arrays["queue"].astype(np.float64)
  base = arrays["target_views"].astype(np.float64).mean(0)
  for b in range(0, BG, 3):
    for j in range(3):
      queue[(8 * j + 5 * b + 2) % K] = tl._near(rng, base[b], 0.1 + 0.1 * j)
  arrays["queue"] = queue.astype(np.float32)
  return arrays


SHARDED_CASES = [
    tl._moco("moco", tl.qk_queue(200, BG, K, D), temperature=0.2),
    tl._moco("moco-inbatch", tl.qk_queue(201, BG, None, D), temperature=0.2),
    tl._sce("sce", tl.qk_queue(202, BG, K, D)),
    tl._sce("sce-mask_self", tl.qk_queue(202, BG, K, D), mask_self=True),
    tl._co2("co2", tl.qk_queue(203, BG, K, D)),
    tl._co2("co2-incpos", tl.qk_queue(203, BG, K, D), include_positive=True),
    tl._xcross("xcross-kl-query", tl.qk_queue(204, BG, None, D)),
    tl._xcross("xcross-kl-cross", tl.qk_queue(204, BG, None, D), pairs="cross"),
    tl._xcross("xcross-mse-query", tl.qk_queue(204, BG, None, D), divergence="mse"),
    tl._xcross("xcross-mse-cross", tl.qk_queue(204, BG, None, D), divergence="mse",
               pairs="cross"),
    tl._xunif("xunif", tl.qk_queue(205, BG, K, D)),
    tl._xunif("xunif-per_sample", tl.qk_queue(205, BG, K, D), per_sample=True),
    tl._fnc("fnc-attr", _fnc_sharded_inputs(206), top_k=3),
    tl._fnc("fnc-elim", _fnc_sharded_inputs(206), top_k=3, mode="elimination"),
    tl._fnc("fnc-ties-across-blocks", _fnc_sharded_ties(209), top_k=3),
    tl._fnc_mv("fncmv", _multiview_sharded_inputs(207), top_k=3),
    tl._multipos("multipos", tl.multipos_inputs(208, BG, K, D), temperature=0.1),
]
SHARDED_BY_ID = {c.id: c for c in SHARDED_CASES}


def _value_and_grad(case, axis_name=None):
  """Jitted (loss, metrics), d/d query of the library; sharded when axis_name is given."""
  fn = getattr(losses, case.fn)
  names = [n for n in case.positional + case.keyword if case.arrays[n] is not None]
  extra = {} if axis_name is None else {"axis_name": axis_name}

  def inner(*vals):
    arrays = {**case.arrays, **dict(zip(names, vals))}
    return tl._call(fn, case, arrays, **extra)

  if axis_name is not None:
    inner = jax.shard_map(inner, mesh=mesh(), in_specs=tuple(SPECS[n] for n in names),
                          out_specs=P(), check_vma=True)
  i = names.index(case.grad_arg)

  def f(x, *rest):
    return inner(*rest[:i], x, *rest[i:])

  rest = [case.arrays[n] for n in names if n != case.grad_arg]
  return jax.jit(jax.value_and_grad(f, has_aux=True))(case.arrays[case.grad_arg], *rest)


def assert_same_value_and_grad(got, want, grad_floor=0.0):
  """Two `((loss, metrics), grad)` equal at float32 tolerance; returns max |grad| of `want`. The
  gradient tolerance is relative to that scale (or `grad_floor`, for gradients that may be 0)."""
  ((loss_g, metrics_g), grad_got), ((loss_w, metrics_w), grad_want) = got, want
  np.testing.assert_allclose(loss_g, loss_w, rtol=2e-5, atol=2e-6)
  assert set(metrics_g) == set(metrics_w)
  for name in metrics_w:
    np.testing.assert_allclose(metrics_g[name], metrics_w[name], rtol=2e-5, atol=2e-6,
                               err_msg=name)
  scale = float(np.max(np.abs(grad_want)))
  np.testing.assert_allclose(grad_got, grad_want, rtol=1e-4, atol=1e-5 * max(scale, grad_floor))
  return scale


def test_fnc_sharded_inputs_detect_across_blocks():
  """Sanity of the inputs: false negatives found in several queue blocks, top_k binding."""
  a = SHARDED_BY_ID["fnc-attr"].arrays
  fn = tl.ref.fnc_detect(a["key"], a["support_keys"], a["queue"], threshold=0.7, top_k=3)
  every = tl.ref.fnc_detect(a["key"], a["support_keys"], a["queue"], threshold=0.7, top_k=K)
  assert (fn.sum(1) < every.sum(1)).any()
  assert len({c // (K // N_DEV) for c in np.nonzero(fn.any(0))[0]}) >= 4


def test_fnc_ties_across_blocks_keep_the_lowest_indices():
  """Anchor 0: four tied rows at cosine 1 in four blocks, top_k 3 -> the first three, on one
  device and on eight (the library's own mask, against the reference's)."""
  a = SHARDED_BY_ID["fnc-ties-across-blocks"].arrays
  want = tl.ref.fnc_detect(a["key"], a["support_keys"], a["queue"], threshold=0.7, top_k=3)
  assert want[0, list(TIED_ROWS)].tolist() == [True, True, True, False]
  assert want[0].sum() == 3
  detect = lambda k, s, q, **kw: losses.fnc_detect(k, q, s, threshold=0.7, top_k=3, **kw)[0]
  one = jax.jit(detect)(a["key"], a["support_keys"], a["queue"])
  eight = jax.jit(jax.shard_map(
      lambda k, s, q: detect(k, s, q, axis_name="data"), mesh=mesh(),
      in_specs=(ROWS, ROWS, ROWS), out_specs=P(None, "data"), check_vma=False))(
          a["key"], a["support_keys"], a["queue"])
  np.testing.assert_array_equal(np.asarray(one), want)
  np.testing.assert_array_equal(np.asarray(eight), want)


@pytest.mark.parametrize("case_id", list(SHARDED_BY_ID))
def test_sharded_equals_single_device(case_id):
  """Loss, metrics and d/d query on 8 devices equal the unsharded call on the full arrays."""
  case = SHARDED_BY_ID[case_id]
  single = _value_and_grad(case)
  (loss1, _), _ = single
  scale = assert_same_value_and_grad(_value_and_grad(case, axis_name="data"), single)
  assert scale > 0
  # And both equal the reference (the shapes here are the realistic sharded ones).
  want, _ = tl.reference(case)
  np.testing.assert_allclose(loss1, want, rtol=2e-5, atol=2e-5)
