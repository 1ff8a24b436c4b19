"""The symmetric step (SCE) forwards both views in one online forward, with the values of two
separate forwards. (That its one backward all-reduces every parameter's gradient once per step
is checked on the compiled 8-device SCE step of tests/test_train_step.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrast import config_lib, models as models_lib
from jaxcontrast.sharding import make_mesh
from jaxcontrast.step import train_step


def _config(bn_mode):
  c = config_lib.load_config("configs/sce_fashion_mnist.py:tiny")
  c.objective.symmetric = True   # SCE's ImageNet recipe: both views as queries
  c.bn.mode = bn_mode
  return c


def _two_forwards(models, params, stats, batch, weights):
  """The reference: view 1, then view 2, each its own forward and backward (one compiled
  program called twice), statistics threaded through. The loss is a sum of one term per view,
  so its value and gradient are the sums of the two calls'."""
  def one_view(params, stats, x, w):
    out, updates = models.online.apply({"params": params, "batch_stats": stats}, x,
                                       train=True, mutable=["batch_stats"])
    query = train_step.query_embedding(out)
    return jnp.sum(w * jnp.tanh(query)), (query, updates["batch_stats"])

  one_view = jax.jit(jax.value_and_grad(one_view, has_aux=True))
  value, queries, grads = 0.0, [], None
  for view, w in zip(("view1", "view2"), weights):
    (v, (query, stats)), g = one_view(params, stats, batch[view], w)
    value, grads = value + v, g if grads is None else jax.tree.map(jnp.add, grads, g)
    queries.append(query)
  return value, (tuple(queries), stats), grads


@pytest.mark.parametrize("groups,grouping", [(4, "strided"), (4, "contiguous")])
def test_bn_views_are_separate_calls(groups, grouping):
  """GroupedBatchNorm(views=2) on two batches interleaved: the outputs, gradients and running
  statistics of two calls, the first batch's update first."""
  rng = np.random.default_rng(1)
  shape = (8, 3, 3, 5)
  x = [(rng.normal(size=shape) * s + rng.normal(size=(8, 1, 1, 1))).astype(np.float32)
       for s in (1.0, 4.0)]
  r = rng.normal(size=(2,) + shape).astype(np.float32)
  one = models_lib.GroupedBatchNorm(groups=groups, grouping=grouping, use_running_average=False)
  two = one.clone(views=2)
  v = jax.jit(one.init)(jax.random.key(0), x[0])
  v = {"params": {"scale": v["params"]["scale"] + 0.5, "bias": v["params"]["bias"] - 0.2},
       "batch_stats": {"mean": v["batch_stats"]["mean"] + 1, "var": v["batch_stats"]["var"] * 2}}

  def ours(params, x0, x1):
    xs = jnp.stack([x0, x1], 1).reshape((16,) + shape[1:])
    y, upd = two.apply({"params": params, "batch_stats": v["batch_stats"]}, xs,
                       mutable=["batch_stats"])
    y = y.reshape((8, 2) + shape[1:])
    return jnp.sum(y[:, 0] * r[0]) + jnp.sum(jnp.square(y[:, 1]) * r[1]), upd["batch_stats"]

  def separate(params, x0, x1):
    y0, upd = one.apply({"params": params, "batch_stats": v["batch_stats"]}, x0,
                        mutable=["batch_stats"])
    y1, upd = one.apply({"params": params, "batch_stats": upd["batch_stats"]}, x1,
                        mutable=["batch_stats"])
    return jnp.sum(y0 * r[0]) + jnp.sum(jnp.square(y1) * r[1]), upd["batch_stats"]

  # One jitted program for both (op by op, every small op would be compiled on its own).
  both = jax.jit(lambda *a: [jax.value_and_grad(f, (0, 1, 2), has_aux=True)(*a)
                             for f in (ours, separate)])
  ((value, stats), grads), ((value_ref, stats_ref), grads_ref) = both(v["params"], *x)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-4)
  for a, b in zip(jax.tree.leaves((stats, grads)), jax.tree.leaves((stats_ref, grads_ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_one_forward_of_both_views_equals_two_forwards():
  """The step's online forward (ResNet, projector, predictor) with ghost BN on the online
  network: both views interleaved in one forward against two forwards."""
  c = _config("ghost")
  c.bn.target_only = False
  mesh = make_mesh(8)   # shuffle: 8 contiguous BN groups (the logical layout, on one device)
  models = train_step.build_models(c, mesh)
  rng = np.random.default_rng(0)
  # Per-sample offsets: every grouping of the batch gives other statistics.
  view = lambda: jnp.asarray(rng.normal(size=(16, 16, 16, 1)) + rng.normal(size=(16, 1, 1, 1)),
                             jnp.float32)
  batch = {"view1": view(), "view2": 3 * view()}
  variables = jax.jit(lambda x: models.online.init(jax.random.key(0), x, train=False))(
      batch["view1"])
  # Running statistics away from their initial values, so the order of the updates shows.
  stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
  dim = c.model.pred_dim or c.model.proj_dim
  weights = [jnp.asarray(rng.normal(size=(16, dim)), jnp.float32) for _ in "12"]

  def ours(params):   # a function of both queries, nonlinear in each
    queries, _, new_stats = train_step.online_forward(models, params, stats, batch,
                                                      symmetric=True)
    return sum(jnp.sum(w * jnp.tanh(q)) for w, q in zip(weights, queries)), (queries, new_stats)

  (value, (queries, new_stats)), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(
      variables["params"])
  value_ref, (queries_ref, stats_ref), grads_ref = _two_forwards(
      models, variables["params"], stats, batch, weights)
  # A sum of 16 x D terms of either sign: its rounding is absolute, not relative.
  np.testing.assert_allclose(value, value_ref, rtol=0, atol=1e-5)
  for q, q_ref in zip(queries, queries_ref):
    np.testing.assert_allclose(q, q_ref, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The running statistics did move with both views (the check above can fail).
  assert not np.allclose(jax.tree.leaves(new_stats)[0], jax.tree.leaves(stats)[0])
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads_ref)):
    scale = float(np.max(np.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-4 * scale + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
