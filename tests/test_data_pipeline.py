"""Training and evaluation pipelines on the real Fashion-MNIST files (via our tfds builder)."""
import dataclasses
import numpy as np
import pytest

from jaxcontrast.data import pipeline
from jaxcontrast.data import recipes
from jaxcontrast.data.fashion_mnist import load_fashion_mnist_numpy
from test_data_helpers import (  # pylint: disable=unused-import
    ALL_OPS_RECIPE, fashion_config, fashion_dir, first_batch, unnormalize)

MEAN, STD = (0.2860,), (0.3530,)


@pytest.fixture(scope="module")
def numpy_test_split():
  return load_fashion_mnist_numpy("test")


def _train(cfg, seed=0, batch_size=8, process_index=0, process_count=1):
  return pipeline.make_train_dataset(cfg, batch_size=batch_size, seed=seed,
                                     process_index=process_index, process_count=process_count)


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_every_recipe_shapes_views_and_determinism(fashion_dir, recipe):
  """Every recipe's batch; same seed, same batch and another seed, other views on the recipe
  that applies every op (the recipes differ only in which ops they apply and how often)."""
  cfg = fashion_config(fashion_dir, recipe=recipe, train_split="test")
  a = first_batch(_train(cfg, seed=1))
  assert set(a) == {"view1", "view2", "id", "key_id", "label"}
  for key in ("view1", "view2"):
    assert a[key].shape == (8, 28, 28, 1) and a[key].dtype == np.float32
  for key in ("id", "key_id", "label"):
    assert a[key].shape == (8,) and a[key].dtype == np.int32
  np.testing.assert_array_equal(a["key_id"], a["id"])
  assert np.abs(a["view1"] - a["view2"]).mean() > 0.05  # Two different views.
  if recipe != ALL_OPS_RECIPE:
    return
  b = first_batch(_train(cfg, seed=1))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])  # Same seed, same batch.
  c = first_batch(_train(cfg, seed=2))
  assert not np.array_equal(a["view1"], c["view1"])


def test_ids_labels_and_pixels_match_the_files(fashion_dir, numpy_test_split):
  images, labels = numpy_test_split
  cfg = fashion_config(fashion_dir, recipe="crop_flip", train_split="test")
  cfg.view1.crop_scale = (1.0, 1.0)
  cfg.view1.flip_prob = 0.0
  batch = first_batch(_train(cfg, batch_size=16))
  np.testing.assert_array_equal(batch["label"], labels[batch["id"]])
  pixels = unnormalize(batch["view1"], MEAN, STD) * 255
  np.testing.assert_allclose(pixels, images[batch["id"]].astype(np.float32), atol=1e-2)


