"""jaxcontrast.losses API contract: l2_normalize, ValueErrors, and import isolation."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from jaxcontrast import losses

B, KQ, D, S, V = 4, 7, 5, 2, 2
_RNG = np.random.default_rng(0)
Q = _RNG.normal(size=(B, D)).astype(np.float32)
KEY = _RNG.normal(size=(B, D)).astype(np.float32)
QUEUE = ref.l2_normalize(_RNG.normal(size=(KQ, D))).astype(np.float32)
SUPPORT = _RNG.normal(size=(B, S, D)).astype(np.float32)
VIEWS = _RNG.normal(size=(V, B, D)).astype(np.float32)
MASK = np.zeros((B, KQ), bool)


def test_l2_normalize_matches_reference():
  """Unit rows equal to x / ||x||, along the requested axis, idempotent."""
  x = _RNG.normal(size=(3, 6)).astype(np.float32) * 5
  got = losses.l2_normalize(x)
  np.testing.assert_allclose(got, ref.l2_normalize(x), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses.l2_normalize(got), got, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses.l2_normalize(x, axis=0), ref.l2_normalize(x, axis=0),
                             rtol=1e-6, atol=1e-7)


def test_l2_normalize_zero_row_is_finite():
  """eps guards the zero vector: it maps to zeros, not NaN."""
  out = losses.l2_normalize(jnp.zeros((2, 3)))
  assert np.all(np.asarray(out) == 0)


def _bad_calls():
  """(id, thunk, substring the ValueError message must contain)."""
  moco, sce, co2 = losses.moco_infonce, losses.sce, losses.co2_consistency
  xc, xu = losses.xmoco_cross_consistency, losses.xmoco_negative_uniformity
  fnc, mv, mp = losses.fnc, losses.fnc_multiview, losses.multi_positive_infonce
  q3 = Q[None]
  return [
      ("moco-query-3d", lambda: moco(q3, KEY, QUEUE), "query"),
      ("moco-query-1d", lambda: moco(Q[0], KEY, QUEUE), "query"),
      ("moco-key-batch", lambda: moco(Q, KEY[:3], QUEUE), "key"),
      ("moco-key-dim", lambda: moco(Q, KEY[:, :4], QUEUE), "key"),
      ("moco-queue-dim", lambda: moco(Q, KEY, QUEUE[:, :4]), "queue"),
      ("moco-queue-1d", lambda: moco(Q, KEY, QUEUE[0]), "queue"),
      ("moco-temperature-0", lambda: moco(Q, KEY, QUEUE, temperature=0.0), "temperature"),
      ("moco-temperature-neg", lambda: moco(Q, KEY, QUEUE, temperature=-0.1), "temperature"),
      ("moco-inbatch-key", lambda: moco(Q, KEY[:3], None), "key"),
      ("sce-queue-dim", lambda: sce(Q, KEY, QUEUE[:, :4]), "queue"),
      ("sce-temperature", lambda: sce(Q, KEY, QUEUE, temperature=0.0), "temperature"),
      ("sce-target_temperature", lambda: sce(Q, KEY, QUEUE, target_temperature=-1.0),
       "target_temperature"),
      ("co2-key-dim", lambda: co2(Q, KEY[:, :4], QUEUE), "key"),
      ("co2-queue-dim", lambda: co2(Q, KEY, QUEUE[:, :4]), "queue"),
      ("co2-temperature", lambda: co2(Q, KEY, QUEUE, temperature=0.0), "temperature"),
      ("xcross-key-batch", lambda: xc(Q, KEY[:3]), "key"),
      ("xcross-query-3d", lambda: xc(q3, KEY), "query"),
      ("xcross-divergence", lambda: xc(Q, KEY, divergence="l1"), "divergence"),
      ("xcross-pairs", lambda: xc(Q, KEY, pairs="both"), "pairs"),
      ("xcross-temperature", lambda: xc(Q, KEY, temperature=-0.1), "temperature"),
      ("xunif-queue-dim", lambda: xu(Q, QUEUE[:, :4]), "queue"),
      ("xunif-query-1d", lambda: xu(Q[0], QUEUE), "query"),
      ("xunif-temperature", lambda: xu(Q, QUEUE, temperature=0.0), "temperature"),
      ("fnc-mode", lambda: fnc(Q, KEY, QUEUE, support_keys=SUPPORT, mode="repulsion"), "mode"),
      ("fnc-top_k-0", lambda: fnc(Q, KEY, QUEUE, SUPPORT, top_k=0), "top_k"),
      ("fnc-top_k-float", lambda: fnc(Q, KEY, QUEUE, SUPPORT, top_k=2.0), "top_k"),
      ("fnc-threshold-nan", lambda: fnc(Q, KEY, QUEUE, SUPPORT, threshold=np.float32("nan")),
       "threshold"),
      ("fnc-threshold-nan-jnp", lambda: fnc(Q, KEY, QUEUE, SUPPORT, threshold=jnp.array(np.nan)),
       "threshold"),
      ("fnc-no-queue", lambda: fnc(Q, KEY, None, SUPPORT), "queue"),
      ("fncdetect-top_k", lambda: losses.fnc_detect(KEY, QUEUE, SUPPORT, top_k=-1), "top_k"),
      ("sce-coeff-np", lambda: sce(Q, KEY, QUEUE, coeff=np.float32(1.5)), "coeff"),
      ("sce-no-queue", lambda: sce(Q, KEY, None), "queue"),
      ("sce-mask_self-str", lambda: sce(Q, KEY, QUEUE, mask_self="yes"), "mask_self"),
      ("moco-stop_gradient-int", lambda: moco(Q, KEY, QUEUE, stop_gradient=0), "stop_gradient"),
      ("moco-unnormalised-queue-promised", lambda: moco(Q, KEY, 2 * QUEUE, normalize_queue=False),
       "normalize_queue"),
      ("ntxent-shape", lambda: losses.nt_xent(Q, KEY[:3]), "view2"),
      ("ntxent-temperature", lambda: losses.nt_xent(Q, KEY, temperature=jnp.array(0.0)),
       "temperature"),
      ("fnc-support-2d", lambda: fnc(Q, KEY, QUEUE, support_keys=SUPPORT[:, 0]),
       "support_keys"),
      ("fnc-support-batch", lambda: fnc(Q, KEY, QUEUE, support_keys=SUPPORT[:3]),
       "support_keys"),
      ("fnc-support-dim", lambda: fnc(Q, KEY, QUEUE, support_keys=SUPPORT[..., :4]),
       "support_keys"),
      ("fnc-queue-dim", lambda: fnc(Q, KEY, QUEUE[:, :4], support_keys=SUPPORT), "queue"),
      ("fnc-temperature", lambda: fnc(Q, KEY, QUEUE, support_keys=SUPPORT, temperature=0.0),
       "temperature"),
      ("fncmv-views-2d", lambda: mv(VIEWS[0], VIEWS, QUEUE), "views"),
      ("fncmv-target-shape", lambda: mv(VIEWS, VIEWS[:, :3], QUEUE), "target_views"),
      ("fncmv-queue-dim", lambda: mv(VIEWS, VIEWS, QUEUE[:, :4]), "queue"),
      ("fncmv-temperature", lambda: mv(VIEWS, VIEWS, QUEUE, temperature=-1.0), "temperature"),
      ("multipos-mask-cols", lambda: mp(Q, KEY, QUEUE, positive_mask=np.zeros((B, KQ + 1), bool),
                                        temperature=0.1), "positive_mask"),
      ("multipos-mask-rows", lambda: mp(Q, KEY, QUEUE, positive_mask=MASK[:3], temperature=0.1),
       "positive_mask"),
      ("multipos-mask-1d", lambda: mp(Q, KEY, QUEUE, positive_mask=MASK[0], temperature=0.1),
       "positive_mask"),
      ("multipos-temperature", lambda: mp(Q, KEY, QUEUE, positive_mask=MASK, temperature=0.0),
       "temperature"),
  ]


_BAD = _bad_calls()


@pytest.mark.parametrize("thunk,word", [b[1:] for b in _BAD], ids=[b[0] for b in _BAD])
def test_bad_input_raises_value_error(thunk, word):
  """Bad shapes, temperatures and option strings raise ValueError naming the argument."""
  with pytest.raises(ValueError, match=word):
    thunk()


def test_good_inputs_do_not_raise():
  """Control for the test above: the same base arrays are accepted as they are.

  The calls are traced by jax.eval_shape, nothing compiled or run: the checks of shapes, dtypes
  and (concrete, closed-over) hyper-parameters run as in an eager call. None of these calls
  promises unit queue rows, the one check made on concrete array values."""
  calls = [
      lambda: losses.moco_infonce(Q, KEY, QUEUE),
      lambda: losses.moco_infonce(Q, KEY, None),
      lambda: losses.sce(Q, KEY, QUEUE),
      lambda: losses.co2_consistency(Q, KEY, QUEUE),
      lambda: losses.xmoco_cross_consistency(Q, KEY),
      lambda: losses.xmoco_negative_uniformity(Q, QUEUE),
      lambda: losses.fnc(Q, KEY, QUEUE, support_keys=SUPPORT),
      lambda: losses.fnc(Q, KEY, QUEUE, support_keys=SUPPORT, mode="elimination"),
      lambda: losses.fnc_multiview(VIEWS, VIEWS, QUEUE),
      lambda: losses.multi_positive_infonce(Q, KEY, QUEUE, positive_mask=MASK, temperature=0.1),
      lambda: losses.multi_positive_infonce(Q, KEY, QUEUE, MASK),
      lambda: losses.nt_xent(Q, KEY),
  ]
  for call in calls:
    loss, _ = jax.eval_shape(call)
    assert loss.shape == ()


def test_import_pulls_in_neither_flax_nor_tensorflow():
  """`losses/` is pure jax: importing it alone must not load flax, tensorflow or ml_collections.
  Then, in the same subprocess (one Python start-up), with flax and ml_collections made
  unimportable: the losses and their queue work; models and the train step say which extra to
  install."""
  code = """
