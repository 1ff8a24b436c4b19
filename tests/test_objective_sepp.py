"""SePP's queue-ids objective (`objective.loss = "multi_positive"`): queue rows cut from the
anchor, from its key's image or from one of its mined neighbours are positives. Checked against
NumPy on 1 device and with the K-sharded queue on 8."""
import jax
import numpy as np
import pytest

import numpy_reference as ref
from jaxcontrast.sharding import global_batch_from_local, make_mesh
from jaxcontrast.step import objectives
from jaxcontrast.step import queue as queue_lib

B, D, K, N_IMAGES = 16, 8, 64, 40


def numpy_mask(ids, key_ids, neighbors, queue_ids):
  mask = np.zeros((len(ids), len(queue_ids)), bool)
  for i in range(len(ids)):
    own = {int(ids[i]), int(key_ids[i])} | {int(n) for n in neighbors[i] if n >= 0}
    for j, q in enumerate(queue_ids):
      mask[i, j] = q >= 0 and int(q) in own
  return mask


@pytest.mark.parametrize("devices,mode", [(1, "replicated"), (8, "sharded")])
def test_multi_positive_uses_ids_keys_and_neighbours(devices, mode):
  rng = np.random.RandomState(0)
  cfg = objectives.default_objective_config()
  cfg.loss = "multi_positive"
  q, k = rng.randn(B, D).astype(np.float32), rng.randn(B, D).astype(np.float32)
  queue = rng.randn(K, D).astype(np.float32)
  queue /= np.linalg.norm(queue, axis=-1, keepdims=True)
  queue_ids = rng.randint(-1, N_IMAGES, K).astype(np.int32)      # -1: a row never written
  ids = rng.choice(N_IMAGES, B, replace=False).astype(np.int32)
  key_ids = np.where(rng.rand(B) < 0.5, ids, rng.randint(0, N_IMAGES, B)).astype(np.int32)
  neighbors = rng.randint(-1, N_IMAGES, (B, 3)).astype(np.int32)  # -1: padding
  mask = numpy_mask(ids, key_ids, neighbors, queue_ids)
  from_neighbours = mask & ~numpy_mask(ids, key_ids, np.full_like(neighbors, -1), queue_ids)
  assert from_neighbours.sum() >= 5 and (~mask).any()   # neighbours add positives
  want, _ = ref.multi_positive_infonce(q, k, queue, positive_mask=mask,
                                       temperature=cfg.temperature)

  mesh = make_mesh(devices)
  put = lambda tree: global_batch_from_local(mesh, tree)
  fn = jax.jit(objectives.make_objective_fn(cfg, mesh=mesh, queue_mode=mode))
  extras = {"id": ids, "key_id": key_ids, "neighbors": neighbors}
  negatives = put(queue_lib.Negatives(keys=queue, ids=queue_ids))
  loss, _ = fn((put(q),), (put(k),), negatives, put(extras))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Without the neighbours the loss is another one (they are used, not dropped).
  del extras["neighbors"]
  no_neighbours, _ = fn((put(q),), (put(k),), negatives, put(extras))
  assert abs(float(no_neighbours) - want) > 1e-3
