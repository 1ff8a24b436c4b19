"""Every similarity product of every public loss runs at `lax.Precision.HIGHEST` by default.

CPU tests cannot see TF32 (GPU) or one-pass bfloat16 (TPU) rounding: on CPU every precision gives
the same float32 result. So these tests read the traced program instead: every `dot_general` in
the jaxpr of the loss AND of its gradient (forward and backward products), on one device and
inside `jax.shard_map` on 8, must carry precision (HIGHEST, HIGHEST). `precision=None` (the
backend default) must show up in the program too, so the check can fail.
"""
from __future__ import annotations

import jax
import pytest
from jax import lax
from jax.extend import core as jex_core

from jaxcontrast import losses

import test_losses as tl
import test_losses_sharding as tls

HIGHEST = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
# One case per public loss (and the variants that take another code path).
CASE_IDS = ("moco-B4-K7-D5", "moco-inbatch-B5-D4", "ntxent-B4-D5", "multipos-B4-K7-D5",
            "sce-B4-K7-D5",
            "co2-B4-K7-D5", "co2-incpos-B4-K7-D5", "xcross-kl-query-B5-D4",
            "xcross-mse-cross-B5-D4", "xunif-B4-K7-D5", "fnc-attr-B4-K12-D6-S2-k2",
            "fnc-elim-B4-K12-D6-S2-k2", "fncmv-V2-B3-K8-D6-k2")


def _dot_precisions(jaxpr) -> list:
  """The precision of every dot_general in a (closed) jaxpr, nested jaxprs included."""
  found = []

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr)
  return found


def _loss_and_grad_jaxpr(case, **extra):
  diff = case.float_args()
  fixed = {n: a for n, a in case.arrays.items() if n not in diff}

  def f(*vals):
    return tl._call(getattr(losses, case.fn), case, {**fixed, **dict(zip(diff, vals))}, **extra)

  return jax.make_jaxpr(jax.value_and_grad(f, argnums=tuple(range(len(diff))), has_aux=True))(
      *[case.arrays[n] for n in diff])


def _case(case_id):
  if case_id not in tl.CASES_BY_ID:  # ids drift with the case list: fail loudly, not skip
    raise KeyError(f"no loss case {case_id!r}; known: {sorted(tl.CASES_BY_ID)}")
  return tl.CASES_BY_ID[case_id]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_every_product_is_highest_by_default(case_id):
  precisions = _dot_precisions(_loss_and_grad_jaxpr(_case(case_id)))
  assert len(precisions) >= 2, precisions   # forward and backward products at least
  assert all(p == HIGHEST for p in precisions), precisions


@pytest.mark.parametrize("case_id", ["moco-B4-K7-D5", "fnc-attr-B4-K12-D6-S2-k2"])
def test_precision_keyword_reaches_every_product(case_id):
  default = _dot_precisions(_loss_and_grad_jaxpr(_case(case_id), precision=None))
  assert default and all(p is None for p in default), default


def test_public_losses_all_take_precision():
  import inspect  # pylint: disable=g-import-not-at-top
  names = [n for n in losses.__all__ if n not in ("l2_normalize", "queue")]
  for name in names:
    param = inspect.signature(getattr(losses, name)).parameters.get("precision")
    assert param is not None and param.kind is param.KEYWORD_ONLY, name
    assert param.default is lax.Precision.HIGHEST, name
  covered = {_case(i).fn for i in CASE_IDS}
  assert covered >= set(names) - {"fnc_detect"}, set(names) - covered


@pytest.mark.parametrize("case_id", ["moco", "sce", "fnc-attr", "fncmv"])
def test_sharded_programs_are_highest_too(case_id):
  case = tls.SHARDED_BY_ID[case_id]
  names = [n for n in case.positional + case.keyword if case.arrays[n] is not None]

  def inner(*vals):
    return tl._call(getattr(losses, case.fn), case, {**case.arrays, **dict(zip(names, vals))},
                    axis_name="data")

  sharded = jax.shard_map(inner, mesh=tls.mesh(),
                          in_specs=tuple(tls.SPECS[n] for n in names), out_specs=jax.P(),
                          check_vma=True)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda *v: sharded(*v), has_aux=True))(
      *[case.arrays[n] for n in names])
  precisions = _dot_precisions(jaxpr)
  assert len(precisions) >= 2 and all(p == HIGHEST for p in precisions), precisions


def test_fnc_detect_is_highest():
  a = tl.CASES_BY_ID["fnc-attr-B4-K12-D6-S2-k2"].arrays
  jaxpr = jax.make_jaxpr(lambda k, q, s: losses.fnc_detect(k, q, s, threshold=0.7, top_k=2))(
      a["key"], a["queue"], a["support_keys"])
  precisions = _dot_precisions(jaxpr)
  assert precisions and all(p == HIGHEST for p in precisions), precisions