import sys
import jaxcontrast.losses
bad = sorted(m for m in sys.modules
             if m.split('.')[0] in ('flax', 'tensorflow', 'ml_collections'))
print("loaded", bad)
if bad:
  sys.exit(1)
sys.modules["flax"] = None
sys.modules["ml_collections"] = None
import jax, numpy as np
from jaxcontrast import losses
q = losses.queue.enqueue(losses.queue.init(jax.random.PRNGKey(0), 8, 4), np.ones((2, 4)))
print("valid", int(losses.queue.valid_rows(q).sum()))
for part in ("jaxcontrast.models", "jaxcontrast.step.queue"):
  try:
    __import__(part)
  except ImportError as e:
    print(part, "->", e)
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr
  lines = res.stdout.splitlines()
  assert "loaded []" in lines and "valid 2" in lines, res.stdout
  for part in ("jaxcontrast.models", "jaxcontrast.step"):
    assert any(line.startswith(part) and "pip install 'jaxcontrast[train]'" in line
               for line in lines), res.stdout


TEMPERATURE_CALLS = {
    "moco_infonce": lambda t: losses.moco_infonce(Q, KEY, QUEUE, temperature=t),
    "moco_infonce-inbatch": lambda t: losses.moco_infonce(Q, KEY, temperature=t),
    "nt_xent": lambda t: losses.nt_xent(Q, KEY, temperature=t),
    "sce": lambda t: losses.sce(Q, KEY, QUEUE, temperature=t),
    "sce-target": lambda t: losses.sce(Q, KEY, QUEUE, target_temperature=t),
    "co2_consistency": lambda t: losses.co2_consistency(Q, KEY, QUEUE, temperature=t),
    "xmoco_cross_consistency": lambda t: losses.xmoco_cross_consistency(Q, KEY, temperature=t),
    "xmoco_negative_uniformity": lambda t: losses.xmoco_negative_uniformity(Q, QUEUE,
                                                                            temperature=t),
    "fnc": lambda t: losses.fnc(Q, KEY, QUEUE, SUPPORT, temperature=t),
    "fnc_multiview": lambda t: losses.fnc_multiview(VIEWS, VIEWS, QUEUE, temperature=t),
    "multi_positive_infonce": lambda t: losses.multi_positive_infonce(Q, KEY, QUEUE, MASK,
                                                                      temperature=t),
}
BAD_TEMPERATURES = {"np-zero": np.float32(0), "jnp-zero": jnp.array(0.0),
                    "jnp-negative": jnp.array(-0.2), "np-inf": np.float64(np.inf),
                    "py-zero": 0}