def test_antialias_switch_in_the_pipeline(fashion_dir, numpy_test_split):
  """Whole image 28 -> 14: plain bilinear samples between pixel pairs, i.e. 2x2 average pooling;
  the antialiased (default) shrink weights a wider neighbourhood, so it differs."""
  images, _ = numpy_test_split
  cfg = fashion_config(fashion_dir, recipe="crop_flip", train_split="test", image_size=14)
  cfg.view1.update(crop_scale=(1.0, 1.0), flip_prob=0.0)
  cfg.antialias = False
  batch = first_batch(_train(cfg))
  pooled = images[batch["id"]].astype(np.float32).reshape(8, 14, 2, 14, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(unnormalize(batch["view1"], MEAN, STD)[..., 0] * 255, pooled,
                             atol=1e-2)
  cfg.antialias = True
  smooth = first_batch(_train(cfg))
  np.testing.assert_array_equal(smooth["id"], batch["id"])
  assert np.abs(smooth["view1"] - batch["view1"]).max() > 0.1


def test_views_follow_the_recipe(fashion_dir):
  cfg = fashion_config(fashion_dir, recipe="crop_flip", train_split="test", num_channels=3)
  cfg.view1.crop_scale = (1.0, 1.0)
  cfg.view1.flip_prob = 1.0
  cfg.view2.crop_scale = (1.0, 1.0)
  cfg.view2.flip_prob = 0.0
  cfg.view2.solarize_prob = 1.0
  batch = first_batch(_train(cfg))
  v1 = unnormalize(batch["view1"], MEAN * 3, STD * 3)
  v2 = unnormalize(batch["view2"], MEAN * 3, STD * 3)
  original = v1[:, :, ::-1]  # View 1 is the whole image, mirrored.
  np.testing.assert_allclose(v2, np.where(original >= 0.5, 1.0 - original, original), atol=1e-4)
  assert v1.shape[-1] == 3
  np.testing.assert_array_equal(v1[..., 0], v1[..., 2])  # Grayscale replicated to 3 channels.


def test_grayscale_as_three_channels_and_info(fashion_dir):
  cfg = fashion_config(fashion_dir, num_channels=3, train_split="test")
  batch = first_batch(_train(cfg))
  assert batch["view1"].shape == (8, 28, 28, 3)
  np.testing.assert_allclose(batch["view1"][..., 0], batch["view1"][..., 1])
  info = pipeline.dataset_info(cfg)
  assert info["num_classes"] == 10 and info["image_shape"] == (28, 28, 3)
  assert info["num_train"] == 1000  # The prepared subset (see test_data_helpers).
  assert pipeline.dataset_info(fashion_config(fashion_dir))["image_shape"] == (28, 28, 1)


def test_normalization_statistics(fashion_dir):
  """`data.config.normalization`, which the pipeline and loaded encoders share: the config's
  statistics, else the dataset's; one value repeated per channel; RGB statistics luma-weighted
  (BT.601, by hand below) for 1 channel; mismatched lengths refused."""
  from jaxcontrast.data import config as data_config
  from jaxcontrast.data.config import default_data_config
  norm = data_config.normalization
  cfg = default_data_config()
  assert norm(cfg, 1) == (MEAN, STD)                       # fashion_mnist's statistics
  assert norm(cfg, 3) == (MEAN * 3, STD * 3)
  cfg.dataset = "cifar10"
  c_mean, c_std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
  assert norm(cfg, 3) == (c_mean, c_std)
  gray = lambda v: 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2]
  mean, std = norm(cfg, 1)
  assert mean == pytest.approx((gray(c_mean),), abs=1e-15)
  assert std == pytest.approx((gray(c_std),), abs=1e-15)
  cfg.mean, cfg.std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)  # the config's win
  assert norm(cfg, 3) == ((0.5, 0.25, 0.125), (0.2, 0.3, 0.4))
  cfg.std = (0.2, 0.3)
  with pytest.raises(ValueError, match="differ in length"):
    norm(cfg, 3)
  cfg.mean, cfg.std = (0.5, 0.25), (0.2, 0.3)
  with pytest.raises(ValueError, match="2 normalisation statistics for 3 channels"):
    norm(cfg, 3)
  # What the pipeline normalises with: the same function, on the dataset it resolved.
  resolve = pipeline._resolve  # pylint: disable=protected-access
  resolved = resolve(fashion_config(fashion_dir, num_channels=3))
  assert (resolved.mean, resolved.std) == (MEAN * 3, STD * 3)
  resolved = resolve(fashion_config(fashion_dir, mean=(0.5,), std=(0.25,)))
  assert (resolved.mean, resolved.std) == ((0.5,), (0.25,))


def test_support_views_and_multicrop(fashion_dir):
  cfg = fashion_config(fashion_dir, train_split="test", num_support_views=3,
                       local_crop_sizes=(12, 16), image_size=32,
                       local_crop_scale=((0.3, 0.6), (0.05, 0.1)))
  batch = first_batch(_train(cfg, batch_size=4))
  assert batch["view1"].shape == (4, 32, 32, 1)
  assert batch["support"].shape == (4, 3, 32, 32, 1) and batch["support"].dtype == np.float32
  assert batch["local_0"].shape == (4, 12, 12, 1)
  assert batch["local_1"].shape == (4, 16, 16, 1)
  support = batch["support"]
  assert np.abs(support[:, 0] - support[:, 1]).mean() > 0.05
  assert np.abs(support[:, 0] - batch["view2"]).mean() > 0.05


