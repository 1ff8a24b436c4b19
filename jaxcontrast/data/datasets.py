"""Dataset names -> tfds builders, splits per process, and examples with stable ids.

Every dataset goes through tfds, and a name means what it means in tfds:

  fashion_mnist         tfds' `fashion_mnist` when it is prepared in `data_dir`; otherwise the
                        same 70,000 images from the Debian package `dataset-fashion-mnist`
                        (our local builder `fashion_mnist_debian`, prepared on first use, no
                        network). Neither there: an error naming both ways.
  fashion_mnist_debian  always the Debian files (offline, original file order).
  cifar10, cifar100, stl10, imagenet2012, "tfds:<name>"
                        tfds' dataset, which must already be prepared in `data_dir`
                        (`tfds build <name> --data_dir <dir>`); "tfds:<name>" of a dataset named
                        above takes its statistics, any other gets ImageNet's.

This module never starts a download: without network a download only fails after minutes of
retries.

The two Fashion-MNIST sources hold the same images but in different orders (tfds shuffles its
files when preparing them; ours keep the original order), so the ids below differ between them:
a run, its resume and its SePP pairs file must read the same source. Name the source
(`tfds:fashion_mnist` or `fashion_mnist_debian`) to pin it regardless of what `data_dir` holds.

Ids: `id` is the example's index within its base split (e.g. "train"), computed from tfds'
`tfds_id` (shard file and position in it) and the split's shard lengths, so it does not depend on
file shuffling, interleaving, sub-splits or the number of processes. Fashion-MNIST keeps the
original file order, so its ids are the rows of `load_fashion_mnist_numpy`.
"""
from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcontrast import errors
from jaxcontrast.data import fashion_mnist
from jaxcontrast.data import fashion_mnist_tfds  # Registers the `fashion_mnist_debian` builder.
# In a TensorFlow-free module (statistics are looked up without TensorFlow); also datasets.*.
from jaxcontrast.data.specs import (  # pylint: disable=unused-import
    KNOWN_DATASETS, TFDS_PREFIX, DatasetSpec, get_spec)