@pytest.mark.parametrize("value", list(BAD_TEMPERATURES.values()), ids=list(BAD_TEMPERATURES))
@pytest.mark.parametrize("name", list(TEMPERATURE_CALLS))
def test_concrete_temperature_checked_whatever_its_type(name, value):
  """Python, NumPy and concrete JAX scalars are validated alike (a NaN loss or a negative
  temperature's 8.05 are no results)."""
  with pytest.raises(ValueError, match="temperature"):
    TEMPERATURE_CALLS[name](value)


def test_good_scalar_types_are_accepted_and_equal():
  """np.float32 / jnp scalars give the loss of the same Python float; under jit a traced
  temperature (a schedule) is not checked and gives the same value too."""
  # Closed over, the scalars stay concrete (checked as in an eager call); one compiled program.
  want, *got = jax.jit(lambda q, k, n: [
      losses.moco_infonce(q, k, n, temperature=t)[0]
      for t in (0.2, np.float32(0.2), jnp.array(0.2))])(Q, KEY, QUEUE)
  for g in got:
    np.testing.assert_allclose(g, want, rtol=1e-6)
  traced = jax.jit(lambda t: losses.moco_infonce(Q, KEY, QUEUE, temperature=t)[0])(0.2)
  np.testing.assert_allclose(traced, want, rtol=1e-6)