def test_views_depend_on_seed_epoch_and_id_not_on_sharding(fashion_dir):
  cfg = fashion_config(fashion_dir, train_split="test[:64]", shuffle_buffer=0)
  stream = pipeline.make_train_iterator(cfg, batch_size=8, seed=0, process_index=0,
                                        process_count=1)
  single = [next(stream) for _ in range(5)]
  second = first_batch(_train(cfg, process_index=1, process_count=2))
  np.testing.assert_array_equal(single[0]["id"], np.arange(8))  # No shuffle: file order.
  np.testing.assert_array_equal(second["id"], np.arange(32, 40))
  np.testing.assert_array_equal(single[4]["id"], second["id"])
  # Same (seed, epoch, id): same views, although the image is at position 32 of one stream
  # and at position 0 of the other.
  np.testing.assert_array_equal(single[4]["view1"], second["view1"])
  np.testing.assert_array_equal(single[4]["view2"], second["view2"])
  default = first_batch(pipeline.make_train_dataset(cfg, batch_size=8, seed=0))  # jax: 1 process.
  np.testing.assert_array_equal(single[0]["view1"], default["view1"])
  # A second epoch gives the same image new views.
  stream = pipeline.make_train_iterator(cfg, batch_size=32, seed=0, process_index=0,
                                        process_count=1)
  epoch0, _, epoch1 = next(stream), next(stream), next(stream)
  assert isinstance(epoch0["view1"], np.ndarray)
  np.testing.assert_array_equal(epoch0["id"], epoch1["id"])
  assert np.abs(epoch0["view1"] - epoch1["view1"]).mean() > 0.05


def test_two_processes_see_disjoint_parts_covering_the_split(fashion_dir):
  cfg = fashion_config(fashion_dir, train_split="test[:50]")
  seen = []
  for index in range(2):
    ids = np.concatenate([b["id"] for _, b in zip(range(30), pipeline.make_train_iterator(
        cfg, batch_size=5, seed=0, process_index=index, process_count=2))])
    seen.append(set(ids.tolist()))
  assert seen[0] == set(range(25)) and seen[1] == set(range(25, 50))


@pytest.mark.parametrize("split,batch_size", [("test[:100]", 24), ("test[:101]", 16)])
def test_eval_pads_and_sees_every_example_once(fashion_dir, numpy_test_split, split, batch_size):
  images, labels = numpy_test_split
  cfg = fashion_config(fashion_dir)
  per_process = []
  for index in range(2):
    batches = list(pipeline.make_eval_dataset(cfg, batch_size=batch_size, split=split,
                                              process_index=index, process_count=2)
                   .as_numpy_iterator())
    per_process.append(batches)
    for b in batches:
      assert b["image"].shape == (batch_size, 28, 28, 1) and b["mask"].dtype == bool
      assert (b["id"][~b["mask"]] == -1).all() and (b["label"][~b["mask"]] == -1).all()
      np.testing.assert_array_equal(b["label"][b["mask"]], labels[b["id"][b["mask"]]])
      pixels = unnormalize(b["image"][b["mask"]], MEAN, STD) * 255
      np.testing.assert_allclose(pixels, images[b["id"][b["mask"]]], atol=1e-2)
  assert len(per_process[0]) == len(per_process[1])  # Same batch count on every process.
  ids = np.concatenate([b["id"][b["mask"]] for batches in per_process for b in batches])
  n = int(split[len("test[:"):-1])
  assert sorted(ids.tolist()) == list(range(n))


