"""SePP (METHODS.md §6): random access to the train split and semantic partner drawing.

View 2 of an anchor is cut from a partner drawn from {anchor} U its semantic neighbours, which
can be any image of the split, so the pipeline needs random access by id. We hold the decoded
train split in memory (a tf.Variable, not a graph constant, to stay clear of the 2 GB graph
limit) and `tf.gather` from it.

Limitation: this needs fixed-size images and a split that fits in host memory; above
`in_memory_max_bytes` (default 4 GiB: Fashion-MNIST 47 MB, CIFAR 150 MB, STL-10 unlabelled
2.8 GB) or for variable-size images (imagenet2012) it raises. ImageNet-scale SePP would need a
random-access source (e.g. ArrayRecord via `tfds.data_sources`), not implemented.
"""
import logging
import math

import numpy as np
import tensorflow as tf

from jaxcontrast.data import augment
from jaxcontrast.data import datasets
from jaxcontrast.data import pairs as pairs_lib

logger = logging.getLogger(__name__)


def load_pair_indices(path: str) -> np.ndarray:
  """int32 (N, k) partner ids (-1 = padding) from a pairs file, or from a pretraining workdir
  holding one (`data.semantic_pairs=WORKDIR` reads WORKDIR/semantic_pairs.npz, written by
  `python -m jaxcontrast.semantic_pairs --workdir WORKDIR`).

  Uses `data.pairs.load_pairs` (which resolves a workdir and validates the file).
  """
  pairs = pairs_lib.load_pairs(path)
  indices = pairs["indices"] if isinstance(pairs, dict) else pairs.indices
  return np.asarray(indices, np.int32)


def check_pairs(indices: np.ndarray, num_examples: int, path: str) -> None:
  """The pairs file must have one row per example of the train split, ids in range."""
  if indices.ndim != 2:
    raise ValueError(f"{path}: indices must be (N, k), got shape {indices.shape}")
  if indices.shape[0] != num_examples:
    raise ValueError(f"{path}: {indices.shape[0]} rows but the train split has {num_examples} "
                     "examples; mine the pairs on the same split (rows = ids in split order).")
  if indices.size and (indices.max() >= num_examples or indices.min() < -1):
    raise ValueError(f"{path}: partner ids must be in [0, {num_examples}) or -1 (padding)")


def draw_partner(key: tf.Tensor, row: tf.Tensor, anchor: tf.Tensor, p_semantic: float
                 ) -> tf.Tensor:
  """With probability p_semantic a uniform valid neighbour in `row`, else (or if none) `anchor`.

  Args:
    key: stateless seed, shape [2].
    row: int32 (k,) neighbour ids of the anchor, -1 = padding (anywhere in the row).
    anchor: int32 scalar, the anchor's id.
    p_semantic: probability of using a semantic partner.

  Returns:
    int32 scalar id of the image view 2 is cut from.
  """
  k_use, k_pick = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  valid = tf.boolean_mask(row, row >= 0)
  count = tf.size(valid)
  use = (tf.random.stateless_uniform([], k_use) < p_semantic) & (count > 0)
  pick = tf.random.stateless_uniform([], k_pick, minval=0, maxval=tf.maximum(count, 1),
                                     dtype=tf.int32)
  # The anchor sits after the valid neighbours: index `count` selects it (and exists even when
  # the anchor has no neighbours).
  candidates = tf.concat([valid, tf.reshape(tf.cast(anchor, row.dtype), [1])], axis=0)
  return tf.gather(candidates, tf.where(use, pick, count))


def load_split_in_memory(dataset: tf.data.Dataset, num_examples: int, image_shape,
                         id_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Decoded images (N, H, W, C) uint8 and labels (N,) int32 of a whole split, row = id - offset.

  `dataset` yields {"image", "label", "id"} (any order); every row must be filled exactly once.
  """
  images = np.zeros((num_examples, *image_shape), np.uint8)
  labels = np.full((num_examples,), -1, np.int32)
  seen = np.zeros((num_examples,), bool)
  for batch in dataset.batch(1024).as_numpy_iterator():
    rows = batch["id"] - id_offset
    images[rows] = batch["image"]
    labels[rows] = batch["label"]
    seen[rows] = True
  if not seen.all():
    raise ValueError(f"Split has {int(seen.sum())} distinct ids for {num_examples} examples")
  logger.info("SePP: %d images (%.1f MB) held in memory", num_examples, images.nbytes / 2**20)
  return images, labels


def in_memory_source(builder, spec, split: str, *, pairs_path: str, convert_to: int | None,
                     max_bytes: int, parts: list[int], num_parts: int):
  """The SePP training source: the whole split in memory, the anchors of `parts` as ids.

  Every process holds the whole split once (a partner can be any image); anchors are cut into
  `num_parts` contiguous parts as `tfds.even_splits` does, and one id dataset is returned per
  entry of `parts` (the input streams this process reads).

  Returns:
    (list of datasets of {"id", "label"}, one per part, `get_image(id)` -> uint8 image with
    `convert_to` channels, `get_label(id)` -> int32 label, tf.Variable of pair indices (N, k),
    id of row 0).

  Raises:
    ValueError: variable-size images, split above `max_bytes`, or a pairs file that does not
      match the split.
  """
  shape = datasets.image_feature(builder, spec).shape
  if any(d is None for d in shape):
    raise ValueError(f"SePP holds the train split in memory and needs fixed-size images; "
                     f"{builder.name} images vary in size (not supported).")
  full = datasets.read_split(builder, spec, split, base_split=split, decode=True)
  n = datasets.split_size(builder, split) or int(full.cardinality())
  nbytes = n * math.prod(shape)
  if nbytes > max_bytes:
    raise ValueError(f"SePP needs random access to the train split, held in memory: "
                     f"{nbytes / 2**30:.2f} GiB > in_memory_max_bytes = "
                     f"{max_bytes / 2**30:.2f} GiB. Raise the cap if the host has the memory, "
                     "or use a smaller split.")
  offset = datasets.split_offset(builder, split)
  indices = load_pair_indices(pairs_path)
  check_pairs(indices, n, pairs_path)
  images, labels = load_split_in_memory(full, n, shape, id_offset=offset)
  images_var = tf.Variable(images, trainable=False, name="sepp_images")
  labels_t = tf.constant(labels)
  pairs_var = tf.Variable(indices, trainable=False, name="sepp_pairs")
  sizes = part_sizes(n, num_parts)

  def ids(part):
    start = sum(sizes[:part])
    rows = tf.data.Dataset.range(start, start + sizes[part]).map(lambda i: tf.cast(i, tf.int32))
    return rows.map(lambda row: {"id": row + offset, "label": tf.gather(labels_t, row)})

  def get_image(i):
    return augment.convert_channels(tf.gather(images_var, i - offset), convert_to)

  def get_label(i):
    return tf.gather(labels_t, i - offset)

  return [ids(p) for p in parts], get_image, get_label, pairs_var, offset


def part_sizes(n: int, num_parts: int) -> list[int]:
  """Anchors per part: `n` cut as `tfds.even_splits` cuts a split (the first n % parts get one
  more)."""
  return [n // num_parts + (i < n % num_parts) for i in range(num_parts)]
