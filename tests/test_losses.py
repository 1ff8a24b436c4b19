"""jaxcontrast.losses against the independent NumPy reference (tests/numpy_reference.py).

For every case (function x option x shape) loss, metrics and the gradients w.r.t. every float
input come from one `jax.value_and_grad` call, cached per case; cases with the same function,
static options and shapes share its compiled program (float hyper-parameters are traced
arguments). The tests below check them separately:
  * loss and the unambiguous metrics equal the float64 reference at float32 tolerance;
  * the gradient w.r.t. the query (views for fnc_multiview) equals central finite differences
    of the float64 reference;
  * the gradients w.r.t. the stop-gradient inputs (key, queue, support_keys, target_views) are
    exactly zero.
Plus identities between methods (METHODS.md), regulariser gradients, and bfloat16 promotion.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from jaxcontrast import losses

INFONCE_METRICS = ("pos_logit", "neg_logit", "acc")
FNC_METRICS = INFONCE_METRICS + ("num_false_negatives",)


# ---------------------------------------------------------------------------------------------
# Inputs.


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _near(rng, v, scale):
  """A unit vector close to v (cosine about 1/sqrt(1+scale^2))."""
  d = v.shape[-1]
  return _normalize(_normalize(v) + scale * rng.normal(size=d) / np.sqrt(d))


def _f32(**arrays):
  """Float arrays to float32; None and bool arrays unchanged."""
  return {n: (None if a is None else np.asarray(a, np.float32) if a.dtype.kind == "f" else a)
          for n, a in arrays.items()}


def _query_key(rng, b, d):
  """Raw (unnormalised) query and a key correlated with it."""
  query = rng.normal(size=(b, d))
  key = query + 0.8 * rng.normal(size=(b, d))
  return query, key


def _queue(rng, k, d, duplicate=False):
  queue = _normalize(rng.normal(size=(k, d)))
  if duplicate:  # every row the same vector
    queue = np.repeat(queue[:1], k, axis=0)
  return queue


def qk_queue(seed, b, k, d, duplicate=False):
  """Raw query, correlated raw key, unit-row queue (None when k is None), as float32."""
  rng = np.random.default_rng(seed)
  query, key = _query_key(rng, b, d)
  queue = None if k is None else _queue(rng, k, d, duplicate)
  return _f32(query=query, key=key, queue=queue)


def fnc_inputs(seed, b, k, d, s, ties=False):
  """Query, key, support keys and a queue with rows planted near some anchors' views.

  Rows 0-2 sit near key 0 (detected through the key view); rows 3-4 sit near the last support
  view of the last anchor (detected through a support view only: that key points away from it);
  row 5 is at cosine ~0.55 from key 0 (below the default threshold). With ties=True, rows 0
  and 1 are the same vector, so a top-k boundary tie is exercised (the lower index wins).
  """
  rng = np.random.default_rng(seed)
  support = rng.normal(size=(b, s, d))
  query, key = _query_key(rng, b, d)
  if d > 1:  # the last anchor's key points away from its last support view
    key[-1] = -support[-1, -1] + 0.3 * rng.normal(size=d)
    query[-1] = key[-1] + 0.8 * rng.normal(size=d)
  queue = _queue(rng, k, d)
  if d > 1:
    for row, scale in zip(range(3), (0.15, 0.35, 0.55)):
      queue[row] = _near(rng, key[0], scale)
    queue[3] = _near(rng, support[-1, -1], 0.2)
    queue[4] = _near(rng, support[-1, -1], 0.45)
    queue[5] = _near(rng, key[0], 1.5)
    if ties:
      queue[1] = queue[0]
  return _f32(query=query, key=key, queue=queue, support_keys=support)


def multiview_inputs(seed, v, b, k, d, duplicate=False):
  """Online views Z, target views E and a queue with planted false negatives.

  Image 1 is a near copy of image 0 (in-batch false negatives through the memory's first V*B
  rows), and queue rows 0-1 sit near image b-1.
  """
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(b, d))
  if b >= 2:
    base[1] = base[0] + 0.3 * rng.normal(size=d)
  target_views = base[None] + 0.3 * rng.normal(size=(v, b, d))
  views = target_views + 0.6 * rng.normal(size=(v, b, d))
  queue = _queue(rng, k, d, duplicate)
  if not duplicate:
    queue[0] = _near(rng, base[-1], 0.2)
    queue[1] = _near(rng, base[-1], 0.4)
  return _f32(views=views, target_views=target_views, queue=queue)


def multipos_inputs(seed, b, k, d, duplicate=False):
  """qk_queue plus a random (B, K) positive_mask with an empty row and a multi-positive row."""
  arrays = qk_queue(seed, b, k, d, duplicate)
  rng = np.random.default_rng(seed + 1000)
  mask = rng.random((b, k)) < 0.3
  mask[0] = False  # one row with the key as its only positive
  if b > 1:
    mask[-1, :2] = True  # one row with at least two extra positives
  arrays["positive_mask"] = mask
  return arrays


# ---------------------------------------------------------------------------------------------
# Cases.


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One library call: function name, array inputs (positional then keyword), hyper-parameters.

  `metrics` names the metrics compared with the reference; `tol` scales the tolerances.
  """
  id: str
  fn: str
  positional: tuple
  keyword: tuple
  arrays: dict
  kwargs: dict
  metrics: tuple = ()
  tol: float = 1.0
  # Inputs with a gradient (the others must get exactly zero); None: the first positional.
  grads: tuple = None
  # Whether those gradients are the derivative of the loss (False when a stop-gradient makes
  # them differ from finite differences of the reference; checked analytically instead).
  fd: bool = True

  @property
  def grad_arg(self):
    return self.positional[0]

  @property
  def grad_args(self):
    return (self.positional[0],) if self.grads is None else self.grads

  def float_args(self):
    return [n for n in self.positional + self.keyword
            if self.arrays[n] is not None and self.arrays[n].dtype.kind == "f"]


