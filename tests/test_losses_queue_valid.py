"""`queue_valid`: leaving unfilled queue rows out (METHODS.md section 1, "valid count").

The defining identity, checked for every queue-based loss without a second reference: the call
with `queue_valid=mask` equals the call on `queue[mask]` (and `positive_mask[:, mask]`): loss,
every metric, and the gradient w.r.t. the query. Then the same under `jax.shard_map` on 8
devices with the mask split like the queue rows, the queue with no valid row, and bad masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcontrast import losses

import test_losses as tl
import test_losses_sharding as tls

QUEUE_CASES = [c for c in tls.SHARDED_CASES
               if "queue" in c.arrays and c.arrays.get("queue") is not None
               and c.fn != "fnc_multiview"]
CASES_BY_ID = {c.id: c for c in QUEUE_CASES}


def _mask(k, seed=0):
  """About 60% valid rows, in every block of 8, never all."""
  rng = np.random.default_rng(seed)
  mask = rng.random(k) < 0.6
  mask[::8] = True
  mask[1::8] = False
  return mask


def _run(case, arrays, axis_name=None, **extra):
  """Jitted ((loss, metrics), d loss / d query), sharded over 8 devices when axis_name is set.
  One compiled program per case, layout and input shapes (the arrays are its arguments)."""
  names = [n for n in case.positional + case.keyword if arrays[n] is not None]
  names += [n for n in extra]
  values = {**arrays, **extra}
  rest = [values[n] for n in names if n != "query"]
  key = (case.id, axis_name, tuple(names), tuple(np.shape(values[n]) for n in names))
  if key not in _COMPILED:
    _COMPILED[key] = _compile(case, arrays, names, axis_name, tuple(extra))
  return _COMPILED[key](values["query"], *rest)


_COMPILED = {}


def _compile(case, arrays, names, axis_name, extra):
  fn = getattr(losses, case.fn)
  specs = {**tls.SPECS, "queue_valid": P("data")}
  kw = {} if axis_name is None else {"axis_name": axis_name}

  def inner(*vals):
    a = {**arrays, **dict(zip(names, vals))}
    return fn(*[a[n] for n in case.positional],
              **{n: a[n] for n in case.keyword + tuple(extra)}, **case.kwargs, **kw)

  if axis_name is not None:
    inner = jax.shard_map(inner, mesh=tls.mesh(), in_specs=tuple(specs[n] for n in names),
                          out_specs=P(), check_vma=True)
  i = names.index("query")
  f = lambda x, *r: inner(*r[:i], x, *r[i:])
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _assert_same(got, want):
  tls.assert_same_value_and_grad(got, want, grad_floor=1e-6)


def _kept(case, mask):
  arrays = dict(case.arrays)
  arrays["queue"] = arrays["queue"][mask]
  if "positive_mask" in arrays:
    arrays["positive_mask"] = arrays["positive_mask"][:, mask]
  return arrays


@pytest.mark.parametrize("case_id", list(CASES_BY_ID))
def test_masked_rows_are_left_out(case_id):
  """One test per case, so that its masked program is compiled once for the three checks:
  the masked call equals the call on the kept rows; sharded over 8 devices it equals the
  single-device call; with no valid row it is finite (see _assert_no_valid_row_is_finite)."""
  case = CASES_BY_ID[case_id]
  mask = _mask(case.arrays["queue"].shape[0])
  masked = _run(case, case.arrays, queue_valid=jnp.asarray(mask))
  _assert_same(masked, _run(case, _kept(case, mask)))
  assert np.abs(masked[1]).max() > 0
  # And the mask matters: the unmasked call differs.
  assert abs(float(_run(case, case.arrays)[0][0]) - float(masked[0][0])) > 1e-4
  # Sharded: the mask split like the queue rows.
  mask = jnp.asarray(_mask(case.arrays["queue"].shape[0], seed=1))
  _assert_same(_run(case, case.arrays, axis_name="data", queue_valid=mask),
               _run(case, case.arrays, queue_valid=mask))
  _assert_no_valid_row_is_finite(case)


def _assert_no_valid_row_is_finite(case):
  """An empty queue (the first step with `queue.mask_unfilled`): finite loss and gradient; the
  InfoNCE forms keep only the positive (loss 0), the regularisers vanish."""
  none = jnp.zeros(case.arrays["queue"].shape[0], bool)
  (loss, metrics), grad = _run(case, case.arrays, queue_valid=none)
  assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
  assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
  if case.fn in ("moco_infonce", "multi_positive_infonce", "co2_consistency",
                 "xmoco_negative_uniformity") or (case.fn == "fnc"):
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)
  if case.fn == "fnc":
    assert float(metrics["num_false_negatives"]) == 0.0


def test_sce_with_no_valid_row_targets_the_positive():
  """Nothing to spread the similarity part over: the target is one-hot on the positive, and with
  only the positive column the cross-entropy is 0 in both the code and the paper variants."""
  for case_id in ("sce", "sce-mask_self"):
    case = CASES_BY_ID[case_id]
    none = jnp.zeros(case.arrays["queue"].shape[0], bool)
    (loss, metrics), _ = _run(case, case.arrays, queue_valid=none)
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(metrics["target_entropy"]), 0.0, atol=1e-6)


@pytest.mark.parametrize("bad", [np.ones(5, bool), np.ones((64, 1), bool)])
def test_bad_queue_valid_shape(bad):
  a = tl.qk_queue(0, 4, 64, 8)
  with pytest.raises(ValueError, match="queue_valid"):
    losses.moco_infonce(a["query"], a["key"], a["queue"], queue_valid=bad)


def test_all_valid_equals_no_mask():
  case = CASES_BY_ID["moco"]
  every = jnp.ones(case.arrays["queue"].shape[0], bool)
  _assert_same(_run(case, case.arrays, queue_valid=every), _run(case, case.arrays))
