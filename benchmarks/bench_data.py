"""Training-pipeline throughput (images/s, two MoCo v2 views per image) on this host.

Not a test: prints numbers, never fails on timing. Cases:

* Fashion-MNIST, real files through our tfds builder, crops of 28 and 32 pixels.
* ImageNet-shaped data: tfds mock of imagenet2012 whose examples are JPEGs of 224 x 224 and of
  375 x 500 (about ImageNet's average, so decoding costs what it costs on the real data), cut
  into 224 crops. Also the decode-only rate of the same data, to split the cost between
  decoding and augmentation.
* `--only augment`: the host side of `data.augment_on` = host / device for the MoCo v2 and SCE
  ImageNet recipes on both JPEG sizes, in images/s and per core (with `device`, tf.data stops
  after crop, resize and flip and ships uint8 views; the photometric ops run in the train step).

Usage:
  .venv/bin/python benchmarks/bench_data.py [--batch_size 256] [--steps 20] [--data_dir DIR]
      [--only fashion|imagenet|augment]
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
from jaxcontrast.data.config import default_data_config  # pylint: disable=g-import-not-at-top

_JPEG_SHAPES = ((224, 224, 3), (375, 500, 3))
_NUM_JPEGS = 64


def _throughput(ds, batch_size, warmup, steps):
  """Images per second after `warmup` batches."""
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  np.asarray(batch["view1"] if "view1" in batch else batch["image"])  # Wait for the last one.
  return steps * batch_size / (time.perf_counter() - start)


def _fake_jpegs(shape):
  """Smooth random colour images, JPEG-encoded (quality 90), shared by all mock examples."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(_NUM_JPEGS):
    low = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
    image = tf.image.resize(low[None], shape[:2], method="bicubic")[0]
    image += rng.normal(0, 8, shape).astype(np.float32)
    out.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90))
  return tf.stack(out)


def _mock_imagenet_as_dataset(num_examples, shape):
  """A tfds `_as_dataset` replacement yielding JPEG ImageNet examples of `shape`."""
  jpegs = _fake_jpegs(shape)

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del split, shuffle_files
    ds = tf.data.Dataset.range(num_examples)

    def make(i):
      ex = {"image": jpegs[i % _NUM_JPEGS], "label": i % 1000,
            "file_name": tf.strings.as_string(i)}
      if not decoders:  # tfds decodes unless the image decoding is skipped.
        ex["image"] = self.info.features["image"].decode_example(ex["image"])
      if read_config and read_config.add_tfds_id:
        ex["tfds_id"] = tf.strings.join(
            ["imagenet2012-train.tfrecord-00000-of-00001__", tf.strings.as_string(i)])
      return ex

    return ds.map(make).apply(tf.data.experimental.assert_cardinality(num_examples))

  return as_dataset


def bench_fashion(args):
  for size in (28, 32):
    cfg = default_data_config()
    cfg.data_dir = args.data_dir
    cfg.image_size = size
    ds = pipeline.make_train_dataset(cfg, batch_size=args.batch_size, seed=0, process_index=0,
                                     process_count=1)
    rate = _throughput(ds, args.batch_size, args.warmup, args.steps)
    print(f"fashion_mnist  28 -> {size:<3d} mocov2, 2 views        {rate:10.0f} images/s")
    cfg.cache = True
    ds = pipeline.make_train_dataset(cfg, batch_size=args.batch_size, seed=0, process_index=0,
                                     process_count=1)
    rate = _throughput(ds, args.batch_size, args.warmup + 60_000 // args.batch_size, args.steps)
    print(f"fashion_mnist  28 -> {size:<3d} mocov2, cache=True     {rate:10.0f} images/s")


def bench_imagenet(args):
  # Several batches are in flight in tf.data, so a short run overstates the steady rate (5
  # batches read 221 images/s where 30 read 94): time as many batches as for Fashion-MNIST.
  steps = args.steps
  for shape in _JPEG_SHAPES:
    source = f"{shape[0]}x{shape[1]}"
    with tfds.testing.mock_data(as_dataset_fn=_mock_imagenet_as_dataset(100_000, shape)):
      cfg = default_data_config()
      cfg.dataset = "imagenet2012"
      cfg.shuffle_buffer = 1000
      builder = tfds.builder("imagenet2012")
      decode = builder.as_dataset(split="train").map(
          lambda ex: tf.shape(ex["image"]), num_parallel_calls=tf.data.AUTOTUNE)
      decode = decode.batch(args.batch_size).map(lambda s: {"image": s})
      rate = _throughput(decode, args.batch_size, 2, steps)
      print(f"imagenet-like  JPEG {source:<7s} decode only        {rate:10.0f} images/s")
      ds = pipeline.make_train_dataset(cfg, batch_size=args.batch_size, seed=0,
                                       process_index=0, process_count=1)
      rate = _throughput(ds, args.batch_size, 4, steps)
      print(f"imagenet-like  JPEG {source:<7s} -> 224 mocov2, 2 views {rate:10.0f} images/s")
      cfg.antialias = False  # The antialiased shrink of large crops is the costly step.
      ds = pipeline.make_train_dataset(cfg, batch_size=args.batch_size, seed=0,
                                       process_index=0, process_count=1)
      rate = _throughput(ds, args.batch_size, 4, steps)
      print(f"imagenet-like  JPEG {source:<7s} -> 224 antialias=False  {rate:10.0f} images/s")


def bench_augment(args):
  cores = os.cpu_count()
  for shape in _JPEG_SHAPES:
    source = f"{shape[0]}x{shape[1]}"
    with tfds.testing.mock_data(as_dataset_fn=_mock_imagenet_as_dataset(100_000, shape)):
      for recipe in ("mocov2", "sce_imagenet"):
        rates = {}
        for where in ("host", "device"):
          cfg = default_data_config()
          cfg.update(dataset="imagenet2012", shuffle_buffer=1000, recipe=recipe,
                     augment_on=where)
          ds = pipeline.make_train_dataset(cfg, batch_size=args.batch_size, seed=0,
                                           process_index=0, process_count=1)
          rates[where] = _throughput(ds, args.batch_size, 4, args.steps)
          print(f"imagenet-like  JPEG {source:<7s} -> 224 {recipe:<12s} augment_on={where:<6s} "
                f"{rates[where]:8.0f} images/s  {rates[where] / cores:8.0f} per core", flush=True)
        print(f"imagenet-like  JPEG {source:<7s} -> 224 {recipe:<12s} device / host "
              f"{rates['device'] / rates['host']:.2f}x", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--data_dir", default=None,
                      help="tfds data_dir for Fashion-MNIST (default: a temporary folder)")
  parser.add_argument("--only", choices=("fashion", "imagenet", "augment"), default=None,
                      help="run one section (default: fashion and imagenet)")
  args = parser.parse_args()
  tmp = None
  if args.data_dir is None:
    tmp = tempfile.TemporaryDirectory()
    args.data_dir = tmp.name
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"host: {os.cpu_count()} CPU cores (load average {load} before start), batch "
        f"{args.batch_size}, tf {tf.__version__}")
  sections = {"fashion": bench_fashion, "imagenet": bench_imagenet, "augment": bench_augment}
  for name in [args.only] if args.only else ["fashion", "imagenet"]:
    sections[name](args)
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