QK_Q = ("query", "key", "queue")


def _moco(id_, arrays, metrics=INFONCE_METRICS, **kw):
  return Case(id_, "moco_infonce", QK_Q, (), arrays, kw, metrics)


def _sce(id_, arrays, metrics=INFONCE_METRICS, **kw):
  return Case(id_, "sce", QK_Q, (), arrays, kw, metrics)


def _co2(id_, arrays, **kw):
  return Case(id_, "co2_consistency", QK_Q, (), arrays, kw)


def _xcross(id_, arrays, **kw):
  return Case(id_, "xmoco_cross_consistency", ("query", "key"), (),
              {"query": arrays["query"], "key": arrays["key"]}, kw)


def _xunif(id_, arrays, **kw):
  return Case(id_, "xmoco_negative_uniformity", ("query", "queue"), (),
              {"query": arrays["query"], "queue": arrays["queue"]}, kw)


def _fnc(id_, arrays, metrics=("pos_logit", "num_false_negatives"), **kw):
  return Case(id_, "fnc", QK_Q + ("support_keys",), (), arrays, kw, metrics)


def _fnc_mv(id_, arrays, **kw):
  return Case(id_, "fnc_multiview", ("views", "target_views", "queue"), (), arrays, kw,
              ("num_false_negatives",))


def _ntxent(id_, arrays, **kw):
  both = ("view1", "view2")
  return Case(id_, "nt_xent", both, (), {"view1": arrays["query"], "view2": arrays["key"]}, kw,
              INFONCE_METRICS, grads=both, fd=not kw.get("stop_gradient", False))


def _multipos(id_, arrays, metrics=("pos_logit",), **kw):
  return Case(id_, "multi_positive_infonce", QK_Q + ("positive_mask",), (), arrays, kw, metrics)


NO_ACC = ("pos_logit", "neg_logit")  # D=1: exact cosine ties make `acc` a coin flip in float32.
LOW_T = 10.0  # tolerance scale at temperature 0.01 (logits up to 100)

