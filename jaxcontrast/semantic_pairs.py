"""`python -m jaxcontrast.semantic_pairs`: mine SePP's semantic positive pairs into a pairs file.

  python -m jaxcontrast.semantic_pairs --workdir DIR --config.threshold=0.9 --config.top_k=10
  python -m jaxcontrast.semantic_pairs --config.embedding=pixels --config.threshold=0.9 \\
      --config.top_k=10 --config.out=F

With --workdir, the checkpoint's target encoder embeds the run's train split and the pairs go
beside the checkpoint (DIR/semantic_pairs.npz), where a SePP config finds them with
`data.semantic_pairs=DIR`. The settings are `default_mining_config()` (`--help` lists them);
a bad key or value is one line and exit status 2. The file format: `jaxcontrast/data/pairs.py`;
the miner: `jaxcontrast/eval/mining.py`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jaxcontrast.config_check import fail, is_int, is_number

DATASETS = ("fashion_mnist",)
EMBEDDINGS = ("pixels", "checkpoint")
FEATURES = ("backbone", "projection")


def default_mining_config() -> ml_collections.ConfigDict:
  """The miner's settings (--config.KEY=VALUE); threshold and top_k have no default."""
  c = ml_collections.ConfigDict()
  c.threshold = config_dict.placeholder(float)  # keep neighbours with cosine > threshold
  c.top_k = config_dict.placeholder(int)        # nearest neighbours considered per image
  # "checkpoint": the target encoder of --workdir (the default with --workdir); "pixels": raw
  # L2-normalised pixels (of `dataset`, or of the run's eval pipeline with --workdir).
  c.embedding = config_dict.placeholder(str)
  c.features = "backbone"           # target-encoder output used as the embedding (--workdir)
  c.step = config_dict.placeholder(int)         # checkpoint step (--workdir); None = the latest
  c.dataset = "fashion_mnist"       # data set without --workdir
  # Split to mine (its rows = the SePP run's train split); None: the run's train split with
  # --workdir, else "train".
  c.split = config_dict.placeholder(str)
  c.limit = config_dict.placeholder(int)        # the first LIMIT images only (no --workdir)
  c.block_size = 1024                           # rows per device call
  c.chunk_size = config_dict.placeholder(int)   # columns per merge step; None = block_size
  c.batch_size = 1024                           # embedding batch size
  c.out = config_dict.placeholder(str)          # output .npz; None = WORKDIR/semantic_pairs.npz
  return c


def validate(c, workdir) -> None:
  """ConfigError naming the first bad key (with the --workdir it is used with)."""
  if not is_number(c.threshold):
    fail("", "threshold", c.threshold, "a cosine similarity, e.g. 0.9 (required)")
  if not is_int(c.top_k) or c.top_k < 1:
    fail("", "top_k", c.top_k, "an int >= 1 (required)")
  if c.embedding is not None and c.embedding not in EMBEDDINGS:
    fail("", "embedding", c.embedding, f"None or one of {EMBEDDINGS}")
  if c.embedding == "checkpoint" and not workdir:
    fail("", "embedding", c.embedding, "'pixels' without --workdir (the run to embed with)")
  if c.features not in FEATURES:
    fail("", "features", c.features, f"one of {FEATURES}")
  if not workdir and c.dataset not in DATASETS:
    fail("", "dataset", c.dataset, f"one of {DATASETS}")
  if not workdir and c.out is None:
    fail("", "out", c.out, "a path (or give --workdir: pairs go to WORKDIR/semantic_pairs.npz)")
  if workdir and c.limit is not None:
    fail("", "limit", c.limit, "None with --workdir (use split='train[:N]'; the SePP run must "
         "then train on the same split)")
  for key in ("block_size", "batch_size"):
    if not is_int(c[key]) or c[key] < 1:
      fail("", key, c[key], "an int >= 1")
  if c.chunk_size is not None and (not is_int(c.chunk_size) or c.chunk_size < 1):
    fail("", "chunk_size", c.chunk_size, "None or an int >= 1")


def _load_dataset(name: str, split: str, limit: int | None):
  from jaxcontrast.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  if name not in DATASETS:
    fail("", "dataset", name, f"one of {DATASETS}")
  images, labels = fashion_mnist.load_fashion_mnist_numpy(split)
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return images, labels


