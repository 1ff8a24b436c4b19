"""jaxcontrast.losses API contract: l2_normalize, ValueErrors, and import isolation."""
from __future__ import annotations

import os
import subprocess
import sys

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
  """Control for the test above: the same base arrays are accepted as they are."""
  losses.moco_infonce(Q, KEY, QUEUE)
  losses.moco_infonce(Q, KEY, None)
  losses.sce(Q, KEY, QUEUE)
  losses.co2_consistency(Q, KEY, QUEUE)
  losses.xmoco_cross_consistency(Q, KEY)
  losses.xmoco_negative_uniformity(Q, QUEUE)
  losses.fnc(Q, KEY, QUEUE, support_keys=SUPPORT)
  losses.fnc(Q, KEY, QUEUE, support_keys=SUPPORT, mode="elimination")
  losses.fnc_multiview(VIEWS, VIEWS, QUEUE)
  losses.multi_positive_infonce(Q, KEY, QUEUE, positive_mask=MASK, temperature=0.1)


def test_import_pulls_in_neither_flax_nor_tensorflow():
  """`losses/` is pure jax: importing it alone must not load flax or tensorflow."""
  code = ("import sys, jaxcontrast.losses\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'tensorflow'))\n"
          "print(bad)\n"
          "sys.exit(1 if bad else 0)\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 0, res.stdout + res.stderr