CASES = [
    # MoCo v2 InfoNCE.
    _moco("moco-B4-K7-D5", qk_queue(0, 4, 7, 5)),
    _moco("moco-B1-K5-D3", qk_queue(1, 1, 5, 3)),
    _moco("moco-B3-K4-D1", qk_queue(2, 3, 4, 1), metrics=NO_ACC),
    _moco("moco-t0.07", qk_queue(3, 4, 7, 5), temperature=0.07),
    _moco("moco-inbatch-B5-D4", qk_queue(4, 5, None, 4)),
    _moco("moco-inbatch-B1-D3", qk_queue(5, 1, None, 3), metrics=("pos_logit", "acc")),
    dataclasses.replace(_moco("moco-inbatch-nosg-B5-D4", qk_queue(4, 5, None, 4),
                              stop_gradient=False), grads=("query", "key")),
    dataclasses.replace(_moco("moco-nosg-B4-K7-D5", qk_queue(0, 4, 7, 5), stop_gradient=False),
                        grads=("query", "key")),
    _moco("moco-rawqueue-B4-K7-D5", {**qk_queue(0, 4, 7, 5),
                                      "queue": qk_queue(0, 4, 7, 5)["queue"] * 3.0}),
    # SimCLR NT-Xent.
    _ntxent("ntxent-B4-D5", qk_queue(80, 4, None, 5)),
    _ntxent("ntxent-B1-D3", qk_queue(81, 1, None, 3)),
    _ntxent("ntxent-t0.5-B4-D5", qk_queue(82, 4, None, 5), temperature=0.5),
    _ntxent("ntxent-sg-B4-D5", qk_queue(80, 4, None, 5), stop_gradient=True),
    _moco("moco-dupqueue-B4-K7-D5", qk_queue(6, 4, 7, 5, duplicate=True)),
    dataclasses.replace(_moco("moco-t0.01", qk_queue(7, 4, 7, 5), temperature=0.01), tol=LOW_T),
    # SCE.
    _sce("sce-B4-K7-D5", qk_queue(10, 4, 7, 5)),
    _sce("sce-mask_self-B4-K7-D5", qk_queue(10, 4, 7, 5), mask_self=True),
    _sce("sce-tm0.5-B4-K7-D5", qk_queue(16, 4, 7, 5), target_temperature=0.5),
    _sce("sce-mask_self-tm0.5-B4-K7-D5", qk_queue(16, 4, 7, 5), target_temperature=0.5,
         mask_self=True),
    _sce("sce-B1-K3-D2", qk_queue(11, 1, 3, 2)),
    _sce("sce-mask_self-B1-K3-D2", qk_queue(11, 1, 3, 2), mask_self=True),
    _sce("sce-B3-K5-D1", qk_queue(12, 3, 5, 1), metrics=NO_ACC),
    _sce("sce-coeff0.2-B4-K7-D5", qk_queue(13, 4, 7, 5), temperature=0.2,
         target_temperature=0.05, coeff=0.2),
    _sce("sce-dupqueue-B4-K7-D5", qk_queue(14, 4, 7, 5, duplicate=True)),
    dataclasses.replace(_sce("sce-t0.01", qk_queue(15, 4, 7, 5), temperature=0.01,
                             target_temperature=0.01), tol=LOW_T),
    # CO2.
    _co2("co2-B4-K7-D5", qk_queue(20, 4, 7, 5)),
    _co2("co2-incpos-B4-K7-D5", qk_queue(20, 4, 7, 5), include_positive=True),
    _co2("co2-B1-K5-D3", qk_queue(21, 1, 5, 3)),
    _co2("co2-incpos-B3-K4-D1", qk_queue(22, 3, 4, 1), include_positive=True),
    _co2("co2-dupqueue-B4-K7-D5", qk_queue(23, 4, 7, 5, duplicate=True)),
    _co2("co2-incpos-dupqueue-B4-K7-D5", qk_queue(23, 4, 7, 5, duplicate=True),
         include_positive=True),
    dataclasses.replace(_co2("co2-t0.01", qk_queue(24, 4, 7, 5), temperature=0.01), tol=LOW_T),
    # XMoCo cross-similarity consistency.
    _xcross("xcross-kl-query-B5-D4", qk_queue(30, 5, None, 4)),
    _xcross("xcross-kl-cross-B5-D4", qk_queue(30, 5, None, 4), pairs="cross"),
    _xcross("xcross-mse-query-B5-D4", qk_queue(30, 5, None, 4), divergence="mse"),
    _xcross("xcross-mse-cross-B5-D4", qk_queue(30, 5, None, 4), divergence="mse",
            pairs="cross"),
    _xcross("xcross-kl-B1-D3", qk_queue(31, 1, None, 3)),
    _xcross("xcross-mse-B1-D3", qk_queue(31, 1, None, 3), divergence="mse"),
    _xcross("xcross-kl-cross-B1-D3", qk_queue(31, 1, None, 3), pairs="cross"),
    _xcross("xcross-kl-t0.3-B5-D4", qk_queue(32, 5, None, 4), temperature=0.3),
    _xcross("xcross-kl-B4-D1", qk_queue(33, 4, None, 1)),
    dataclasses.replace(_xcross("xcross-kl-t0.01", qk_queue(34, 5, None, 4), temperature=0.01),
                        tol=LOW_T),
    # XMoCo negative uniformity.
    _xunif("xunif-B4-K7-D5", qk_queue(40, 4, 7, 5)),
    _xunif("xunif-per_sample-B4-K7-D5", qk_queue(40, 4, 7, 5), per_sample=True),
    _xunif("xunif-B1-K5-D3", qk_queue(41, 1, 5, 3)),
    _xunif("xunif-B3-K4-D1", qk_queue(42, 3, 4, 1), temperature=0.5),
    _xunif("xunif-dupqueue-B4-K7-D5", qk_queue(43, 4, 7, 5, duplicate=True)),
    dataclasses.replace(_xunif("xunif-t0.01", qk_queue(44, 4, 7, 5), temperature=0.01),
                        tol=LOW_T),
    # FNC, MoCo-queue form.
    _fnc("fnc-attr-B4-K12-D6-S2-k2", fnc_inputs(50, 4, 12, 6, 2), top_k=2),
    _fnc("fnc-elim-B4-K12-D6-S2-k2", fnc_inputs(50, 4, 12, 6, 2), top_k=2, mode="elimination"),
    _fnc("fnc-attr-B3-K9-D6-S3-kall", fnc_inputs(51, 3, 9, 6, 3), top_k=50, threshold=0.5),
    _fnc("fnc-elim-B3-K9-D6-S3-kall", fnc_inputs(51, 3, 9, 6, 3), top_k=50, threshold=0.5,
         mode="elimination"),
    _fnc("fnc-attr-B1-K7-D6-S2", fnc_inputs(52, 1, 7, 6, 2), top_k=2),
    _fnc("fnc-elim-B1-K7-D6-S2", fnc_inputs(52, 1, 7, 6, 2), top_k=2, mode="elimination"),
    _fnc("fnc-attr-B3-K5-D1-S1", fnc_inputs(53, 3, 5, 1, 1), top_k=2),
    _fnc("fnc-elim-B3-K5-D1-S1", fnc_inputs(53, 3, 5, 1, 1), top_k=2, mode="elimination"),
    _fnc("fnc-attr-ties-k1", fnc_inputs(54, 3, 8, 6, 2, ties=True), top_k=1),
    _fnc("fnc-elim-ties-k1", fnc_inputs(54, 3, 8, 6, 2, ties=True), top_k=1, mode="elimination"),
    dataclasses.replace(_fnc("fnc-attr-t0.01", fnc_inputs(55, 4, 12, 6, 2), temperature=0.01,
                             top_k=2), tol=LOW_T),
    dataclasses.replace(_fnc("fnc-elim-t0.01", fnc_inputs(55, 4, 12, 6, 2), temperature=0.01,
                             top_k=2, mode="elimination"), tol=LOW_T),
    # FNC, official multi-view form.
    _fnc_mv("fncmv-V2-B3-K8-D6-k2", multiview_inputs(60, 2, 3, 8, 6), top_k=2),
    _fnc_mv("fncmv-V3-B2-K5-D4-kall", multiview_inputs(61, 3, 2, 5, 4), top_k=100, threshold=0.6),
    _fnc_mv("fncmv-V2-B1-K6-D3", multiview_inputs(62, 2, 1, 6, 3), top_k=3),
    _fnc_mv("fncmv-dupqueue-V2-B3-K8-D6", multiview_inputs(63, 2, 3, 8, 6, duplicate=True),
            top_k=2, threshold=0.3),
    dataclasses.replace(_fnc_mv("fncmv-t0.01", multiview_inputs(64, 2, 3, 8, 6),
                                temperature=0.01, top_k=2), tol=LOW_T),
    dataclasses.replace(_fnc_mv("fncmv-inbatch-nosg-V2-B4-D6",
                                {**multiview_inputs(65, 2, 4, 2, 6), "queue": None}, top_k=2,
                                stop_gradient=False), grads=("views", "target_views")),
    # Multi-positive InfoNCE.
    _multipos("multipos-B4-K7-D5", multipos_inputs(70, 4, 7, 5), temperature=0.1),
    _multipos("multipos-B1-K5-D3", multipos_inputs(71, 1, 5, 3), temperature=0.2),
    _multipos("multipos-B3-K4-D1", multipos_inputs(72, 3, 4, 1), temperature=0.1),
    _multipos("multipos-dupqueue-B4-K7-D5", multipos_inputs(73, 4, 7, 5, duplicate=True),
              temperature=0.1),
    dataclasses.replace(_multipos("multipos-t0.01", multipos_inputs(74, 4, 7, 5),
                                  temperature=0.01), tol=LOW_T),
]
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case ids"

