"""Dataset paths (real Fashion-MNIST files; cifar10/cifar100/stl10/imagenet2012 via tfds mock
data, never downloaded) and every bad-input error."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcontrast.data import datasets
from jaxcontrast.data import fashion_mnist
from jaxcontrast.data import fashion_mnist_tfds
from jaxcontrast.data import pipeline
from jaxcontrast.data import recipes
from jaxcontrast.data import specs
from jaxcontrast.data.config import default_data_config
from test_data_helpers import (  # pylint: disable=unused-import
    ALL_OPS_RECIPE, fashion_config, fashion_dir, first_batch)


class RgbaToyForTest(tfds.core.GeneratorBasedBuilder):
  """A 4-channel dataset (only ever mocked): images the pipeline cannot convert to 1 or 3."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 4)), "label": tfds.features.ClassLabel(
            num_classes=2)}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError("test builder: mocked only")

  def _generate_examples(self):
    raise NotImplementedError("test builder: mocked only")


def _mock_config(name, **overrides):
  cfg = default_data_config()
  cfg.dataset = name
  cfg.data_dir = "gs://some-bucket/tensorflow_datasets"  # The user's bucket; mocked here.
  cfg.shuffle_buffer = 8
  cfg.threadpool_size = 0
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.mark.parametrize("name,size,classes", [
    ("cifar10", 32, 10), ("cifar100", 32, 100), ("stl10", 96, 10), ("imagenet2012", 48, 1000)])
def test_mocked_datasets_train_and_eval(name, size, classes):
  overrides = {"image_size": 48} if name == "imagenet2012" else {}
  with tfds.testing.mock_data(num_examples=12):
    cfg = _mock_config(name, **overrides)
    batch = first_batch(pipeline.make_train_dataset(cfg, batch_size=4, seed=0, process_index=0,
                                                    process_count=1))
    assert batch["view1"].shape == (4, size, size, 3)
    assert batch["view2"].shape == (4, size, size, 3)
    assert np.abs(batch["view1"] - batch["view2"]).mean() > 0.05
    if name == "stl10":  # The pretraining split is "unlabelled": no labels.
      assert (batch["label"] == -1).all()
    else:
      assert ((batch["label"] >= 0) & (batch["label"] < classes)).all()
    evals = list(pipeline.make_eval_dataset(cfg, batch_size=5, process_index=0,
                                            process_count=1).as_numpy_iterator())
    assert [b["mask"].sum() for b in evals] == [5, 5, 2]
    assert evals[0]["image"].shape == (5, size, size, 3)
    assert ((evals[0]["label"] >= 0) & (evals[0]["label"] < classes)).all()  # stl10 test: labels
    info = pipeline.dataset_info(cfg)
    assert info["num_classes"] == classes and info["image_shape"] == (size, size, 3)


def test_the_determinism_recipe_applies_every_op():
  ops = {op for view in recipes.RECIPES[ALL_OPS_RECIPE] for op in recipes.photometric_ops(view)}
  assert ops == {"jitter", "grayscale", "blur", "solarize"}


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_every_recipe_on_colour_images(recipe):
  """The colour ops (saturation, hue, grayscale) only run on 3-channel images. Determinism (same
  seed, same batch; another seed, other views) is checked on the recipe that applies every op
  (`ALL_OPS_RECIPE`): the recipes differ only in which ops they apply and how often."""
  with tfds.testing.mock_data(num_examples=8):
    cfg = _mock_config("cifar10", recipe=recipe)
    make = lambda seed: first_batch(pipeline.make_train_dataset(
        cfg, batch_size=4, seed=seed, process_index=0, process_count=1))
    a = make(3)
    assert a["view1"].shape == a["view2"].shape == (4, 32, 32, 3)
    assert a["view1"].dtype == np.float32 and np.isfinite(a["view1"]).all()
    assert np.abs(a["view1"] - a["view2"]).mean() > 0.05
    if recipe == ALL_OPS_RECIPE:
      b, c = make(3), make(4)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
      assert not np.array_equal(a["view2"], c["view2"])


