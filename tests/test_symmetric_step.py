"""The symmetric step (SCE) forwards both views in one online forward: one backward, so every
parameter's gradient is all-reduced once per step, with the values of two separate forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcontrast import config_lib, models as models_lib
from jaxcontrast.bench.profile import hlo_collectives
from jaxcontrast.sharding import global_batch_from_local, make_mesh
from jaxcontrast.step import train_step


def _config(bn_mode):
  c = config_lib.load_config("configs/sce_fashion_mnist.py:tiny")
  c.objective.symmetric = True   # SCE's ImageNet recipe: both views as queries
  c.bn.mode = bn_mode
  return c


def _two_forwards(models, params, stats, batch):
  """The reference: view 1, then view 2, each its own forward, statistics threaded through."""
  queries = []
  for view in ("view1", "view2"):
    out, updates = models.online.apply({"params": params, "batch_stats": stats}, batch[view],
                                       train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    queries.append(train_step.query_embedding(out))
  return tuple(queries), stats


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
  v = one.init(jax.random.key(0), x[0])
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

  (value, stats), grads = jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(v["params"], *x)
  (value_ref, stats_ref), grads_ref = jax.value_and_grad(separate, (0, 1, 2), has_aux=True)(
      v["params"], *x)
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
  variables = models.online.init(jax.random.key(0), batch["view1"], train=False)
  # Running statistics away from their initial values, so the order of the updates shows.
  stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
  dim = c.model.pred_dim or c.model.proj_dim
  weights = [jnp.asarray(rng.normal(size=(16, dim)), jnp.float32) for _ in "12"]

  def loss(queries):   # any function of both queries, nonlinear in each
    return sum(jnp.sum(w * jnp.tanh(q)) for w, q in zip(weights, queries))

  def ours(params):
    queries, _, new_stats = train_step.online_forward(models, params, stats, batch,
                                                      symmetric=True)
    return loss(queries), (queries, new_stats)

  def reference(params):
    queries, new_stats = _two_forwards(models, params, stats, batch)
    return loss(queries), (queries, new_stats)

  # One program for both (one compilation).
  both = jax.jit(lambda p: [jax.value_and_grad(f, has_aux=True)(p) for f in (ours, reference)])
  ((value, (queries, new_stats)), grads), ((value_ref, (queries_ref, stats_ref)), grads_ref) = \
      both(variables["params"])
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


def test_gradients_are_all_reduced_once_per_step():
  """The compiled 8-device SCE step (ghost BN in the target, SyncBN online, replicated queue):
  its all-reduces carry the gradient bytes (4 P) once, plus BN statistics and loss scalars."""
  c = _config("ghost")
  mesh = make_mesh(8)
  models = train_step.build_models(c, mesh)
  tx = optax.sgd(0.1)
  state, shardings = train_step.create_state(
      c, models=models, tx=tx, mesh=mesh, sample_images=jnp.zeros((2, 16, 16, 1)),
      rng=jax.random.key(0))
  step = train_step.jit_train_step(
      train_step.make_train_step(c, models=models, tx=tx, mesh=mesh, total_steps=4,
                                 base_rng=jax.random.key(1)), mesh=mesh, shardings=shardings)
  rng = np.random.default_rng(0)
  batch = global_batch_from_local(mesh, {
      k: rng.normal(size=(16, 16, 16, 1)).astype(np.float32) for k in ("view1", "view2")})
  hlo = step.lower(state, batch).compile().as_text()
  grad_bytes = 4 * sum(x.size for x in jax.tree.leaves(state.params))
  count, reduced = hlo_collectives(hlo)["all-reduce"]
  # Two backward passes all-reduced 2 x 4 P; BN statistics and scalars add a few percent.
  assert grad_bytes <= reduced < 1.25 * grad_bytes, (count, reduced, grad_bytes)