REGULARISER_FNS = ("co2_consistency", "xmoco_cross_consistency", "xmoco_negative_uniformity")


def _call(fn, case, arrays, **extra):
  return fn(*[arrays[n] for n in case.positional], **{n: arrays[n] for n in case.keyword},
            **case.kwargs, **extra)


def reference(case):
  """(loss, metrics) of the NumPy reference; metrics {} for the regularisers. The reference is
  the loss's value: a stop-gradient switch does not change it."""
  kwargs = {n: v for n, v in case.kwargs.items() if n != "stop_gradient"}
  out = _call(getattr(ref, case.fn), dataclasses.replace(case, kwargs=kwargs), case.arrays)
  return out if isinstance(out, tuple) else (out, {})


# Float hyper-parameters are arguments of the compiled program (traced), so that cases with the
# same function, static options and input shapes share one program; the library's defaults
# fill the ones a case leaves out. Their checks on concrete values are in test_losses_api.py.
FLOAT_HYPER = ("temperature", "target_temperature", "coeff", "threshold")


def _hyper_and_static(case):
  params = inspect.signature(getattr(losses, case.fn)).parameters
  hyper = {n: np.float32(case.kwargs.get(n, params[n].default)) for n in FLOAT_HYPER
           if n in params}
  static = tuple(sorted((n, v) for n, v in case.kwargs.items() if n not in FLOAT_HYPER))
  return hyper, static