def test_images_smaller_than_the_crop_are_upsampled():
  # Mock imagenet2012 images are tens of pixels wide: far smaller than the crop.
  with tfds.testing.mock_data(num_examples=6):
    cfg = _mock_config("imagenet2012", image_size=96, num_support_views=1,
                       local_crop_sizes=(64,))
    batch = first_batch(pipeline.make_train_dataset(cfg, batch_size=3, seed=0, process_index=0,
                                                    process_count=1))
    assert batch["view1"].shape == (3, 96, 96, 3) and batch["local_0"].shape == (3, 64, 64, 3)
    assert np.isfinite(batch["support"]).all()
    image = first_batch(pipeline.make_eval_dataset(cfg, batch_size=3, process_index=0,
                                                   process_count=1))["image"]
    assert image.shape == (3, 96, 96, 3) and np.isfinite(image).all()


def test_rgb_to_one_channel():
  with tfds.testing.mock_data(num_examples=4):
    cfg = _mock_config("cifar10", num_channels=1)
    batch = first_batch(pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0,
                                                    process_count=1))
    assert batch["view1"].shape == (2, 32, 32, 1)


def test_wrong_channel_count_is_an_error():
  with tfds.testing.mock_data(num_examples=4):
    cfg = _mock_config("tfds:rgba_toy_for_test", num_channels=3)
    with pytest.raises(ValueError, match="4 channels; cannot convert to 3"):
      pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
    cfg.num_channels = None  # Kept as 4 channels, but no statistics for 4 channels.
    with pytest.raises(ValueError, match="3 normalisation statistics for 4 channels"):
      pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1)


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist_typo'.*cifar10.*fashion_mnist"):
    pipeline.make_train_dataset(_mock_config("mnist_typo"), batch_size=2, seed=0,
                                process_index=0, process_count=1)
  with pytest.raises(ValueError, match="no dataset 'not_a_tfds_dataset'"):
    datasets.get_builder(datasets.get_spec("tfds:not_a_tfds_dataset"), None)


def test_missing_split_lists_the_available_ones(fashion_dir):
  cfg = fashion_config(fashion_dir, train_split="validation")
  with pytest.raises(ValueError, match=r"'validation' does not exist.*\['test', 'train'\]"):
    pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="does not exist"):
    pipeline.make_eval_dataset(fashion_config(fashion_dir), batch_size=2, split="val",
                               process_index=0, process_count=1)
  with pytest.raises(ValueError, match="mixes base splits"):  # Ids index one base split.
    pipeline.make_train_dataset(fashion_config(fashion_dir, train_split="train+test"),
                                batch_size=2, seed=0, process_index=0, process_count=1)


def test_unprepared_dataset_is_a_clear_error_without_download(tmp_path):
  cfg = default_data_config()
  cfg.dataset = "cifar10"
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar10"):
    pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
  assert not any(tmp_path.iterdir())  # Nothing was downloaded or written.


