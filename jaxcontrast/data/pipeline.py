"""Training and evaluation tf.data pipelines: config -> per-process batches of views.

Training (`make_train_dataset`), per input stream (S = `data.streams` parts of the split, one
per process by default; each process reads S / P of them):

  read this stream's part of the split (tfds, ids from tfds_id; file order fixed by seed)
  -> [cache] -> for epoch e = e0, e0 + 1, ...: shuffle (encoded bytes, buffer seeded from
     (seed, e), so the order of an epoch is a function of (seed, e) alone) [-> skip the examples
     of epoch e0 already consumed]
  -> per example: decode, draw every random choice from a stateless seed
     fold_in(fold_in(seed, epoch), id), cut and resize every view's crop
  -> batch (drop remainder) -> per batch: photometric ops with the per-example choices,
     normalise
then, per process: concatenate its streams' batches (part order) -> prefetch

An example's views depend only on (seed, epoch, id): not on the shuffle order, the batch it
lands in or the number of processes; the global batches depend on (seed, S) only. The stream is
a function of (seed, position), so a resumed run passes `start_example` (examples this process
already consumed) and continues exactly where the checkpoint was taken; the skipped examples are
never decoded. Options follow big_vision (private thread pool, one thread per op, deterministic
order). Element dict: see `make_train_dataset`.
"""
import dataclasses

import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcontrast.data import augment
from jaxcontrast.data import augment_jax
from jaxcontrast.data import config as data_config_lib
from jaxcontrast.data import datasets
from jaxcontrast.data import recipes as recipes_lib
from jaxcontrast.data import sepp

# fold_in constants separating the random streams of one example.
_VIEWS_STREAM = 0
_PARTNER_STREAM = 1
# fold_in constant of the per-epoch shuffle seeds (a stream apart from the examples' seeds).
_SHUFFLE_STREAM = 0x5EED
# Epochs of the training stream: "infinite" (2**40 epochs of one example outlast any run).
_MAX_EPOCHS = 2**40


@dataclasses.dataclass(frozen=True)
class _Resolved:
  """The config with every None default replaced by the dataset's value."""
  spec: datasets.DatasetSpec
  builder: tfds.core.DatasetBuilder
  train_split: str
  eval_split: str
  image_size: int
  num_channels: int
  convert_to: int | None  # Argument of convert_channels.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  eval_crop_ratio: float


def _resolve(cfg) -> _Resolved:
  spec = datasets.get_spec(cfg.dataset)
  builder = datasets.get_builder(spec, cfg.get("data_dir"))
  shape = datasets.image_feature(builder, spec).shape
  source_channels = shape[-1]
  convert_to = cfg.get("num_channels")
  if convert_to is not None and convert_to not in (1, 3):
    raise ValueError(f"num_channels must be None, 1 or 3, got {convert_to}")
  if convert_to is not None and source_channels not in (None, 1, 3, convert_to):
    raise ValueError(f"{builder.name} images have {source_channels} channels; cannot convert to "
                     f"{convert_to} (supported: 1 -> 3, 3 -> 1, or num_channels=None to keep).")
  channels = convert_to or source_channels
  if channels is None:
    raise ValueError(f"{builder.name}: unknown channel count; set num_channels")
  image_size = cfg.get("image_size") or spec.image_size or (
      shape[0] if shape[0] is not None and shape[0] == shape[1] else None)
  if not image_size:
    raise ValueError(f"{builder.name}: images vary in size; set image_size")
  mean, std = data_config_lib.normalization(cfg, channels, spec=spec)
  return _Resolved(
      spec=spec, builder=builder, train_split=cfg.get("train_split") or spec.train_split,
      eval_split=cfg.get("eval_split") or spec.eval_split, image_size=int(image_size),
      num_channels=int(channels), convert_to=convert_to, mean=mean, std=std,
      eval_crop_ratio=float(cfg.get("eval_crop_ratio") or spec.eval_crop_ratio))