@functools.lru_cache(maxsize=None)
def _program(fn, positional, keyword, static, diff, others):
  """jit(value_and_grad) of one library function w.r.t. the `diff` inputs; `others` (names of
  the other non-None inputs) and the hyper-parameters are its other arguments."""

  def f(diff_vals, other_vals, hyper):
    a = {**dict.fromkeys(positional + keyword), **dict(zip(others, other_vals)),
         **dict(zip(diff, diff_vals))}
    return getattr(losses, fn)(*[a[n] for n in positional], **{n: a[n] for n in keyword},
                               **dict(static), **hyper)

  return jax.jit(jax.value_and_grad(f, has_aux=True))


def run_library(case, arrays):
  """(loss, metrics, {name: gradient}) of the library on `arrays`, gradients w.r.t. every float
  input; one compiled program per function, static options, input shapes and dtypes."""
  diff = tuple(case.float_args())
  others = tuple(n for n in case.positional + case.keyword
                 if n not in diff and arrays[n] is not None)
  hyper, static = _hyper_and_static(case)
  program = _program(case.fn, case.positional, case.keyword, static, diff, others)
  (loss, metrics), grads = program(tuple(arrays[n] for n in diff),
                                   tuple(arrays[n] for n in others), hyper)
  return loss, metrics, dict(zip(diff, grads))


@functools.lru_cache(maxsize=None)
def library_results(case_id):
  """Loss, metrics and gradients w.r.t. every float input of one compiled library call."""
  return run_library(CASES_BY_ID[case_id], CASES_BY_ID[case_id].arrays)


def _ids(cases):
  return [c.id for c in cases]


# ---------------------------------------------------------------------------------------------
# Reference comparisons.


@pytest.mark.parametrize("case_id", _ids(CASES))
def test_loss_matches_reference(case_id):
  """Loss equals the float64 NumPy reference at float32 tolerance."""
  case = CASES_BY_ID[case_id]
  loss, _, _ = library_results(case_id)
  want, _ = reference(case)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, want, rtol=2e-5 * case.tol, atol=2e-5 * case.tol)


