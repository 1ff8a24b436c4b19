"""Shared set-up of the data tests (no tests here): a prepared Fashion-MNIST tfds folder.

The tfds dataset is prepared once per test run from the real Debian files into the run's
TFDS_DATA_DIR (tests/conftest.py: a temporary folder shared by the xdist workers and the
subprocesses), capped at PREPARED_EXAMPLES per split to keep the suite fast (the full files are
checked by the NumPy-loader tests). Tests that leave `data_dir` unset read the same folder.
Nothing depends on ~/tensorflow_datasets, and nothing downloads.
"""
import fcntl
import os

import numpy as np
import pytest

PREPARED_EXAMPLES = 1000
# The recipe whose views apply every photometric op (jitter, grayscale and blur in view 1,
# solarize in view 2): the pipeline tests check determinism on it alone.
ALL_OPS_RECIPE = "sce_imagenet"
_PREPARED = {}


def prepared_fashion_dir() -> str:
  """tfds data_dir holding fashion_mnist_debian (first PREPARED_EXAMPLES of each split): the
  run's TFDS_DATA_DIR, prepared by the first worker that asks (the others wait on a lock)."""
  if "dir" not in _PREPARED:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from jaxcontrast.data import fashion_mnist_tfds  # pylint: disable=g-import-not-at-top
    del fashion_mnist_tfds  # Registers the builder.
    data_dir = os.environ["TFDS_DATA_DIR"]
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = tfds.builder("fashion_mnist_debian", data_dir=data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            max_examples_per_split=PREPARED_EXAMPLES))
    _PREPARED["dir"] = data_dir
  return _PREPARED["dir"]


@pytest.fixture(scope="session")
def fashion_dir():
  return prepared_fashion_dir()


def fashion_config(data_dir, **overrides):
  """Default data config on the prepared Fashion-MNIST, small shuffle buffer."""
  from jaxcontrast.data.config import default_data_config  # pylint: disable=g-import-not-at-top
  cfg = default_data_config()
  cfg.data_dir = data_dir
  cfg.shuffle_buffer = 64
  cfg.threadpool_size = 0
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def first_batch(ds):
  """The first element of a dataset as NumPy arrays."""
  return {k: np.asarray(v) for k, v in next(iter(ds)).items()}


def unnormalize(x, mean, std):
  """Inverse of augment.normalize (back to [0, 1])."""
  return x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