def _embed_checkpoint(workdir, *, step, split, features, embedding, batch_size):
  """Host (N, D) embeddings and labels of `split` (dataset order), the metadata describing them,
  and the split mined. Target encoder (BN in inference mode, centre crop) or the pixels of the
  run's eval pipeline."""
  from jaxcontrast.eval import encoders  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import features as features_lib  # pylint: disable=g-import-not-at-top
  from jaxcontrast.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh()
  enc = encoders.load_probe_encoder(workdir, encoder="target" if embedding == "checkpoint"
                                    else "pixels", features=features, step=step, mesh=mesh)
  data_cfg = enc.run_config.data.copy_and_resolve_references()
  if split is None:
    from jaxcontrast.data import datasets  # pylint: disable=g-import-not-at-top
    split = data_cfg.get("train_split") or datasets.get_spec(data_cfg.dataset).train_split
  extractor = features_lib.FeatureExtractor(enc.apply_fn, mesh=mesh)
  x, labels = extractor.host_features(enc.variables, data_cfg, split=split,
                                      batch_size=batch_size)
  what = f"checkpoint:{workdir}@{enc.step}:target/{features}" if embedding == "checkpoint" \
      else f"pixels:{workdir}"
  labels = None if (labels < 0).all() else labels
  return x, labels, {"embedding": what, "dataset": data_cfg.dataset, "split": split,
                     "step": enc.step}


def mine_to_file(c, workdir=None):
  """Mines with settings `c` (`default_mining_config()`), writes the pairs file (process 0);
  returns (pairs, path)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxcontrast.data.pairs import PAIRS_FILE, save_pairs  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import mining  # pylint: disable=g-import-not-at-top
  validate(c, workdir)
  embedding = c.embedding or ("checkpoint" if workdir else "pixels")
  mine = dict(threshold=c.threshold, top_k=c.top_k, block_size=c.block_size,
              chunk_size=c.chunk_size)
  if workdir:
    from jaxcontrast.run.checkpoint import workdir_path  # pylint: disable=g-import-not-at-top
    x, labels, meta = _embed_checkpoint(workdir, step=c.step, split=c.split,
                                        features=c.features, embedding=embedding,
                                        batch_size=c.batch_size)
    pairs = mining.mine_semantic_pairs(x, labels=labels, **mine, **meta)
    out = c.out or str(workdir_path(workdir) / PAIRS_FILE)
  else:
    split = c.split or "train"
    images, labels = _load_dataset(c.dataset, split, c.limit)
    pairs = mining.mine_semantic_pairs(
        embed_fn=jax.jit(mining.pixel_embed_fn),
        batches=mining.numpy_batches(images, labels, c.batch_size), embedding=embedding,
        dataset=c.dataset, split=split, limit=c.limit, **mine)
    out = c.out
  if jax.process_index() == 0:
    save_pairs(out, pairs)
  return pairs, out


def summary_line(pairs, out) -> str:
  m = pairs.metadata
  rate = (f"same-label rate {m['same_label_rate']:.4f} (chance "
          f"{m['chance_same_label_rate']:.4f})" if "same_label_rate" in m
          else "same-label rate n/a (no labels)")
  return (f"{m['n']} images, {m['num_pairs']} pairs, coverage {m['coverage']:.3f}, "
          f"mean partners {m['mean_partners']:.2f}, {rate}, {m['images_per_s']:.0f} images/s "
          f"-> {out}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Pretraining workdir: mine with its checkpoint's target "
                      "encoder on its data set; pairs go to WORKDIR/semantic_pairs.npz.")


def main(argv) -> None:
  """After `cli.run` parsed the flags: --workdir, --config.KEY=VALUE."""
  del argv
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxcontrast import cli  # pylint: disable=g-import-not-at-top
  validate(flags.FLAGS.config, flags.FLAGS.workdir)
  os.environ.update(cli.quiet_environment())   # before TensorFlow is imported
  pairs, out = mine_to_file(flags.FLAGS.config, flags.FLAGS.workdir)
  if jax.process_index() == 0:
    print(summary_line(pairs, out), flush=True)


if __name__ == "__main__":
  from jaxcontrast import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, config=default_mining_config)