@pytest.mark.parametrize("case_id", _ids(c for c in CASES if c.metrics))
def test_metrics_match_reference(case_id):
  """The unambiguous metrics (positive/negative logit, accuracy, detected FNs) match."""
  case = CASES_BY_ID[case_id]
  _, metrics, _ = library_results(case_id)
  _, want = reference(case)
  for name in case.metrics:
    np.testing.assert_allclose(metrics[name], want[name], rtol=2e-5 * case.tol,
                               atol=2e-5 * case.tol, err_msg=name)


@pytest.mark.parametrize("case_id", _ids(CASES))
def test_output_structure(case_id):
  """Loss is a float32 scalar; metrics a dict of scalars with the documented names."""
  case = CASES_BY_ID[case_id]
  loss, metrics, _ = library_results(case_id)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert isinstance(metrics, dict)
  for name, value in metrics.items():
    assert jnp.shape(value) == (), name
  if case.fn in ("fnc", "fnc_multiview"):
    assert set(FNC_METRICS) <= set(metrics)
  elif case.fn not in REGULARISER_FNS:
    assert set(INFONCE_METRICS) <= set(metrics)


def test_fnc_cases_exercise_detection():
  """Sanity of the FNC inputs: detection fires, and top_k binds or ties in some cases."""
  case = CASES_BY_ID["fnc-attr-B4-K12-D6-S2-k2"]
  a = case.arrays
  fn = ref.fnc_detect(a["key"], a["support_keys"], a["queue"], threshold=0.7, top_k=2)
  above = ref.fnc_detect(a["key"], a["support_keys"], a["queue"], threshold=0.7, top_k=100)
  assert fn[0, :3].sum() == 2 and above[0, :3].all()  # top_k cuts anchor 0 from 3 to 2.
  assert fn[-1, 3:5].all()  # found through a support view only:
  key_only = ref.fnc_detect(a["key"], a["support_keys"][:, :0], a["queue"], threshold=0.7,
                            top_k=2)
  assert not key_only[-1, 3:5].any()
  ties = CASES_BY_ID["fnc-attr-ties-k1"].arrays
  fn = ref.fnc_detect(ties["key"], ties["support_keys"], ties["queue"], threshold=0.7, top_k=1)
  # top_k=1 with rows 0 and 1 tied at the top: the official top_k keeps only the lower index.
  assert fn[0, 0] and not fn[0, 1]
  assert ref.fnc_detect(ties["key"], ties["support_keys"], ties["queue"], threshold=0.7,
                        top_k=2)[0, :2].all()
  mv = CASES_BY_ID["fncmv-V2-B3-K8-D6-k2"].arrays
  fn, _ = ref.fnc_multiview_detect(mv["target_views"], mv["queue"], threshold=0.7, top_k=2)
  assert fn[0, [1, 4]].any() and fn[2, 6:8].any()  # in-batch and queue false negatives


# ---------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("case_id", _ids(c for c in CASES if c.fd))
def test_grad_matches_finite_differences(case_id):
  """d loss / d query (views for fnc_multiview; also the key / targets where no stop-gradient
  applies) equals central differences of the reference."""
  case = CASES_BY_ID[case_id]
  _, _, grads = library_results(case_id)
  for name in case.grad_args:
    got = np.asarray(grads[name], np.float64)

    def f(x, name=name):
      return reference(dataclasses.replace(case, arrays={**case.arrays, name: x}))[0]

    want = ref.numerical_grad(f, case.arrays[name])
    assert np.all(np.isfinite(got))
    scale = max(1.0, np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * scale * case.tol, err_msg=name)


@pytest.mark.parametrize("case_id", _ids(CASES))
def test_grad_stopped_inputs_is_zero(case_id):
  """Key, queue, support_keys and target_views are stop-gradient (unless the case turns it
  off): exactly zero gradient."""
  case = CASES_BY_ID[case_id]
  _, _, grads = library_results(case_id)
  stopped = [n for n in grads if n not in case.grad_args]
  assert (stopped or case.fn in ("xmoco_negative_uniformity", "nt_xent")
          or case.arrays.get("queue") is None or case.grads)
  for name in stopped:
    assert np.all(np.asarray(grads[name]) == 0), name


@pytest.mark.parametrize("case_id", _ids(
    c for c in CASES if c.fn in REGULARISER_FNS and c.tol == 1.0 and "dupqueue" not in c.id
    and c.arrays["query"].shape[0] > 2 and c.arrays["query"].shape[1] > 1))