def _process(process_index, process_count) -> tuple[int, int]:
  """Defaults to this JAX process."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


augment_on = data_config_lib.augment_on


def device_augment(data_config):
  """The train step's `augment_jax.DeviceAugment` for this data config (every view kind's
  recipe, the resolved normalisation statistics)."""
  r = _resolve(data_config)
  return augment_jax.DeviceAugment.create(recipes_lib.view_recipes(data_config), r.mean, r.std)


def _options(cfg) -> tf.data.Options:
  """big_vision's host-side options; tf.data autotuning only with `autotune` (config.py)."""
  options = tf.data.Options()
  if cfg.get("threadpool_size", 48):
    options.threading.private_threadpool_size = int(cfg.threadpool_size)
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  options.autotune.enabled = bool(cfg.get("autotune", False))
  return options


def _cardinality(ds: tf.data.Dataset, what: str) -> int:
  n = int(ds.cardinality())
  if n < 0:
    raise ValueError(f"{what}: unknown number of examples")
  return n


def _view_sizes(cfg, r: _Resolved) -> list[tuple[str, str, int]]:
  """(output key, recipe kind, crop size) of every view cut from one example."""
  views = [("view1", "view1", r.image_size), ("view2", "view2", r.image_size)]
  views += [(f"support_{s}", "support", r.image_size)
            for s in range(int(cfg.get("num_support_views") or 0))]
  views += [(f"local_{i}", f"local_{i}", int(size))
            for i, size in enumerate(cfg.get("local_crop_sizes") or ())]
  return views


def _seed_tensor(seed: int) -> tf.Tensor:
  seed = int(seed)
  return tf.constant([seed >> 32, seed & 0xFFFFFFFF], tf.int64)


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def num_streams(data_config, process_count: int) -> int:
  """The input streams the global batch is assembled from (`data.streams`, None = one per
  process); a multiple of the process count, so every process reads whole streams."""
  streams = data_config.get("streams") or process_count
  if streams % process_count:
    raise ValueError(f"data.streams = {streams} is not a multiple of the {process_count} "
                     "processes: every process reads whole streams. Set data.streams to a "
                     "multiple of the process count (or None: one stream per process).")
  return int(streams)


