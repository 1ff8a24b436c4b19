"""The train step as GPU and TPU would compile it, lowered on this CPU host (`jax.export` with
`platforms=`; lowering only, nothing runs): no CPU-only code (BatchNorm's optimisation barriers,
`models/norm.py`), every similarity product of the losses at HIGHEST precision, and with the
K-sharded queue no all-gather of the K x D queue among the explicit collectives of the
`shard_map`ped objective. (What XLA partitions itself shows only in the compiled program: the
CPU 8-device compile is checked for a queue all-gather in tests/test_train_step.py.)"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcontrast import config_lib
from jaxcontrast.sharding import make_mesh
from jaxcontrast.step import queue as queue_lib
from jaxcontrast.step import train_step
from jaxcontrast.step.state import init_train_state, state_shardings

# Sizes chosen apart from each other: a dot_general touching a network width (projector and
# predictor hidden 40, backbone features 64) is a layer; one on batch, queue and embedding
# sizes only is a similarity product of the losses (forward or backward).
BATCH, QUEUE, DIM, HIDDEN, FEATURES = 16, 96, 24, 40, 64


@pytest.fixture(scope="module")
def exported():
  """The exported module text of the tiny SCE + CO2 step, symmetric, predictor, Shuffle BN,
  K-sharded queue on 8 devices, for GPU and TPU together: one trace and one lowering, a module
  whose platform-dependent parts (`lax.platform_dependent`) hold only the branches of those
  two platforms."""
  c = config_lib.load_config("configs/sce_fashion_mnist.py:tiny")
  c.objective.symmetric = True
  c.objective.co2.weight = 1.0
  c.model.update(proj_hidden_dims=(HIDDEN,), proj_dim=DIM, pred_hidden_dims=(HIDDEN,),
                 pred_dim=DIM)
  c.queue.update(size=QUEUE, mode="sharded")
  c.bn.mode = "shuffle"
  c.global_batch_size = BATCH
  mesh = make_mesh(8)
  models = train_step.build_models(c, mesh)
  tx = optax.sgd(0.1)
  init = lambda r: init_train_state(
      r, model=models.online, tx=tx, sample_images=jnp.zeros((2, 16, 16, 1)),
      queue_size=QUEUE, queue_dim=DIM, ema_init=c.ema.init,
      queue_blocks=queue_lib.num_blocks("sharded", 8))
  state = jax.eval_shape(init, jax.random.key(0))
  step = train_step.jit_train_step(
      train_step.make_train_step(c, models=models, tx=tx, mesh=mesh, total_steps=4,
                                 base_rng=jax.random.key(1)),
      mesh=mesh, shardings=state_shardings(state, mesh, "sharded"))
  batch = {k: jax.ShapeDtypeStruct((BATCH, 16, 16, 1), jnp.float32) for k in ("view1", "view2")}
  exp = jax.export.export(step, platforms=("cuda", "tpu"))(state, batch)
  assert exp.platforms == ("cuda", "tpu")
  return exp.mlir_module()


def _shapes(line):
  return [tuple(int(d) for d in dims.split("x") if d.isdigit())
          for dims in re.findall(r"tensor<([0-9x]*)x?[a-z]+[0-9]*>", line)]


def _loss_products(text):
  """(precision text, shapes) of each dot_general on batch, queue and embedding sizes only."""
  found = []
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    shapes = _shapes(line.split(" : ", 1)[-1])
    if not any(d in (HIDDEN, FEATURES) for s in shapes for d in s):
      m = re.search(r"precision = \[([A-Z, ]+)\]", line)
      found.append((m.group(1) if m else "DEFAULT", shapes))
  return found


def test_no_optimization_barrier(exported):
  assert "optimization_barrier" not in exported
  # The BatchNorm statistics are in there (the train-mode reductions), only without barriers.
  assert "stablehlo.reduce" in exported


def test_similarity_products_are_highest(exported):
  products = _loss_products(exported)
  # SCE and CO2, both directions, forward and backward: q.k, q.queue, k.queue and their
  # gradients, on the local blocks (B/8 rows, K/8 queue rows) and gathered queries.
  assert len(products) >= 8, products
  assert all(p == "HIGHEST, HIGHEST" for p, _ in products), products
  dims = {d for _, shapes in products for s in shapes for d in s}
  assert DIM in dims and QUEUE // 8 in dims


def test_sharded_queue_is_not_gathered(exported):
  gathers = [line for line in exported.splitlines() if "all_gather" in line
             and "stablehlo" in line]
  assert gathers, "expected the queries' all-gather inside the shard_map"
  results = [_shapes(line.split("->")[-1]) for line in gathers]
  queue_sized = [r for r in results if any(s[:1] == (QUEUE,) or np.prod(s) >= QUEUE * DIM
                                            for s in r)]
  assert not queue_sized, queue_sized


@pytest.fixture
def plain_batchnorm(monkeypatch):
  """GroupedBatchNorm's GPU/TPU path, forced on this CPU host."""
  from jaxcontrast.models import norm  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(norm, "_by_platform", lambda impl, *args: impl(*args, two_stage=False))


@pytest.mark.parametrize("groups,grouping", [(4, "strided"), (4, "contiguous"), (1, "strided")])
@pytest.mark.parametrize("shape", [(8, 3, 2, 5), (12, 6)])
def test_plain_batchnorm_matches_numpy(plain_batchnorm, groups, grouping, shape):
  """The path GPU and TPU run (never executed by the CPU tests otherwise): outputs, running
  statistics and gradients (also through the running statistics) against test_models' NumPy
  references."""
  del plain_batchnorm
  import test_models  # pylint: disable=g-import-not-at-top
  if groups == 4:
    test_models.test_grouped_bn_train_matches_numpy_reference(grouping, shape)
  test_models.test_grouped_bn_gradients_match_numpy_reference(groups, grouping, shape)
  if len(shape) == 4:   # that test's own shape
    test_models.test_grouped_bn_gradient_through_the_running_statistics(groups, grouping)