def test_regulariser_has_gradient(case_id):
  """CO2 / XMoCo regularisers must train the query (lightly's CO2 detached it by mistake).

  Degenerate cases (B <= 2, D = 1, identical queue rows, saturated softmax at T=0.01) are left
  out: their gradient is legitimately zero or tiny.
  """
  _, _, grads = library_results(case_id)
  assert np.max(np.abs(grads["query"])) > 1e-3


# ---------------------------------------------------------------------------------------------
# Identities between methods.


def _assert_same(a, b, metrics=INFONCE_METRICS, rtol=1e-5):
  np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=1e-6)
  for name in metrics:
    np.testing.assert_allclose(a[1][name], b[1][name], rtol=rtol, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("mask_self", [False, True])
def test_sce_coeff_one_is_moco(mask_self):
  """SCE with coeff=1 drops the relational target: it is MoCo's InfoNCE (METHODS section 2)."""
  a = qk_queue(100, 5, 11, 6)
  got, want = jax.jit(lambda q, k, n: (
      losses.sce(q, k, n, temperature=0.15, coeff=1.0, mask_self=mask_self),
      losses.moco_infonce(q, k, n, temperature=0.15)))(a["query"], a["key"], a["queue"])
  _assert_same(got, want)


@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_fnc_threshold_above_one_is_moco(mode):
  """No cosine exceeds 1, so nothing is detected and FNC reduces to InfoNCE, metrics included."""
  a = fnc_inputs(101, 4, 12, 6, 2)
  (loss, metrics), want = jax.jit(lambda q, k, n, s: (
      losses.fnc(q, k, n, support_keys=s, temperature=0.1, threshold=1.5, top_k=5, mode=mode),
      losses.moco_infonce(q, k, n, temperature=0.1)))(
          a["query"], a["key"], a["queue"], a["support_keys"])
  _assert_same((loss, metrics), want)
  assert metrics["num_false_negatives"] == 0


def test_multi_positive_empty_mask_is_moco():
  """With no extra positive, multi-positive InfoNCE is InfoNCE (metrics included)."""
  a = qk_queue(102, 4, 9, 5)
  got, want = jax.jit(lambda q, k, n: (
      losses.multi_positive_infonce(q, k, n, positive_mask=np.zeros((4, 9), bool),
                                    temperature=0.2),
      losses.moco_infonce(q, k, n, temperature=0.2)))(a["query"], a["key"], a["queue"])
  _assert_same(got, want)


def test_fnc_attraction_is_multi_positive_with_detected_mask():
  """FNC attraction = multi-positive InfoNCE whose mask is the detected false negatives."""
  a = fnc_inputs(103, 4, 12, 6, 2)
  fn = ref.fnc_detect(a["key"], a["support_keys"], a["queue"], threshold=0.7, top_k=2)
  assert fn.any()
  got, want = jax.jit(lambda q, k, n, s: (
      losses.fnc(q, k, n, support_keys=s, temperature=0.1, threshold=0.7, top_k=2),
      losses.multi_positive_infonce(q, k, n, positive_mask=fn, temperature=0.1)))(
          a["query"], a["key"], a["queue"], a["support_keys"])
  _assert_same(got, want, metrics=("pos_logit",))


@pytest.mark.parametrize("include_positive", [False, True])
def test_co2_query_equals_key_is_zero(include_positive):
  """Identical query and key give identical distributions: zero divergence."""
  a = qk_queue(104, 4, 9, 5)
  loss, _ = jax.jit(lambda q, k, n: losses.co2_consistency(
      q, k, n, include_positive=include_positive))(a["key"] * 3.0, a["key"], a["queue"])
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)


@pytest.mark.parametrize("divergence", ["kl", "mse"])
@pytest.mark.parametrize("pairs", ["query", "cross"])
def test_xmoco_cross_query_equals_key_is_zero(divergence, pairs):
  """Same similarities under both views: the cross-consistency is zero."""
  a = qk_queue(105, 5, None, 4)
  loss, _ = jax.jit(lambda q, k: losses.xmoco_cross_consistency(
      q, k, divergence=divergence, pairs=pairs))(a["key"], a["key"])
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bfloat16 inputs.