def test_cache_gives_the_same_stream(fashion_dir):
  cfg = fashion_config(fashion_dir, train_split="test[:40]")
  plain = first_batch(_train(cfg))
  cfg.cache = True
  cached = first_batch(_train(cfg))
  for key in plain:
    np.testing.assert_array_equal(plain[key], cached[key])


def test_recipe_overrides_and_presets():
  cfg = fashion_config(None)
  cfg.recipe = "sce_imagenet"
  views = recipes.view_recipes(cfg)
  assert views["view1"].blur_prob == 1.0 and views["view1"].solarize_prob == 0.0
  assert views["view2"].blur_prob == 0.1 and views["view2"].solarize_prob == 0.2
  assert views["support"] == views["view2"]
  cfg.view2.blur_prob = 0.3
  cfg.local_crop_sizes = (12, 8)
  cfg.local_crop_scale = (0.05, 0.3)
  views = recipes.view_recipes(cfg)
  assert views["view2"].blur_prob == 0.3 and views["view1"].blur_prob == 1.0
  for name in ("local_0", "local_1"):   # one range for all: view 1's recipe, that crop scale
    assert views[name] == dataclasses.replace(views["view1"], crop_scale=(0.05, 0.3))
  # One range per crop, and the local_view overrides on top of view 1's recipe.
  cfg.local_crop_scale = ((0.2, 0.8), (0.1, 0.4))
  cfg.local_view.blur_prob = 0.5
  cfg.local_view.solarize_prob = 0.2
  views = recipes.view_recipes(cfg)
  assert views["local_0"].crop_scale == (0.2, 0.8) and views["local_1"].crop_scale == (0.1, 0.4)
  assert views["local_1"] == dataclasses.replace(views["view1"], crop_scale=(0.1, 0.4),
                                                 blur_prob=0.5, solarize_prob=0.2)
  assert views["view1"].blur_prob == 1.0 and views["view1"].solarize_prob == 0.0
  for bad, match in [(((0.2, 0.8),), "1 ranges for 2 local crops"),
                     (((0.2, 0.8), (0.5, 0.4)), "0 < min <= max <= 1"), ((0.0, 0.5), "got")]:
    cfg.local_crop_scale = bad
    with pytest.raises(ValueError, match=match):
      recipes.view_recipes(cfg)
  cfg.local_crop_sizes, cfg.local_crop_scale = (), (0.05, 0.14)
  cfg.recipe = "sce_cifar"
  weak = recipes.view_recipes(cfg)["view2"]
  assert weak.jitter_prob == weak.grayscale_prob == weak.solarize_prob == 0.0
  assert recipes.view_recipes(cfg)["view1"].jitter_prob == 0.8
  mocov2, cifar = recipes.RECIPES["mocov2"][0], recipes.RECIPES["mocov2_cifar"][0]
  assert (mocov2.blur_prob, cifar.blur_prob, mocov2.crop_scale) == (0.5, 0.0, (0.2, 1.0))
  assert (mocov2.brightness, mocov2.contrast, mocov2.saturation, mocov2.hue) == (0.4,) * 3 + (0.1,)
  cfg.recipe = "nope"
  with pytest.raises(ValueError, match="Unknown recipe 'nope'.*mocov2"):
    recipes.view_recipes(cfg)


def test_autotune_is_off_unless_asked(fashion_dir):
  """tf.data's autotuning stays off by default in the training and evaluation datasets (with it
  on, TensorFlow 2.21 held the end of a run in the iterator's destructor: docs/data.md), and
  `data.autotune=True` turns it on."""
  cfg = fashion_config(fashion_dir, train_split="test[:40]", eval_split="test[:40]")
  for autotune in (False, True):
    cfg.autotune = autotune
    for ds in (_train(cfg), pipeline.make_eval_dataset(cfg, batch_size=8, process_index=0,
                                                       process_count=1)):
      assert ds.options().autotune.enabled is autotune