def test_missing_fashion_mnist_files_give_the_install_command(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
    fashion_mnist.load_fashion_mnist_numpy("train", str(tmp_path))
  monkeypatch.setenv(fashion_mnist_tfds.SOURCE_DIR_ENV, str(tmp_path / "no_debian_files"))
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.dataset = "fashion_mnist_debian"
  with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
    pipeline.dataset_info(cfg)
  cfg.dataset = "fashion_mnist"  # Neither tfds' dataset nor the Debian files: both ways named.
  with pytest.raises(FileNotFoundError, match=r"neither prepared.*`tfds build fashion_mnist "
                     r"--data_dir <data_dir>`.*`sudo apt-get install dataset-fashion-mnist`"):
    pipeline.dataset_info(cfg)
  assert not (tmp_path / "tfds" / "fashion_mnist").exists()  # Nothing downloaded or written.


def _prepare_tfds_fashion_mnist_metadata(data_dir: str) -> None:
  """What `tfds build fashion_mnist` leaves besides the record files (dataset_info.json,
  features.json): tfds then sees the dataset as prepared, and `tfds.testing.mock_data` serves
  its records."""
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize("name", ["fashion_mnist", "tfds:fashion_mnist"])
def test_fashion_mnist_is_tfds_dataset_when_prepared(name, tmp_path, monkeypatch):
  data_dir = str(tmp_path / "tfds")
  _prepare_tfds_fashion_mnist_metadata(data_dir)
  # No Debian files: falling back to them would fail.
  monkeypatch.setenv(fashion_mnist_tfds.SOURCE_DIR_ENV, str(tmp_path / "no_debian_files"))
  with tfds.testing.mock_data(num_examples=64, data_dir=data_dir):
    cfg = _mock_config(name, data_dir=data_dir)
    image = first_batch(pipeline.make_eval_dataset(cfg, batch_size=64, process_index=0,
                                                   process_count=1))["image"]
    if name == "fashion_mnist":  # Pretraining reads it too (one name is enough).
      train = first_batch(pipeline.make_train_dataset(cfg, batch_size=4, seed=0,
                                                      process_index=0, process_count=1))
      assert train["view1"].shape == (4, 28, 28, 1)
  assert image.shape == (64, 28, 28, 1)
  # Normalised with Fashion-MNIST's statistics, (p / 255 - 0.2860) / 0.3530: undoing them gives
  # back integer pixels spanning (mock data's) 0..254.
  pixels = (image * 0.3530 + 0.2860) * 255
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  assert round(pixels.min()) == 0 and round(pixels.max()) >= 250


def test_named_sources_ignore_what_else_is_prepared(tmp_path):
  """`fashion_mnist_debian` reads the Debian files even where tfds' dataset is prepared."""
  data_dir = str(tmp_path / "tfds")
  _prepare_tfds_fashion_mnist_metadata(data_dir)
  with tfds.testing.mock_data(num_examples=4, data_dir=data_dir):
    def builder_name(name):
      return datasets.get_builder(datasets.get_spec(name), data_dir).name
    assert builder_name("fashion_mnist_debian") == "fashion_mnist_debian"
    assert builder_name("fashion_mnist") == "fashion_mnist"


def test_source_names_and_the_names_that_pin_them(tmp_path):
  """What a checkpoint records as its source (the tfds dataset, with its builder config) and the
  `data.dataset` that reads that source whatever data_dir holds."""
  source = lambda name: datasets.source_name(tfds.builder(name, data_dir=str(tmp_path)))
  assert source("fashion_mnist") == "fashion_mnist"
  assert source("imagenet2012_subset/10pct") == "imagenet2012_subset/10pct"
  assert source("imagenet2012_subset") == "imagenet2012_subset/1pct"   # its default config
  assert specs.pinned_name("fashion_mnist_debian") == "fashion_mnist_debian"
  assert specs.pinned_name("fashion_mnist") == "tfds:fashion_mnist"
  assert specs.pinned_name("imagenet2012_subset/10pct") == "tfds:imagenet2012_subset/10pct"
  # Each pinned name resolves to that source alone (no fallback).
  for pinned in ("tfds:fashion_mnist", "fashion_mnist_debian"):
    spec = datasets.get_spec(pinned)
    assert spec.fallback is None and spec.tfds_name == pinned.removeprefix("tfds:")


def test_numpy_loader_reads_the_full_files():
  images, labels = fashion_mnist.load_fashion_mnist_numpy("train")
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.int64
  assert (np.bincount(labels) == 6000).all()
  test_images, _ = fashion_mnist.load_fashion_mnist_numpy("test")
  assert test_images.shape == (10000, 28, 28, 1)
  assert abs(images.mean() / 255 - 0.2860) < 1e-3  # The normalisation statistics we use.
  with pytest.raises(ValueError, match="splits"):
    fashion_mnist.load_fashion_mnist_numpy("validation")


def test_tfds_builder_keeps_file_order(fashion_dir):
  builder = tfds.builder("fashion_mnist_debian", data_dir=fashion_dir)
  images, labels = fashion_mnist.load_fashion_mnist_numpy("train")
  ds = builder.as_dataset(split="train[100:105]")
  for i, ex in enumerate(tfds.as_numpy(ds)):
    np.testing.assert_array_equal(ex["image"], images[100 + i])
    assert ex["label"] == labels[100 + i]


def test_id_from_tfds_id_uses_shard_offsets():
  ids = datasets._id_from_tfds_id(  # pylint: disable=protected-access
      tf.constant(["x-train.tfrecord-00002-of-00004__7", "x-train.tfrecord-00000-of-00004__3"]),
      tf.constant([0, 10, 25, 31]))
  np.testing.assert_array_equal(ids, [32, 3])


def test_process_split_matches_tfds_split_for_jax_process(fashion_dir):
  builder = tfds.builder("fashion_mnist_debian", data_dir=fashion_dir)
  assert datasets.process_sizes(builder, "test[:11]", 3) == [4, 4, 3]
  with pytest.raises(ValueError, match="process_index"):
    datasets.process_split("train", 2, 2)
  assert os.path.isdir(fashion_dir)
