"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, read with NumPy only.

The package installs the original idx .gz files under /usr/share/datasets/fashion-mnist/, so the
embedded default dataset works on a machine without internet. This module has no TensorFlow
dependency: tests and tools that only need arrays import it cheaply.
"""
import gzip
import os
import struct

import numpy as np

from jaxcontrast import errors

DEFAULT_DIRECTORY = "/usr/share/datasets/fashion-mnist"
INSTALL_COMMAND = "sudo apt-get install dataset-fashion-mnist"
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
SPLIT_SIZES = {"train": 60_000, "test": 10_000}

# Split name -> file prefix of the original distribution.
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051  # idx3, unsigned byte.
_LABELS_MAGIC = 2049  # idx1, unsigned byte.


def split_files(split: str, directory: str = DEFAULT_DIRECTORY) -> tuple[str, str]:
  """Returns the (images, labels) .gz paths of `split`; checks split name and existence."""
  if split not in _PREFIX:
    raise ValueError(f"Fashion-MNIST has splits {sorted(_PREFIX)}, not {split!r}.")
  prefix = _PREFIX[split]
  paths = (os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
           os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise errors.DataNotFoundError(
        f"Fashion-MNIST files not found: {missing}. The embedded default dataset comes from the "
        f"Debian package; install it with: {INSTALL_COMMAND}")
  return paths


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """Parses one idx .gz file (big-endian header: magic, then `ndim` dimension sizes)."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  header = struct.unpack(">" + "I" * (1 + ndim), data[:4 * (1 + ndim)])
  if header[0] != magic:
    raise ValueError(f"{path}: bad idx magic number {header[0]} (expected {magic}).")
  shape = header[1:]
  array = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: {array.size} values for header shape {shape}.")
  return array.reshape(shape)


def load_fashion_mnist_numpy(split: str = "train", directory: str = DEFAULT_DIRECTORY
                             ) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split as arrays.

  Args:
    split: "train" (60,000 images) or "test" (10,000 images).
    directory: folder holding the four original idx .gz files.

  Returns:
    images uint8 (N, 28, 28, 1) and labels int64 (N,), in file order.

  Raises:
    ValueError: unknown split or malformed file.
    FileNotFoundError: the Debian package is not installed (the message gives the command).
  """
  images_path, labels_path = split_files(split, directory)
  images = _read_idx(images_path, _IMAGES_MAGIC, 3)[..., None]
  labels = _read_idx(labels_path, _LABELS_MAGIC, 1).astype(np.int64)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels.")
  return images, labels