def get_builder(spec: DatasetSpec, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The tfds builder; local datasets are prepared here (from local files only). A spec with a
  fallback uses it when its own dataset is not prepared in `data_dir`."""
  if spec.fallback is not None:
    builder = _tfds_builder(spec.tfds_name, data_dir)
    if builder.is_prepared():
      logging.info("%s: tfds' dataset prepared in %s", spec.tfds_name, builder.data_dir)
      return builder
    try:
      if not _tfds_builder(spec.fallback.tfds_name, data_dir).is_prepared():
        fashion_mnist.split_files("train", fashion_mnist_tfds.source_directory())
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"Dataset {spec.tfds_name!r} is neither prepared in data_dir {builder.data_dir!r} nor "
          f"available offline. Either prepare tfds' dataset (`tfds build {spec.tfds_name} "
          f"--data_dir <data_dir>`, needs network), or install the Debian files "
          f"(`{fashion_mnist.INSTALL_COMMAND}`). ({e})") from e
    logging.info("%s is not prepared in %s: using the Debian files (%s)", spec.tfds_name,
                 builder.data_dir, spec.fallback.tfds_name)
    return get_builder(spec.fallback, data_dir)
  builder = _tfds_builder(spec.tfds_name, data_dir)
  if spec.local:
    builder.download_and_prepare()  # No-op once prepared; reads local files only.
  return builder


def source_name(builder) -> str:
  """The tfds dataset a builder reads, "name" or "name/config": what a checkpoint records as
  its data source ("fashion_mnist" or "fashion_mnist_debian" for `fashion_mnist`)."""
  config = getattr(builder, "builder_config", None)
  return f"{builder.name}/{config.name}" if config is not None else builder.name


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"tfds has no dataset {name!r}: {e}") from e


def split_names(builder) -> list[str]:
  """Names of the splits the builder knows ([] when unknown: not prepared, or mock data)."""
  return sorted(builder.info.splits.keys())


def _absolute(builder, split: str):
  """tfds absolute read instructions of `split`; checks the split exists when sizes are known."""
  known = split_names(builder)
  if not known:
    return None
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f"Split {split!r} does not exist in {builder.name} (or is malformed): "
                     f"available splits: {known}. ({e})") from e
  bases = {inst.splitname for inst in instructions}
  if len(bases) > 1:
    raise ValueError(f"Split {split!r} mixes base splits {sorted(bases)}; ids are indices within "
                     "one base split, so use one base split (sub-splits are fine).")
  return instructions


def check_split(builder, split: str) -> None:
  """Raises ValueError (listing the available splits) if `split` does not exist."""
  _absolute(builder, split)


def split_offset(builder, split: str) -> int:
  """Id of the first example of `split` (e.g. 100 for "train[100:200]"; 0 when unknown)."""
  instructions = _absolute(builder, split)
  return int(instructions[0].from_ or 0) if instructions else 0


def split_size(builder, split: str) -> int | None:
  """Number of examples of `split`, or None when tfds does not know (mock data)."""
  instructions = _absolute(builder, split)
  if instructions is None:
    return None
  total = builder.info.splits[instructions[0].splitname].num_examples
  return sum((i.to if i.to is not None else total) - (i.from_ or 0) for i in instructions)


def process_split(split: str, process_index: int, process_count: int):
  """Part `process_index` of `process_count` of `split` (`tfds.split_for_jax_process`
  semantics): a process's part, or an input stream's (`data.streams`)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return tfds.even_splits(split, n=process_count)[process_index]


def process_sizes(builder, split: str, process_count: int) -> list[int] | None:
  """Examples per part under `process_split` (None when sizes are unknown)."""
  if _absolute(builder, split) is None:
    return None
  return [split_size(builder, tfds.even_splits(split, n=process_count)[i])
          for i in range(process_count)]


def _shard_offsets(builder, split: str) -> tuple[int, ...]:
  """Index of the first example of every shard file of the base split of `split`."""
  instructions = _absolute(builder, split)
  if instructions is None:
    return (0,)
  lengths = builder.info.splits[instructions[0].splitname].shard_lengths or [0]
  offsets, total = [], 0
  for n in lengths:
    offsets.append(total)
    total += n
  return tuple(offsets)


def _id_from_tfds_id(tfds_id: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
  """"<name>-<split>.<format>-00012-of-01024__345" -> offsets[12] + 345 (int32)."""
  pattern = r".*-(\d+)-of-\d+__(\d+)$"
  tf.debugging.assert_equal(tf.strings.regex_full_match(tfds_id, pattern), True,
                            message="Unexpected tfds_id format (expected <file>-NNNNN-of-NNNNN__i)")
  shard = tf.strings.to_number(tf.strings.regex_replace(tfds_id, pattern, r"\1"), tf.int32)
  index = tf.strings.to_number(tf.strings.regex_replace(tfds_id, pattern, r"\2"), tf.int32)
  return tf.gather(offsets, shard) + index


def image_feature(builder, spec: DatasetSpec):
  """The tfds Image feature of the dataset (with a clear error when there is none)."""
  features = builder.info.features
  if spec.image_key not in features:
    raise ValueError(f"{builder.name} has no {spec.image_key!r} feature: {list(features)}")
  return features[spec.image_key]


def num_classes(builder, spec: DatasetSpec) -> int | None:
  """Number of classes of the label feature (None without one)."""
  features = builder.info.features
  if spec.label_key in features and hasattr(features[spec.label_key], "num_classes"):
    return int(features[spec.label_key].num_classes)
  return None


def read_split(builder, spec: DatasetSpec, split, *, base_split: str, shuffle_files: bool = False,
               seed: int | None = None, decode: bool = True,
               options: tf.data.Options | None = None) -> tf.data.Dataset:
  """Examples {"image", "label", "id"} of `split` (a process's part of `base_split`).

  Args:
    builder: the tfds builder.
    spec: its DatasetSpec.
    split: what to read (a split string or a `tfds.even_splits` element).
    base_split: the config split `split` was cut from (for ids and unlabelled splits).
    shuffle_files: shuffle the shard files (ids do not change).
    seed: file shuffling seed.
    decode: decode images now; False keeps the encoded bytes (decode later with
      `decode_image`, e.g. after the shuffle buffer, which then holds small byte strings).
    options: tf.data options applied by tfds' reader.

  Returns:
    image uint8 (H, W, C) (or a string when decode=False), label int32 (-1 when the split has
    no labels), id int32.
  """
  image_feature(builder, spec)  # Clear error if there is no image.
  decoders = None if decode else {spec.image_key: tfds.decode.SkipDecoding()}
  # The file order is the same on every pass over the dataset (a function of `seed`): the
  # training stream re-reads the files once per epoch and must not depend on how many passes
  # this process made before (exact resume); the pipeline reshuffles the examples per epoch.
  read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=seed, try_autocache=False,
                                skip_prefetch=True, options=options,
                                shuffle_reshuffle_each_iteration=False)
  if builder.info.disable_shuffling:  # tfds refuses to shuffle the files of ordered datasets.
    shuffle_files = False
  try:
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                            read_config=read_config)
  except AssertionError as e:  # tfds' "could not find data" when the dataset is not prepared.
    raise errors.DataNotFoundError(
        f"Dataset {builder.name} is not prepared in data_dir {builder.data_dir!r}. Prepare it "
        f"first (for example `tfds build {builder.name} --data_dir <data_dir>`; imagenet2012 "
        f"needs the manual download). Nothing is downloaded automatically. ({e})") from e
  offsets = tf.constant(_shard_offsets(builder, base_split), tf.int32)
  has_labels = (spec.label_key in builder.info.features
                and not set(base_split_names(base_split)) & set(spec.unlabeled_splits))

  @tf.autograph.experimental.do_not_convert
  def _select(ex):
    label = tf.cast(ex[spec.label_key], tf.int32) if has_labels else tf.constant(-1, tf.int32)
    return {"image": ex[spec.image_key], "label": label,
            "id": _id_from_tfds_id(ex["tfds_id"], offsets)}

  return ds.map(_select, num_parallel_calls=tf.data.AUTOTUNE)


def base_split_names(split: str) -> list[str]:
  """"train[:10%]+test" -> ["train", "test"]."""
  return [part.split("[")[0].strip() for part in str(split).split("+")]


def decode_image(builder, spec: DatasetSpec, encoded: tf.Tensor) -> tf.Tensor:
  """Decodes bytes kept by `read_split(decode=False)` into uint8 (H, W, C)."""
  return image_feature(builder, spec).decode_example(encoded)
