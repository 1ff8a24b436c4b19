"""One table: every public loss under `jax.jit`, `jax.grad`, `jax.vmap` and `jax.shard_map` with
`axis_name` (8 devices), with float32 and bfloat16 inputs.

For each entry (one per public function, plus the code paths a switch selects):
  * jit + grad: the loss of each of two examples equals the NumPy reference (the gradients are
    checked against finite differences / the analytic NumPy gradient in test_losses.py);
  * vmap: `jax.vmap` of `value_and_grad` over a leading axis of two examples equals the Python
    loop of the jitted single-example call (loss, metrics, gradients);
  * shard_map + bfloat16: the bfloat16 inputs split over 8 devices (query/key/queue rows, views
    on their batch axis, positive_mask by columns) give the loss, metrics and gradients of the
    unsharded call on the same values.
Plus: inside `shard_map`, an input that is not split over `axis_name` is an error at trace time.
Shapes are tiny: compiling dominates the cost.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcontrast import losses

import numpy_reference as ref
import test_losses as tl
import test_losses_sharding as tls

N_DEV = tls.N_DEV
B, K, D, S, V = 8, 16, 4, 2, 2


def _inputs(seed):
  """Every array any loss takes, for one example (float32; masks bool)."""
  rng = np.random.default_rng(seed)
  query, key = tl._query_key(rng, B, D)
  arrays = tl._f32(query=query, key=key, queue=tl._queue(rng, K, D),
                   support_keys=rng.normal(size=(B, S, D)),
                   views=rng.normal(size=(V, B, D)), target_views=rng.normal(size=(V, B, D)))
  arrays["queue"][:3] = tl._near(rng, key[0], 0.2)[None]   # something for FNC to detect
  arrays["positive_mask"] = rng.random((B, K)) < 0.3
  arrays["view1"], arrays["view2"] = arrays["query"], arrays["key"]
  return arrays


def _entry(id_, fn, positional, grads=None, **kwargs):
  return id_, fn, positional, grads, kwargs


QKQ = ("query", "key", "queue")
TABLE = [
    _entry("moco", "moco_infonce", QKQ),
    _entry("moco-inbatch-nosg", "moco_infonce", ("query", "key"), grads=("query", "key"),
           stop_gradient=False),
    _entry("ntxent", "nt_xent", ("view1", "view2"), grads=("view1", "view2")),
    _entry("ntxent-sg", "nt_xent", ("view1", "view2"), grads=("view1", "view2"),
           stop_gradient=True),
    _entry("sce", "sce", QKQ),
    _entry("co2", "co2_consistency", QKQ),
    _entry("xcross", "xmoco_cross_consistency", ("query", "key")),
    _entry("xunif", "xmoco_negative_uniformity", ("query", "queue")),
    _entry("fnc-attr", "fnc", QKQ + ("support_keys",), threshold=0.5, top_k=3),
    _entry("fnc-elim", "fnc", QKQ + ("support_keys",), threshold=0.5, top_k=3,
           mode="elimination"),
    _entry("fncmv", "fnc_multiview", ("views", "target_views", "queue"), threshold=0.5, top_k=3),
    _entry("fncmv-inbatch-nosg", "fnc_multiview", ("views", "target_views"),
           grads=("views", "target_views"), threshold=0.5, top_k=3, stop_gradient=False),
    _entry("multipos", "multi_positive_infonce", QKQ + ("positive_mask",)),
    _entry("fnc_detect", "fnc_detect", ("key", "queue", "support_keys"), grads=(),
           threshold=0.5, top_k=3),
]
TABLE_BY_ID = {e[0]: e for e in TABLE}
EXAMPLES = (_inputs(1), _inputs(2))


def test_table_covers_every_public_loss():
  public = set(losses.__all__) - {"l2_normalize", "queue"}
  assert {e[1] for e in TABLE} == public


def _function(entry, axis_name=None):
  """f(*arrays) -> ((out, metrics), grads): value_and_grad over the entry's gradient inputs
  (the first positional by default); for the detector, its (mask, metrics) and no gradient."""
  _, name, positional, grads, kwargs = entry
  fn = getattr(losses, name)
  extra = {} if axis_name is None else {"axis_name": axis_name}
  call = lambda *a: fn(*a, **kwargs, **extra)
  grads = positional[:1] if grads is None else grads
  if not grads:
    return lambda *a: (call(*a), ())
  argnums = tuple(positional.index(g) for g in grads)
  return jax.value_and_grad(call, argnums=argnums, has_aux=True)


def _args(entry, arrays):
  return [arrays[n] for n in entry[2]]


@functools.lru_cache(maxsize=None)
def _single(entry_id):
  return jax.jit(_function(TABLE_BY_ID[entry_id]))


def _assert_tree_close(got, want, rtol, atol_scale):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * scale)


def _reference_loss(entry, arrays):
  _, name, positional, _, kwargs = entry
  kwargs = {k: v for k, v in kwargs.items() if k != "stop_gradient"}
  a = [arrays[n] for n in positional]
  if name == "fnc_detect":
    return ref.fnc_detect(a[0], a[2], a[1], **kwargs)
  if name == "fnc_multiview" and len(a) == 2:
    a.append(None)
  out = getattr(ref, name)(*a, **kwargs)
  return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("entry_id", list(TABLE_BY_ID))
def test_jit_grad_vmap(entry_id):
  """jit: each example's loss equals the NumPy reference; vmap over the two examples equals
  the loop of single calls (loss, metrics, gradients)."""
  entry = TABLE_BY_ID[entry_id]
  single = _single(entry_id)
  loop = [single(*_args(entry, a)) for a in EXAMPLES]
  for out, arrays in zip(loop, EXAMPLES):
    (value, _), _ = out
    want = _reference_loss(entry, arrays)
    if entry[1] == "fnc_detect":
      np.testing.assert_array_equal(np.asarray(value), want)
    else:
      np.testing.assert_allclose(value, want, rtol=2e-5, atol=2e-5)
  stacked = [np.stack([a[n] for a in EXAMPLES]) for n in entry[2]]
  batched = jax.jit(jax.vmap(_function(entry)))(*stacked)
  want = jax.tree.map(lambda *xs: np.stack(xs), *loop)
  _assert_tree_close(batched, want, rtol=1e-5, atol_scale=1e-6)


@pytest.mark.parametrize("entry_id", list(TABLE_BY_ID))
def test_shard_map_bfloat16(entry_id):
  """bfloat16 inputs split over 8 devices: the unsharded call's loss, metrics and gradients."""
  entry = TABLE_BY_ID[entry_id]
  arrays = {n: (jnp.asarray(a, jnp.bfloat16) if a.dtype.kind == "f" else a)
            for n, a in EXAMPLES[0].items()}
  up = {n: np.asarray(jnp.asarray(a, jnp.float32)) for n, a in arrays.items()}
  specs = tuple(tls.SPECS[n] for n in entry[2])
  grad_names = entry[2][:1] if entry[3] is None else entry[3]
  grad_specs = tuple(tls.SPECS[n] for n in grad_names)   # a gradient is split like its input
  out_specs = ((P(), P()) if entry[1] != "fnc_detect" else (P(None, "data"), P()), grad_specs)
  sharded = jax.jit(jax.shard_map(_function(entry, "data"), mesh=tls.mesh(),
                                  in_specs=specs, out_specs=out_specs, check_vma=True))
  (value, metrics), grads = sharded(*_args(entry, arrays))
  (want_value, want_metrics), want_grads = _single(entry_id)(*_args(entry, up))
  if entry[1] == "fnc_detect":
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want_value))
  else:
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, want_value, rtol=2e-5, atol=2e-6)
  _assert_tree_close(metrics, want_metrics, rtol=2e-5, atol_scale=2e-6)
  for g, w in zip(grads, want_grads):
    assert g.dtype == jnp.bfloat16           # the gradient of a bfloat16 input
    _assert_tree_close(g, w, rtol=1e-2, atol_scale=1e-2)


