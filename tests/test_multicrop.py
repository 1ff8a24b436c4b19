"""Multi-crop: local crops as extra online queries against the global views' keys.

The NumPy references below loop like the official SCE code (eztorch
`ShuffleMomentumQueueBaseModel.training_step`): symmetric, the sum over global views i and all
crops j != i of loss(online_j, target_i) over (num_crops - 1) * num_global; asymmetric, the
online crops (view 1, then the locals) against view 2's key, over num_crops - 1. They never call
`objectives.crop_pairs`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpy_reference as ref
from jaxcontrast import config_lib
from jaxcontrast.run import pretrain
from jaxcontrast.sharding import global_batch_from_local, make_mesh
from jaxcontrast.step import objectives, train_step
from jaxcontrast.step import queue as queue_lib

B, D, K = 16, 8, 32


def _unit(rng, *shape):
  x = rng.randn(*shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pair_loss(cfg, q, k, queue, support):
  """One (query, key) pair of the objective in NumPy: main loss + weighted regularisers."""
  if cfg.loss == "sce":
    total, _ = ref.sce(q, k, queue, temperature=cfg.temperature,
                       target_temperature=cfg.sce.target_temperature, coeff=cfg.sce.coeff,
                       mask_self=cfg.sce.mask_self)
  elif cfg.loss == "fnc":
    total, _ = ref.fnc(q, k, queue, support_keys=support, temperature=cfg.temperature,
                       threshold=cfg.fnc.threshold, top_k=cfg.fnc.top_k, mode=cfg.fnc.mode)
  else:
    total, _ = ref.moco_infonce(q, k, queue, temperature=cfg.temperature)
  if cfg.co2.weight:
    total += cfg.co2.weight * ref.co2_consistency(q, k, queue, temperature=cfg.co2.temperature)
  if cfg.xmoco_cross.weight:
    total += cfg.xmoco_cross.weight * ref.xmoco_cross_consistency(
        q, k, temperature=cfg.xmoco_cross.temperature)
  if cfg.xmoco_uniformity.weight:
    total += cfg.xmoco_uniformity.weight * ref.xmoco_negative_uniformity(
        q, queue, temperature=cfg.xmoco_uniformity.temperature)
  return total


def sce_code_multicrop(cfg, online, targets, queue, support=None):
  """The SCE code's multi-crop loop. online: [view 1, (view 2 if symmetric), local_0, ...];
  targets: [view 2's key] (asymmetric) or [view 1's key, view 2's key] (symmetric)."""
  num_crops = len(online) + (0 if len(targets) == 2 else 1)
  if len(targets) == 1:   # asymmetric: target crop = view 2, online crops = every other crop
    return sum(_pair_loss(cfg, q, targets[0], queue, support) for q in online) / (num_crops - 1)
  total = 0.0
  for i in range(2):
    for j in range(num_crops):
      if i != j:
        total += _pair_loss(cfg, online[j], targets[i], queue, support)
  return total / ((num_crops - 1) * 2)


def objective_config(case):
  cfg = objectives.default_objective_config()
  if case.startswith("sce"):
    cfg.loss = "sce"
    cfg.temperature = 0.1
    cfg.symmetric = case == "sce_symmetric"
  elif case == "fnc":
    cfg.loss = "fnc"
    cfg.fnc.update(threshold=0.2, top_k=3, num_support_views=2)
  else:   # MoCo with every regulariser on (CO2 and XMoCo's two)
    cfg.co2.weight = 0.5
    cfg.xmoco_cross.weight = 1.0
    cfg.xmoco_uniformity.weight = 0.1
  return cfg


def inputs(rng, cfg, num_local=3):
  q1, q2, k1, k2 = (_unit(rng, B, D) for _ in range(4))
  locals_ = [_unit(rng, B, D) for _ in range(num_local)]
  support = _unit(rng, B, 2, D)
  # Queue rows near the keys make FNC detect some false negatives.
  queue = _unit(rng, K, D)
  queue[:B] = k2 + 0.3 * rng.randn(B, D).astype(np.float32)
  queue /= np.linalg.norm(queue, axis=-1, keepdims=True)
  if cfg.symmetric:
    return (q1, q2), (k2, k1), locals_, support, queue, ([q1, q2] + locals_, [k1, k2])
  return (q1,), (k2,), locals_, support, queue, ([q1] + locals_, [k2])


@pytest.mark.parametrize("case", ["sce_symmetric", "sce", "moco_regularised", "fnc"])
def test_objective_equals_the_sce_code_loop(case):
  rng = np.random.RandomState(0)
  cfg = objective_config(case)
  queries, keys, locals_, support, queue, (online, targets) = inputs(rng, cfg)
  extras = {"support": support} if case == "fnc" else {}
  fn = objectives.make_objective_fn(cfg, mesh=make_mesh(1), queue_mode="replicated")
  negatives = queue_lib.Negatives(keys=queue)
  # Both values from one jitted program (op by op, every small op would be compiled on its own).
  (loss, metrics), (no_local, _) = jax.jit(lambda *a: (fn(*a[:4], local_queries=a[4]),
                                                       fn(*a[:4])))(
      queries, keys, negatives, extras, tuple(locals_))
  want = sce_code_multicrop(cfg, online, targets, queue, support if case == "fnc" else None)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
  # Local crops change the value (they are not silently dropped).
  assert abs(float(no_local) - want) > 1e-3
  if case == "fnc":   # detection fires on some rows: the test exercises FNC's positives
    assert ref.fnc_detect(targets[0], support, queue, threshold=0.2, top_k=3).any()


def test_crop_pairs_rejects_a_missing_key():
  with pytest.raises(ValueError, match="2 queries for 1 keys"):
    objectives.crop_pairs((1, 2), (3,))


@pytest.mark.parametrize("case", ["sce_symmetric", "fnc"])
def test_objective_with_local_crops_eight_devices_equal_one(case):
  """K-sharded queue on 8 devices (one shard_map, local queries batch-split) = replicated on 1,
  loss and every metric, with a partly unfilled queue masked out."""
  rng = np.random.RandomState(1)
  cfg = objective_config(case)
  queries, keys, locals_, support, queue, _ = inputs(rng, cfg)
  valid = rng.rand(K) > 0.25
  extras = {"support": support} if case == "fnc" else {}
  results = []
  for devices, mode in ((1, "replicated"), (8, "sharded")):
    mesh = make_mesh(devices)
    put = lambda tree: global_batch_from_local(mesh, tree)
    fn = jax.jit(lambda *a: objectives.make_objective_fn(cfg, mesh=mesh, queue_mode=mode)(
        *a[:4], local_queries=a[4]))
    negatives = put(queue_lib.Negatives(keys=queue, valid=valid))
    results.append(jax.device_get(fn(put(queries), put(keys), negatives, put(extras),
                                     put(tuple(locals_)))))
  (loss1, m1), (loss8, m8) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert set(m1) == set(m8)
  for name in m1:
    np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_pretrain_feeds_local_views_to_the_step():
  batch = {"view1": 1, "view2": 2, "local_0": 3, "local_1": 4, "params": 5, "support": 6,
           "neighbors": 7}
  assert set(pretrain.step_inputs(batch)) == {"view1", "view2", "local_0", "local_1", "support",
                                              "neighbors"}
  assert train_step.local_view_names({"local_10": 0, "local_2": 0, "view1": 0}) == ["local_2",
                                                                                   "local_10"]


def test_train_step_with_local_crops():
  """One real step of the tiny SCE multi-crop config (symmetric, predictor, 2 local crops of 12
  and 10 px) on 1 device: its loss equals the SCE code's loop in NumPy on the online/target
  outputs computed here with the initial parameters; only the global keys are enqueued. (The
  objective's 8-device form is checked above: a second compiled step here would cost more than
  the rest of this file.)"""
  c = config_lib.load_config("configs/sce_imagenet2012.py:multicrop,tiny")
  c.unlock()
  c.data.local_crop_sizes = (12, 10)
  rng = np.random.RandomState(0)
  images = lambda *shape: rng.rand(16, *shape, 1).astype(np.float32)
  batch = {"view1": images(16, 16), "view2": images(16, 16), "local_0": images(12, 12),
           "local_1": images(10, 10), "id": np.arange(16, dtype=np.int32)}
  mesh = make_mesh(1)
  models = train_step.build_models(c, mesh)
  tx = optax.sgd(0.05)
  state, shardings = train_step.create_state(c, models=models, tx=tx, mesh=mesh,
                                             sample_images=jnp.zeros((2, 16, 16, 1)),
                                             rng=jax.random.key(0))
  initial = jax.device_get(state)
  step = train_step.jit_train_step(
      train_step.make_train_step(c, models=models, tx=tx, mesh=mesh, total_steps=10,
                                 base_rng=jax.random.key(1)), mesh=mesh, shardings=shardings)
  final, metrics = jax.device_get(step(state, global_batch_from_local(mesh, batch)))
  # Jitted: op by op, these six forward passes cost more than compiling the step (this test:
  # 25.7 -> 16.7 s).
  online = jax.jit(lambda x: models.online.apply(
      {"params": initial.params, "batch_stats": initial.batch_stats}, x, train=True,
      mutable=["batch_stats"])[0]["prediction"])
  # SCE updates the target after the optimizer step: the keys come from the initial target.
  target = jax.jit(lambda x: models.target.apply(
      {"params": initial.ema_params, "batch_stats": initial.ema_batch_stats}, x, train=True,
      predict=False, mutable=["batch_stats"])[0]["projection"])
  as_np = lambda x: np.asarray(x, np.float64)
  crops = [as_np(online(batch[name])) for name in ("view1", "view2", "local_0", "local_1")]
  keys = [as_np(target(batch[name])) for name in ("view1", "view2")]
  want = sce_code_multicrop(c.objective, crops, keys, as_np(initial.queue.keys))
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
  assert int(final.queue.filled) == 32   # 2 global views x 16
