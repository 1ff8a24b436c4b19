"""A tfds builder for the Debian Fashion-MNIST files, so the offline default uses the tfds path.

tfds registers its own `fashion_mnist` builder, which downloads from the internet; ours is
registered as `fashion_mnist_debian` (importing this module registers it) and reads the idx .gz
files of the Debian package `dataset-fashion-mnist`. The config name `fashion_mnist_debian` is
this builder, and `fashion_mnist` falls back to it when tfds' own dataset is not prepared (see
`datasets.py`), so Fashion-MNIST goes through the same tfds -> tf.data code as every other
dataset. Preparing it (`download_and_prepare`) is local and takes seconds; nothing is downloaded.

Examples keep the order of the original files (`disable_shuffling=True`), so example `i` of a tfds
split is row `i` of `load_fashion_mnist_numpy(split)`: pipeline ids, NumPy arrays and SePP pairs
files all index the same images.
"""
import os

import tensorflow_datasets as tfds

from jaxcontrast.data import fashion_mnist

# Overrides the folder holding the idx .gz files (default: the Debian package's folder).
SOURCE_DIR_ENV = "JAXCONTRAST_FASHION_MNIST_DIR"


def source_directory() -> str:
  """Folder read by the builder: $JAXCONTRAST_FASHION_MNIST_DIR or the Debian default."""
  return os.environ.get(SOURCE_DIR_ENV, fashion_mnist.DEFAULT_DIRECTORY)


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al. 2017, MIT licence) from the local Debian package files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original idx files, original order."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST, 28x28 grayscale, 10 classes, read from the Debian package "
                    "dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=list(fashion_mnist.CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    directory = source_directory()
    for split in fashion_mnist.SPLIT_SIZES:
      fashion_mnist.split_files(split, directory)  # Fails early, with the apt-get command.
    return {split: self._generate_examples(split, directory)
            for split in fashion_mnist.SPLIT_SIZES}

  def _generate_examples(self, split, directory):
    images, labels = fashion_mnist.load_fashion_mnist_numpy(split, directory)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