BF16_CASES = ["moco-B4-K7-D5", "moco-inbatch-B5-D4", "ntxent-B4-D5", "sce-B4-K7-D5",
              "co2-incpos-B4-K7-D5",
              "xcross-kl-query-B5-D4", "xunif-B4-K7-D5", "fnc-attr-B4-K12-D6-S2-k2",
              "fnc-elim-B4-K12-D6-S2-k2", "fncmv-V2-B3-K8-D6-k2", "multipos-B4-K7-D5"]


@pytest.mark.parametrize("case_id", BF16_CASES)
def test_bfloat16_inputs_promoted_to_float32(case_id):
  """bf16 inputs give a float32 loss equal to the float32 call on the same (upcast) values."""
  case = CASES_BY_ID[case_id]
  bf16 = {n: (jnp.asarray(a, jnp.bfloat16) if n in case.float_args() else a)
          for n, a in case.arrays.items()}
  up = {n: (np.asarray(jnp.asarray(a, jnp.float32)) if n in case.float_args() else a)
        for n, a in bf16.items()}

  loss, metrics, grads = run_library(case, bf16)
  grad = grads[case.grad_arg]
  want, want_metrics, _ = run_library(case, up)   # the float32 case's program
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# ---------------------------------------------------------------------------------------------
# SimCLR's NT-Xent: the analytic NumPy gradient, and its identities with the other forms.


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_nt_xent_gradient_matches_numpy_analytic(stop_gradient):
  """Both views' gradients equal the NumPy analytic gradient (the stop-gradient version drops
  the columns' term, which finite differences cannot see)."""
  case = CASES_BY_ID["ntxent-sg-B4-D5" if stop_gradient else "ntxent-B4-D5"]
  _, _, grads = library_results(case.id)
  want = ref.nt_xent_grad(case.arrays["view1"], case.arrays["view2"], temperature=0.1,
                          stop_gradient=stop_gradient)
  for name, w in zip(("view1", "view2"), want):
    np.testing.assert_allclose(grads[name], w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_nt_xent_is_half_fnc_multiview_in_batch():
  """The official FNC objective (SimCLR-based: fnc_multiview on the same views, no queue, no
  stop-gradient) with nothing detected is 2 x NT-Xent, loss and gradient."""
  a = qk_queue(90, 6, None, 5)
  views = np.stack([a["query"], a["key"]])

  def both(v):
    fnc = losses.fnc_multiview(v, v, threshold=2.0, top_k=1, stop_gradient=False)[0]
    return fnc, losses.nt_xent(v[0], v[1])[0]

  # One compiled program: the values, d fnc / dv and d nt_xent / dv, and (the default
  # stop-gradient) d fnc / dv without the targets' half.
  sg = jax.grad(lambda v: losses.fnc_multiview(v, v, threshold=2.0, top_k=1)[0])
  (fnc, nt), jac, g_sg = jax.jit(lambda v: (both(v), jax.jacrev(both)(v), sg(v)))(views)
  np.testing.assert_allclose(fnc, 2 * nt, rtol=1e-6)
  g_fnc, g_nt = jac
  np.testing.assert_allclose(g_fnc, 2 * g_nt, rtol=1e-5, atol=1e-7)
  # With the default stop-gradient the targets' half of the gradient is missing.
  assert np.max(np.abs(np.asarray(g_sg) - np.asarray(g_fnc))) > 1e-3


def test_clip_is_moco_in_batch_both_ways():
  """CLIP's symmetric loss = the mean of the two in-batch directions without stop-gradient:
  checked against NumPy cross-entropies of the (B, B) logits over rows and over columns."""
  a = qk_queue(91, 5, None, 4)
  one_way = lambda x, y: losses.moco_infonce(x, y, temperature=0.07, stop_gradient=False)[0]
  got = jax.jit(lambda x, y: 0.5 * (one_way(x, y) + one_way(y, x)))(a["query"], a["key"])
  logits = ref.l2_normalize(a["query"]) @ ref.l2_normalize(a["key"]).T / 0.07
  diag = np.diagonal(logits)
  want = 0.5 * (np.mean(ref.logsumexp(logits, 1) - diag) +
                np.mean(ref.logsumexp(logits, 0) - diag))
  np.testing.assert_allclose(got, want, rtol=1e-5)
