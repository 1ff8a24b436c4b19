"""`python -m jaxcontrast.semantic_pairs`: mine SePP's semantic positive pairs into a pairs file.

  python -m jaxcontrast.semantic_pairs --workdir DIR --threshold 0.9 --top_k 10
  python -m jaxcontrast.semantic_pairs --embedding pixels --threshold 0.9 --top_k 10 --out F

The file format: `jaxcontrast/data/pairs.py`; the miner: `jaxcontrast/eval/mining.py`.
"""
from __future__ import annotations

import logging

import jax

from jaxcontrast.data.pairs import PAIRS_FILE, save_pairs
from jaxcontrast.eval.mining import mine_semantic_pairs, numpy_batches, pixel_embed_fn



DATASETS = ("fashion_mnist",)
EMBEDDINGS = ("pixels", "checkpoint")


def _load_dataset(name: str, split: str, limit: int | None):
  if name != "fashion_mnist":
    raise ValueError(f"unknown dataset {name!r}; available: {DATASETS}")
  from jaxcontrast.data.fashion_mnist import load_fashion_mnist_numpy
  images, labels = load_fashion_mnist_numpy(split)
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return images, labels


def _define_flags(flag_values):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Pretraining workdir: mine with its checkpoint's target "
                      "encoder on its data set; pairs go to WORKDIR/semantic_pairs.npz.", **f)
  flags.DEFINE_integer("step", None, "Checkpoint step (--workdir); default the latest.", **f)
  flags.DEFINE_enum("features", "backbone", ["backbone", "projection"],
                    "Target-encoder output used as the embedding (--workdir).", **f)
  flags.DEFINE_enum("dataset", "fashion_mnist", list(DATASETS),
                    "Data set of --embedding pixels without --workdir.", **f)
  flags.DEFINE_string("split", None, "Split to mine (its rows = the SePP run's train split); "
                      "default: the run's train split (--workdir), else 'train'.", **f)
  flags.DEFINE_enum("embedding", None, list(EMBEDDINGS), "pixels: raw L2-normalised pixels; "
                    "checkpoint: the target encoder of --workdir (default with --workdir).", **f)
  flags.DEFINE_string("checkpoint", None, "Same as --workdir (older name).", **f)
  flags.DEFINE_float("threshold", None, "Keep neighbours with cosine similarity strictly above "
                     "this.", **f)
  flags.DEFINE_integer("top_k", None, "Nearest neighbours considered.", **f)
  flags.DEFINE_integer("block_size", 1024, "Rows per device call.", **f)
  flags.DEFINE_integer("chunk_size", None, "Columns per merge step (default block_size).", **f)
  flags.DEFINE_integer("batch_size", 1024, "Embedding batch size.", **f)
  flags.DEFINE_integer("limit", None, "Use the first LIMIT images only (no --workdir).", **f)
  flags.DEFINE_string("out", None, "Output .npz path; default WORKDIR/semantic_pairs.npz.", **f)
  flags.mark_flags_as_required(["threshold", "top_k"], flag_values=flag_values)


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


def main(argv: list[str] | None = None) -> int:
  """`python -m jaxcontrast.semantic_pairs`: mine pairs and write the .npz file.

    python -m jaxcontrast.semantic_pairs --workdir DIR --threshold 0.9 --top_k 10
    python -m jaxcontrast.semantic_pairs --embedding pixels --threshold 0.9 --top_k 10 --out F

  With --workdir, the checkpoint's target encoder embeds the run's train split and the pairs go
  beside the checkpoint (DIR/semantic_pairs.npz), where a SePP config finds them with
  `data.semantic_pairs=DIR`. `argv` excludes the program name; usage errors exit with status 2.
  """
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def usage_error(message: str):
    sys.stderr.write(f"python -m jaxcontrast.semantic_pairs: error: {message}\n")
    raise SystemExit(2)

  argv = sys.argv[1:] if argv is None else list(argv)
  flag_values = flags.FlagValues()
  _define_flags(flag_values)
  try:
    flag_values(["jaxcontrast.semantic_pairs"] + argv)
  except flags.Error as e:
    usage_error(str(e))
  args = flag_values
  workdir = args.workdir or args.checkpoint
  embedding = args.embedding or ("checkpoint" if workdir else "pixels")
  if embedding == "checkpoint" and not workdir:
    usage_error("--embedding checkpoint needs --workdir (the pretraining run's directory)")
  if args.out is None and not workdir:
    usage_error("give --out (or --workdir: pairs go to WORKDIR/semantic_pairs.npz)")
  if workdir and args.limit is not None:
    usage_error("--limit applies without --workdir only; with --workdir use --split "
                "'train[:N]' (the SePP run must then train on the same split)")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  mine = dict(threshold=args.threshold, top_k=args.top_k, block_size=args.block_size,
              chunk_size=args.chunk_size)
  if workdir:
    from jaxcontrast.run.checkpoint import workdir_path  # pylint: disable=g-import-not-at-top
    x, labels, meta = _embed_checkpoint(workdir, step=args.step, split=args.split,
                                        features=args.features, embedding=embedding,
                                        batch_size=args.batch_size)
    pairs = mine_semantic_pairs(x, labels=labels, **mine, **meta)
    out = args.out or str(workdir_path(workdir) / PAIRS_FILE)
  else:
    split = args.split or "train"
    images, labels = _load_dataset(args.dataset, split, args.limit)
    pairs = mine_semantic_pairs(
        embed_fn=jax.jit(pixel_embed_fn), batches=numpy_batches(images, labels, args.batch_size),
        embedding=embedding, dataset=args.dataset, split=split, limit=args.limit, **mine)
    out = args.out
  if jax.process_index() == 0:
    save_pairs(out, pairs)
    m = pairs.metadata
    rate = (f"same-label rate {m['same_label_rate']:.4f} (chance "
            f"{m['chance_same_label_rate']:.4f})" if "same_label_rate" in m
            else "same-label rate n/a (no labels)")
    print(f"{m['n']} images, {m['num_pairs']} pairs, coverage {m['coverage']:.3f}, "
          f"mean partners {m['mean_partners']:.2f}, {rate}, {m['images_per_s']:.0f} images/s "
          f"-> {out}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