# ---------------------------------------------------------------------------------------------
# Not split over the axis: an error, not a loss over n tiled copies.

REPLICATED = [
    ("moco", "queue"), ("moco", "key"), ("sce", "queue"), ("fnc-attr", "support_keys"),
    ("ntxent", "view2"), ("multipos", "positive_mask"), ("fncmv", "target_views"),
    ("fnc_detect", "queue"),
]


def _one_block(x, spec):
  """The first device's block of x under `spec`: replicated, it has the shape a split input has
  on each device, so no shape check can tell the difference."""
  axis = list(spec).index("data")
  return np.take(x, np.arange(x.shape[axis] // N_DEV), axis=axis)


@pytest.mark.parametrize("entry_id,replicated", REPLICATED)
def test_input_not_split_over_axis_is_an_error(entry_id, replicated):
  """A replicated queue (in_specs P()) used to give a loss over the queue tiled n times (2.5035
  instead of 1.3477 on 4 devices); now the trace stops with an error naming the input. Other
  inputs are passed replicated with a per-device shape (so only the axis check sees it)."""
  entry = TABLE_BY_ID[entry_id]
  specs = tuple(P() if n == replicated else tls.SPECS[n] for n in entry[2])
  args = {n: a for n, a in zip(entry[2], _args(entry, EXAMPLES[0]))}
  if replicated != "queue":
    args[replicated] = _one_block(args[replicated], tls.SPECS[replicated])
  fn = getattr(losses, entry[1])
  body = lambda *a: fn(*a, **entry[4], axis_name="data")[1]
  sharded = jax.shard_map(body, mesh=tls.mesh(), in_specs=specs, out_specs=P(),
                          check_vma=True)
  with pytest.raises(ValueError, match=f"{replicated} does not vary over mesh axis 'data'"):
    jax.jit(sharded).trace(*args.values())