def make_train_dataset(data_config, *, batch_size: int, seed: int, process_index=None,
                       process_count=None, start_example: int = 0) -> tf.data.Dataset:
  """The infinite training stream of this process.

  The split is cut into S = `data.streams` parts (default: one per process), each read as its
  own stream (own file order, shuffle and resume position; a function of (seed, S, part)), and
  every global batch is the concatenation of one batch of batch_size x P / S rows from each
  stream, in part order. Process p reads parts p * S / P ... (p + 1) * S / P - 1, so its local
  batch is the rows of the global batch that its devices hold, and the global batches depend on
  (seed, S) only: 1 process x 8 devices and 2 processes x 4 devices with the same S train on the
  same batches (tests/test_multiprocess.py).

  Args:
    data_config: `default_data_config()` or a modified copy.
    batch_size: this process's share of the global batch.
    seed: base seed; same seed -> same batches.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    start_example: examples of this process's stream to skip (a resumed run: steps done x
      batch_size). The stream from there is the same as the tail of the stream from 0.

  Returns:
    A tf.data.Dataset of dicts (B = batch_size, H = W = image_size, C = channels):
      "view1"    float32 (B, H, W, C)  online/query branch view, normalised
      "view2"    float32 (B, H, W, C)  target/key branch view
      "support"  float32 (B, S, H, W, C)  only if num_support_views = S > 0 (target branch)
      "local_i"  float32 (B, h_i, h_i, C)  only for multi-crop (local_crop_sizes)
      "id"       int32 (B,)  index of the anchor within its split
      "key_id"   int32 (B,)  index of the image view2 was cut from (SePP partner, else id)
      "neighbors" int32 (B, k)  SePP only: the anchor's mined neighbours (-1 = padding)
      "key_label" int32 (B,)  SePP only: the label of the image view2 was cut from
      "label"    int32 (B,)  -1 when the split has no labels
    With `augment_on(data_config) == "device"` the views are uint8 crops (cropped, resized,
    flipped; nothing else) and "aug" maps each view's name to its per-example parameters
    (`augment_jax.PARAM_KEYS`, leading dims as its view's); the train step finishes them
    (`device_augment(data_config)`).
  """
  cfg = data_config
  r = _resolve(cfg)
  process_index, process_count = _process(process_index, process_count)
  streams = num_streams(cfg, process_count)
  mine = streams // process_count   # streams read by this process
  if batch_size % mine:
    raise ValueError(f"batch size {batch_size} of process {process_index} is not divisible by "
                     f"its {mine} input streams (data.streams = {streams}, {process_count} "
                     "processes)")
  if start_example < 0 or start_example % mine:
    raise ValueError(f"start_example must be >= 0 and a multiple of this process's {mine} "
                     f"streams, got {start_example}")
  parts = [process_index * mine + i for i in range(mine)]
  view_recipes = recipes_lib.view_recipes(cfg)
  views = _view_sizes(cfg, r)
  num_support = int(cfg.get("num_support_views") or 0)
  on_device = augment_on(cfg) == "device"
  options = _options(cfg)
  semantic = cfg.get("semantic_pairs")
  p_semantic = float(cfg.get("p_semantic") or 0.0)
  if semantic and not 0 <= p_semantic <= 1:
    raise ValueError(f"p_semantic must be a probability, got {p_semantic}")

  datasets.check_split(r.builder, r.train_split)
  get_image, get_label, pairs_var, sepp_offset = None, None, None, 0
  if semantic:
    sources, get_image, get_label, pairs_var, sepp_offset = sepp.in_memory_source(
        r.builder, r.spec, r.train_split, pairs_path=semantic, convert_to=r.convert_to,
        max_bytes=int(cfg.get("in_memory_max_bytes") or 0), parts=parts, num_parts=streams)
    decoded = True
  else:
    decoded = bool(cfg.get("cache"))
    sources = []
    for part in parts:
      ds = datasets.read_split(r.builder, r.spec, datasets.process_split(r.train_split, part,
                                                                        streams),
                               base_split=r.train_split, shuffle_files=True, seed=seed,
                               decode=decoded, options=options)
      if decoded:
        ds = ds.map(lambda ex: {**ex, "image": augment.convert_channels(ex["image"],
                                                                        r.convert_to)},
                    num_parallel_calls=tf.data.AUTOTUNE).cache()
      sources.append(ds)

  base_key = _seed_tensor(seed)
  antialias = bool(cfg.antialias)

  @tf.autograph.experimental.do_not_convert
  def to_image(ex):
    if semantic:
      return get_image(ex["id"])
    if decoded:
      return ex["image"]
    return augment.convert_channels(datasets.decode_image(r.builder, r.spec, ex["image"]),
                                    r.convert_to)

  @tf.autograph.experimental.do_not_convert
  def per_example(epoch, ex):
    key = tf.random.experimental.stateless_fold_in(base_key, epoch)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(ex["id"], tf.int64))
    anchor = to_image(ex)
    key_id = ex["id"]
    target = anchor
    if semantic:
      k_partner = tf.random.experimental.stateless_fold_in(key, _PARTNER_STREAM)
      row = tf.gather(pairs_var, ex["id"] - sepp_offset)
      key_id = sepp.draw_partner(k_partner, row, ex["id"], p_semantic)
      target = get_image(key_id)
    out = {"id": ex["id"], "label": ex["label"], "key_id": key_id}
    if semantic:   # the anchor's mined neighbours: queue positives of objective.loss=multi_positive
      out["neighbors"] = tf.cast(row, tf.int32)
      out["key_label"] = get_label(key_id)   # the key's own class, for the queue's diagnostics
    # One draw for all views. SePP images all have one size, so the anchor's shape serves the
    # views cut from the partner too.
    shape = tf.shape(anchor)
    k_views = tf.random.experimental.stateless_fold_in(key, _VIEWS_STREAM)
    params = augment.sample_views_params(k_views, [view_recipes[kind] for _, kind, _ in views],
                                         shape[0], shape[1])
    boxes = params.pop("box")
    for v, (name, kind, size) in enumerate(views):
      # Local crops are extra online views of the anchor (the key comes from the target image).
      source = anchor if kind == "view1" or kind.startswith("local_") else target
      crop = augment.crop_and_resize(source, boxes[v], size, flip=params["flip"][v],
                                     antialias=antialias)
      if on_device:   # uint8 to the accelerator: 4 x less to copy and transfer than float32
        crop = tf.cast(tf.round(crop * 255.0), tf.uint8)
      out[name] = tf.ensure_shape(crop, [size, size, r.num_channels])
    out["params"] = params
    return out

  @tf.autograph.experimental.do_not_convert
  def per_batch(batch):
    out = {k: batch[k] for k in ("id", "label", "key_id", "key_label", "neighbors") if k in batch}
    params = batch["params"]  # Entries (B, V, ...), views in the order of `views`.
    if on_device:   # uint8 views and their params; augment_jax.DeviceAugment finishes them
      keep = lambda p: {k: p[k] for k in augment_jax.PARAM_KEYS}
      out["aug"] = {}
      for v, (name, kind, _) in enumerate(views):
        if kind != "support":
          out[name] = batch[name]
          out["aug"][name] = keep({k: p[:, v] for k, p in params.items()})
      if num_support:
        out["support"] = tf.stack([batch[f"support_{s}"] for s in range(num_support)], axis=1)
        out["aug"]["support"] = keep({k: p[:, 2:2 + num_support] for k, p in params.items()})
      return out
    for v, (name, kind, _) in enumerate(views):
      if kind == "support":
        continue
      view_params = {k: p[:, v] for k, p in params.items()}
      images = augment.apply_view_params(batch[name], view_params, view_recipes[kind])
      out[name] = augment.normalize(images, r.mean, r.std)
    if num_support:
      # All support views share a recipe: one pass over (B * S) images.
      images = tf.stack([batch[f"support_{s}"] for s in range(num_support)], axis=1)
      flat = tf.reshape(images, [-1, *images.shape[2:]])
      flat_params = {k: tf.reshape(p[:, 2:2 + num_support], [-1, *p.shape[2:]])
                     for k, p in params.items()}
      flat = augment.apply_view_params(flat, flat_params, view_recipes["support"])
      out["support"] = tf.reshape(augment.normalize(flat, r.mean, r.std), images.shape)
    return out

  buffer = int(cfg.shuffle_buffer or 0)
  shuffle_key = tf.random.experimental.stateless_fold_in(base_key, _SHUFFLE_STREAM)

  def stream(source, part):
    """Batches of one part of the split: its examples in the order of (seed, epoch)."""
    local_n = _cardinality(source, f"{r.train_split} (part {part} of {streams})")
    if local_n == 0:
      raise ValueError(f"Part {part} of {streams} of {r.train_split} (process {process_index} "
                       f"of {process_count}) has no examples")
    start_epoch, skip = divmod(int(start_example) // mine, local_n)

    @tf.autograph.experimental.do_not_convert
    def epoch_examples(epoch):
      """Epoch `epoch` of this part: its order depends on (seed, epoch) only."""
      ds = source
      if buffer > 1:
        # One int64 drawn from the (seed, epoch) key (the key's own entries are not hashed).
        epoch_seed = tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(shuffle_key, epoch), minval=None,
            maxval=None, dtype=tf.int64)
        ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
      # Resume inside epoch `start_epoch`: skip what was consumed, before any decoding.
      ds = ds.skip(tf.where(epoch == start_epoch, tf.constant(skip, tf.int64), 0))
      return ds.map(lambda ex: (epoch, ex))

    ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_examples)
    ds = ds.map(per_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size // mine, drop_remainder=True)
    # Per stream, before the concatenation: TF's batched ops round differently for different
    # batch sizes (1e-7), and a stream's rows must not depend on how many streams share a
    # process.
    return ds.map(per_batch, num_parallel_calls=tf.data.AUTOTUNE)

  batches = [stream(source, part) for source, part in zip(sources, parts)]
  if len(batches) == 1:
    ds = batches[0]
  else:   # Rows in part order: this process's block of the global batch.
    ds = tf.data.Dataset.zip(tuple(batches)).map(
        lambda *bs: tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *bs),
        num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.prefetch(cfg.prefetch if cfg.prefetch is not None else tf.data.AUTOTUNE)
  return ds.with_options(options)


def make_train_iterator(data_config, *, batch_size: int, seed: int, process_index=None,
                        process_count=None, start_example: int = 0):
  """`make_train_dataset` as an iterator of NumPy dicts."""
  return iter(tfds.as_numpy(make_train_dataset(
      data_config, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, start_example=start_example)))


def local_train_size(data_config, *, process_index=None, process_count=None) -> int | None:
  """Examples of the train split read by this process per epoch, summed over its streams (None
  if tfds does not know)."""
  r = _resolve(data_config)
  process_index, process_count = _process(process_index, process_count)
  streams = num_streams(data_config, process_count)
  mine = streams // process_count
  if data_config.get("semantic_pairs"):   # sepp.in_memory_source's split of the ids.
    n = datasets.split_size(r.builder, r.train_split)
    sizes = sepp.part_sizes(n, streams) if n else None
  else:
    sizes = datasets.process_sizes(r.builder, r.train_split, streams)
  return sum(sizes[process_index * mine:(process_index + 1) * mine]) if sizes else None


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def make_eval_dataset(data_config, *, batch_size: int, split: str | None = None,
                      process_index=None, process_count=None) -> tf.data.Dataset:
  """This process's part of an evaluation split, every example exactly once.

  Images: resize the shorter side to image_size / eval_crop_ratio, centre crop, normalise.
  Batches are padded (and every process yields the same number of batches, as multi-host
  collectives need): padding has mask False, label -1, id -1 and a zero image.

  Returns:
    Finite dataset of {"image" float32 (B, H, W, C), "label" int32 (B,), "id" int32 (B,),
    "mask" bool (B,)}.
  """
  cfg = data_config
  r = _resolve(cfg)
  process_index, process_count = _process(process_index, process_count)
  split = split or r.eval_split
  datasets.check_split(r.builder, split)
  local = datasets.process_split(split, process_index, process_count)
  options = _options(cfg)
  ds = datasets.read_split(r.builder, r.spec, local, base_split=split, decode=True,
                           options=options)
  sizes = datasets.process_sizes(r.builder, split, process_count)
  local_n = sizes[process_index] if sizes else _cardinality(ds, split)
  largest = max(sizes) if sizes else local_n
  num_batches = -(-largest // batch_size)
  size = r.image_size

  @tf.autograph.experimental.do_not_convert
  def prepare(ex):
    image = augment.convert_channels(ex["image"], r.convert_to)
    image = augment.resize_shorter_and_centre_crop(image, size, r.eval_crop_ratio)
    image = tf.ensure_shape(augment.normalize(image, r.mean, r.std), [size, size, r.num_channels])
    return {"image": image, "label": ex["label"], "id": ex["id"], "mask": tf.constant(True)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  padding = {"image": tf.zeros([size, size, r.num_channels], tf.float32),
             "label": tf.constant(-1, tf.int32), "id": tf.constant(-1, tf.int32),
             "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(
      num_batches * batch_size - local_n))
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(cfg.prefetch if cfg.prefetch is not None else tf.data.AUTOTUNE)
  return ds.with_options(options)


def check_readable(data_config, split: str | None = None) -> None:
  """Raises `errors.DataNotFoundError` (one line: what to prepare, where) when `split` (default:
  the train split) cannot be read, and ValueError when it does not exist. Only opens the reader:
  callers check before the expensive work (building and compiling the model) that would
  otherwise run before the first read fails."""
  r = _resolve(data_config)
  split = split or r.train_split
  datasets.check_split(r.builder, split)
  datasets.read_split(r.builder, r.spec, split, base_split=split, decode=False)


def dataset_info(data_config) -> dict:
  """{"num_train": examples in the train split (None if unknown), "num_classes",
  "image_shape": (image_size, image_size, channels) fed to the model, "source": the tfds dataset
  read (`datasets.source_name`: "fashion_mnist_debian" when `fashion_mnist` falls back)}."""
  r = _resolve(data_config)
  return {"num_train": datasets.split_size(r.builder, r.train_split),
          "num_classes": datasets.num_classes(r.builder, r.spec),
          "image_shape": (r.image_size, r.image_size, r.num_channels),
          "source": datasets.source_name(r.builder)}