def test_static_options_say_so_under_jit():
  """top_k / mode / booleans traced by jax.jit: a ValueError saying "static Python value"."""
  with pytest.raises(ValueError, match="top_k must be a static Python value"):
    jax.jit(losses.fnc_multiview)(VIEWS, VIEWS, QUEUE, top_k=5)
  with pytest.raises(ValueError, match="top_k must be a static Python value"):
    jax.jit(losses.fnc)(Q, KEY, QUEUE, SUPPORT, top_k=5)
  with pytest.raises(ValueError, match="mask_self must be a static Python value"):
    jax.jit(losses.sce)(Q, KEY, QUEUE, mask_self=True)
  with pytest.raises(ValueError, match="stop_gradient must be a static Python value"):
    jax.jit(losses.moco_infonce)(Q, KEY, QUEUE, stop_gradient=False)
  # A string cannot be traced at all: jax.jit refuses it before the loss runs, naming it.
  with pytest.raises(TypeError, match="static"):
    jax.jit(losses.fnc)(Q, KEY, QUEUE, SUPPORT, mode="elimination")
  # Marked static, all of them work.
  static = jax.jit(losses.fnc, static_argnames=("mode", "top_k"))
  got = static(Q, KEY, QUEUE, SUPPORT, top_k=5, mode="elimination")[0]
  # The same call with the options closed over (as an eager call passes them).
  want = jax.jit(lambda *a: losses.fnc(*a, top_k=5, mode="elimination")[0])(Q, KEY, QUEUE,
                                                                          SUPPORT)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_numpy_integer_top_k_is_accepted():
  # NumPy integers closed over are static, as in an eager call; one compiled program.
  a, b, (fn, _) = jax.jit(lambda v, q, k, s: (
      losses.fnc_multiview(v, v, q, top_k=np.int64(2), threshold=0.1),
      losses.fnc_multiview(v, v, q, top_k=2, threshold=0.1),
      losses.fnc_detect(k, q, s, top_k=np.int32(1), threshold=-1.0)))(VIEWS, QUEUE, KEY, SUPPORT)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-7)
  assert np.asarray(fn).sum(1).tolist() == [1] * B


