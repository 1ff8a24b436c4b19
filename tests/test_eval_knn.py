"""kNN monitor (jaxcontrast/eval/knn.py) against an independent NumPy reference.

The reference computes the full (B, M) cosine matrix in float64, sorts every row, and votes with
exp(s / T) per class over the k best (MoCo's CIFAR demo). The sharded version (memory split over
8 devices, per-device top-k + gather + final top-k) must agree with 1 device and with NumPy,
including k larger than a device's block and padding rows that must never vote.
"""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast.eval import features as features_lib
from jaxcontrast.eval import knn
from jaxcontrast.sharding import make_mesh


def numpy_knn_scores(queries, memory, labels, *, k, temperature, num_classes, valid=None):
  q = np.asarray(queries, np.float64)
  m = np.asarray(memory, np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  m /= np.linalg.norm(m, axis=1, keepdims=True)
  sims = q @ m.T
  if valid is not None:
    sims[:, ~np.asarray(valid)] = -np.inf
  order = np.argsort(-sims, axis=1)[:, :k]
  scores = np.zeros((q.shape[0], num_classes))
  for b in range(q.shape[0]):
    for j in order[b]:
      if np.isfinite(sims[b, j]):
        scores[b, labels[j]] += np.exp(sims[b, j] / temperature)
  return scores


def _data(seed, b=12, m=64, d=8, c=5):
  rng = np.random.default_rng(seed)
  memory = rng.normal(size=(m, d)).astype(np.float32)
  memory /= np.linalg.norm(memory, axis=1, keepdims=True)
  return (rng.normal(size=(b, d)).astype(np.float32), memory,
          rng.integers(0, c, m).astype(np.int32))


@pytest.mark.parametrize("k", [1, 7, 20, 64])
def test_knn_matches_numpy_one_and_eight_devices(k):
  queries, memory, labels = _data(k)
  kw = dict(k=k, temperature=0.1, num_classes=5)
  ref = numpy_knn_scores(queries, memory, labels, **kw)
  one = np.asarray(knn.knn_scores(queries, memory, labels, **kw))
  np.testing.assert_allclose(one, ref, rtol=2e-5, atol=1e-30)
  mesh = make_mesh(8)
  rows = NamedSharding(mesh, P("data"))
  eight = np.asarray(knn.knn_scores(queries, jax.device_put(memory, rows),
                                    jax.device_put(labels, rows), mesh=mesh, **kw))
  np.testing.assert_allclose(eight, ref, rtol=2e-5, atol=1e-30)
  np.testing.assert_array_equal(np.asarray(knn.knn_predict(queries, memory, labels, **kw)),
                                np.argmax(ref, axis=1))


def test_padding_rows_never_vote_and_top1():
  queries, memory, labels = _data(3)
  valid = np.ones(64, bool)
  valid[::3] = False
  # Padding rows identical to the queries would win every vote if they were not masked.
  memory[0] = queries[0] / np.linalg.norm(queries[0])
  kw = dict(k=10, temperature=0.07, num_classes=5)
  ref = numpy_knn_scores(queries, memory, labels, valid=valid, **kw)
  mesh = make_mesh(8)
  rows = NamedSharding(mesh, P("data"))
  got = knn.knn_scores(queries, jax.device_put(memory, rows), jax.device_put(labels, rows),
                       memory_valid=jax.device_put(valid, rows), mesh=mesh, **kw)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5)
  query_labels = np.argmax(ref, axis=1)
  query_labels[:4] = (query_labels[:4] + 1) % 5
  top1 = knn.knn_top1(queries, query_labels, memory, labels, memory_valid=valid, **kw)
  assert top1 == pytest.approx(8 / 12)


def test_concat_sharded_keeps_rows_aligned():
  mesh = make_mesh(8)
  rows = NamedSharding(mesh, P("data"))
  a = [np.arange(16 * i, 16 * (i + 1)) for i in range(3)]
  cat = features_lib.concat_sharded([jax.device_put(x, rows) for x in a], mesh)
  cat2 = features_lib.concat_sharded([jax.device_put(x * 10, rows) for x in a], mesh)
  assert cat.sharding.spec == P("data")
  np.testing.assert_array_equal(np.sort(np.asarray(cat)), np.arange(48))
  np.testing.assert_array_equal(np.asarray(cat2), np.asarray(cat) * 10)


def test_knn_argument_errors():
  queries, memory, labels = _data(0)
  with pytest.raises(ValueError, match="k >= 1"):
    knn.knn_scores(queries, memory, labels, k=0, temperature=0.1, num_classes=5)
  with pytest.raises(ValueError, match="must agree"):
    knn.knn_scores(queries[:, :3], memory, labels, k=3, temperature=0.1, num_classes=5)
