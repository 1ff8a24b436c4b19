"""SePP partner drawing in the training pipeline (semantic pairs file -> key_id and view2)."""
import numpy as np
import pytest
import tensorflow as tf

from jaxcontrast.data import pairs as pairs_lib
from jaxcontrast.data import pipeline
from jaxcontrast.data import sepp
from jaxcontrast.data.fashion_mnist import load_fashion_mnist_numpy
from test_data_helpers import fashion_config, fashion_dir, unnormalize  # pylint: disable=unused-import

N = 60  # Pairs over "test[:60]".


def _neighbours(i):
  """Image i has i % 3 partners (0, 1 or 2): i+1, i+2 (mod N)."""
  return [(i + 1 + j) % N for j in range(i % 3)]


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
  indices = np.full((N, 2), -1, np.int32)
  sims = np.full((N, 2), -np.inf, np.float32)
  for i in range(N):
    for j, partner in enumerate(_neighbours(i)):
      indices[i, j], sims[i, j] = partner, 0.9 - 0.1 * j
  path = str(tmp_path_factory.mktemp("pairs") / "pairs.npz")
  pairs_lib.save_pairs(path, pairs_lib.SemanticPairs(indices, sims, {}),
                       threshold=0.5, embedding="test")
  return path


def _sepp_config(fashion_dir, pairs_path, p):
  cfg = fashion_config(fashion_dir, train_split=f"test[:{N}]", semantic_pairs=pairs_path,
                       p_semantic=p, recipe="crop_flip")
  cfg.view2.crop_scale = (1.0, 1.0)
  cfg.view2.flip_prob = 0.0
  return cfg


def _batches(cfg, n=6, seed=0):
  it = pipeline.make_train_iterator(cfg, batch_size=20, seed=seed, process_index=0,
                                    process_count=1)
  return [next(it) for _ in range(n)]


def test_partners_are_neighbours_and_view2_is_cut_from_them(fashion_dir, pairs_path):
  images, labels = load_fashion_mnist_numpy("test")
  batches = _batches(_sepp_config(fashion_dir, pairs_path, 1.0))
  drew_second = False
  for b in batches:
    for i, k, row in zip(b["id"], b["key_id"], b["neighbors"]):
      options = _neighbours(int(i))
      assert k in options if options else k == i  # p = 1: a neighbour whenever there is one.
      assert sorted(int(n) for n in row if n >= 0) == options   # the pairs file's row, -1 padded
      drew_second |= len(options) == 2 and k == options[1]
    np.testing.assert_array_equal(b["label"], labels[b["id"]])
    np.testing.assert_array_equal(b["key_label"], labels[b["key_id"]])
    view2 = unnormalize(b["view2"], (0.2860,), (0.3530,)) * 255
    np.testing.assert_allclose(view2, images[b["key_id"]], atol=1e-2)  # Whole partner image.
  assert drew_second  # Uniform over the valid neighbours, not always the first.


def test_p_semantic_zero_keeps_the_anchor(fashion_dir, pairs_path):
  for b in _batches(_sepp_config(fashion_dir, pairs_path, 0.0), n=3):
    np.testing.assert_array_equal(b["key_id"], b["id"])


def test_sepp_with_three_channels(fashion_dir, pairs_path):
  cfg = _sepp_config(fashion_dir, pairs_path, 1.0)
  cfg.num_channels = 3
  b = _batches(cfg, n=1)[0]
  assert b["view1"].shape == b["view2"].shape == (20, 28, 28, 3)
  np.testing.assert_array_equal(b["view2"][..., 0], b["view2"][..., 2])


def test_p_semantic_half_mixes(fashion_dir, pairs_path):
  batches = _batches(_sepp_config(fashion_dir, pairs_path, 0.5), n=6)
  ids = np.concatenate([b["id"] for b in batches])
  keys = np.concatenate([b["key_id"] for b in batches])
  with_partners = ids % 3 != 0
  rate = (keys[with_partners] != ids[with_partners]).mean()
  assert 0.3 < rate < 0.7


def test_sepp_two_processes_split_anchors_not_partners(fashion_dir, pairs_path):
  cfg = _sepp_config(fashion_dir, pairs_path, 1.0)
  it = pipeline.make_train_iterator(cfg, batch_size=10, seed=0, process_index=1, process_count=2)
  batches = [next(it) for _ in range(4)]
  ids = np.concatenate([b["id"] for b in batches])
  keys = np.concatenate([b["key_id"] for b in batches])
  assert ((ids >= 30) & (ids < 60)).all()
  assert (keys < 30).any()  # Anchor 59's partners (0, 1) live in the other process's part.
  for i, k in zip(ids, keys):
    assert k in _neighbours(int(i)) or (k == i and not _neighbours(int(i)))


def test_draw_partner_unit():
  row = tf.constant([-1, 7, -1, 9], tf.int32)  # Padding anywhere is tolerated.
  draws = {int(sepp.draw_partner(tf.constant([1, s], tf.int64), row, tf.constant(3), 1.0))
           for s in range(40)}
  assert draws == {7, 9}
  assert int(sepp.draw_partner(tf.constant([1, 2], tf.int64), tf.constant([-1, -1]),
                               tf.constant(3), 1.0)) == 3
  assert int(sepp.draw_partner(tf.constant([1, 2], tf.int64), row, tf.constant(3), 0.0)) == 3


def test_size_cap_and_row_mismatch_are_errors(fashion_dir, pairs_path):
  cfg = _sepp_config(fashion_dir, pairs_path, 0.5)
  cfg.in_memory_max_bytes = 1000
  with pytest.raises(ValueError, match="in_memory_max_bytes"):
    pipeline.make_train_dataset(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
  cfg = _sepp_config(fashion_dir, pairs_path, 0.5)
  cfg.train_split = "test[:50]"
  with pytest.raises(ValueError, match="60 rows but the train split has 50"):
    pipeline.make_train_dataset(cfg, batch_size=4, seed=0, process_index=0, process_count=1)


def test_sepp_is_deterministic(fashion_dir, pairs_path):
  cfg = _sepp_config(fashion_dir, pairs_path, 0.5)
  a, b = _batches(cfg, n=2), _batches(cfg, n=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["key_id"], y["key_id"])
    np.testing.assert_array_equal(x["view1"], y["view1"])
  assert any(not np.array_equal(x["key_id"], y["key_id"])
             for x, y in zip(a, _batches(cfg, n=2, seed=5)))