QUEUE_CALLS = {
    "moco_infonce": lambda queue, **kw: losses.moco_infonce(Q, KEY, queue, **kw),
    "sce": lambda queue, **kw: losses.sce(Q, KEY, queue, **kw),
    "co2_consistency": lambda queue, **kw: losses.co2_consistency(Q, KEY, queue, **kw),
    "xmoco_negative_uniformity": lambda queue, **kw: losses.xmoco_negative_uniformity(
        Q, queue, **kw),
    "fnc": lambda queue, **kw: losses.fnc(Q, KEY, queue, SUPPORT, threshold=0.2, **kw),
    "fnc_detect": lambda queue, **kw: losses.fnc_detect(KEY, queue, SUPPORT, threshold=0.2,
                                                        **kw),
    "fnc_multiview": lambda queue, **kw: losses.fnc_multiview(VIEWS, VIEWS, queue, threshold=0.2,
                                                              **kw),
    "multi_positive_infonce": lambda queue, **kw: losses.multi_positive_infonce(
        Q, KEY, queue, MASK, **kw),
}


@pytest.mark.parametrize("name", list(QUEUE_CALLS))
def test_queue_rows_are_normalised_inside(name):
  """The queue's contract: rows are L2-normalised in the loss, so a queue of rows of any norm
  gives the unit-row result (an unnormalised queue gave 7.52 instead of 1.01); promising unit
  rows (`normalize_queue=False`) is checked on a concrete queue."""
  scale = np.float32([[0.1], [3.0], [1.0], [7.0], [0.5], [2.0], [1.0]])
  unit_loss, unit_metrics = QUEUE_CALLS[name](QUEUE)
  raw_loss, raw_metrics = QUEUE_CALLS[name](QUEUE * scale)
  np.testing.assert_allclose(np.asarray(raw_loss, np.float32), np.asarray(unit_loss, np.float32),
                             rtol=1e-5, atol=1e-6)
  for key, value in unit_metrics.items():
    np.testing.assert_allclose(raw_metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  promised_loss, _ = QUEUE_CALLS[name](QUEUE, normalize_queue=False)
  np.testing.assert_allclose(np.asarray(promised_loss, np.float32),
                             np.asarray(unit_loss, np.float32), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="row 0 has norm 0.1"):
    QUEUE_CALLS[name](QUEUE * scale, normalize_queue=False)


def test_unnormalised_queue_promise_skips_invalid_rows():
  """Rows outside queue_valid may be anything (e.g. zeros never written)."""
  queue = QUEUE.copy()
  queue[0] = 0.0
  valid = np.ones(KQ, bool)
  valid[0] = False
  losses.moco_infonce(Q, KEY, queue, queue_valid=valid, normalize_queue=False)
  with pytest.raises(ValueError, match="row 0"):
    losses.moco_infonce(Q, KEY, queue, normalize_queue=False)


def test_signatures_follow_one_convention():
  """Arrays positional, hyper-parameters keyword-only with defaults, typed precision, the
  (loss, metrics) return type, no private type in a public signature."""
  import inspect  # pylint: disable=g-import-not-at-top
  import typing  # pylint: disable=g-import-not-at-top
  arrays = {"query", "key", "queue", "support_keys", "positive_mask", "views", "target_views",
            "view1", "view2"}
  for name in losses.__all__:
    if name in ("l2_normalize", "queue"):
      continue
    fn = getattr(losses, name)
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    assert hints["return"] == tuple[jax.Array, dict[str, jax.Array]], name
    assert hints["precision"] == jax.lax.PrecisionLike, name
    for p in sig.parameters.values():
      if p.name in arrays:
        assert p.kind is p.POSITIONAL_OR_KEYWORD, (name, p.name)
      else:
        assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, (name, p.name)
      assert "_core" not in str(p.annotation), (name, p.name)
    if "queue" in sig.parameters and name in ("moco_infonce", "fnc_multiview"):
      assert sig.parameters["queue"].default is None, name
