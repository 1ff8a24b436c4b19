"""kNN monitor (MoCo's CIFAR demo; METHODS.md §7): cosine k-nearest-neighbour weighted vote.

For a query q and a memory of train features m_j with labels y_j (all L2-normalised):

  s_j = <q, m_j>                     cosine similarity, at Precision.HIGHEST
  N   = the k memory rows with the largest s_j
  score_c = sum_{j in N, y_j = c} exp(s_j / T)           (default k = 200, T = 0.1)
  prediction = argmax_c score_c;   top-5: the 5 best classes.

The memory is a global array split on the mesh's `data` axis and never gathered: inside
`jax.shard_map` every device takes the top-k of its own block, the (B, k) candidates of all
devices are gathered (B * k * devices values, not the memory), and a final top-k picks the
global k nearest. This equals the top-k of the full similarity row (up to ties), because each of
the global k nearest is among the k nearest of its own block.
"""
from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from jaxcontrast.eval import features as features_lib
from jaxcontrast.losses import l2_normalize
from jaxcontrast.sharding import DATA_AXIS

log = logging.getLogger("jaxcontrast")
HIGHEST = jax.lax.Precision.HIGHEST


_normalize = jax.jit(l2_normalize)


def _vote(sims, labels, *, temperature: float, num_classes: int) -> jax.Array:
  """score_c = sum over neighbours with label c of exp(s / T); -inf sims (padding) weigh 0."""
  weights = jnp.exp(sims / temperature)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=weights.dtype)
  return jnp.einsum("bk,bkc->bc", weights, one_hot, precision=HIGHEST)


def _local_top_k(queries, memory, labels, valid, k):
  sims = jnp.dot(queries, memory.T, precision=HIGHEST)
  sims = jnp.where(valid[None, :], sims, -jnp.inf)
  top, idx = jax.lax.top_k(sims, min(k, memory.shape[0]))
  return top, labels[idx]


def knn_scores(queries, memory, memory_labels, *, k: int, temperature: float, num_classes: int,
               memory_valid=None, mesh=None) -> jax.Array:
  """Class scores (B, C) of the weighted k-NN vote; see the module docstring.

  Args:
    queries: (B, D) query features (normalised here).
    memory: (M, D) train features, normalised (`l2_normalize`); with `mesh`, split on `data`.
    memory_labels: int (M,) labels of the memory rows.
    k: neighbours (clamped to the memory size).
    temperature: T of the vote weights exp(s / T).
    num_classes: C.
    memory_valid: optional bool (M,), False for padding rows (never neighbours).
    mesh: None: plain computation on the arrays' device(s); a Mesh: the sharded top-k.
  """
  if k < 1 or temperature <= 0:
    raise ValueError(f"knn needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
  if memory.ndim != 2 or queries.ndim != 2 or memory.shape[1] != queries.shape[1]:
    raise ValueError(f"queries (B, D) and memory (M, D) must agree: {queries.shape}, "
                     f"{memory.shape}")
  if memory_valid is None:
    memory_valid = jnp.ones(memory.shape[:1], bool)
  k = min(int(k), memory.shape[0])
  queries = l2_normalize(jnp.asarray(queries, jnp.float32))
  vote = functools.partial(_vote, temperature=temperature, num_classes=num_classes)
  if mesh is None:
    return vote(*_local_top_k(queries, memory, memory_labels, memory_valid, k))

  def sharded(q, m, lab, val):
    sims, labs = _local_top_k(q, m, lab, val, k)
    sims = jax.lax.all_gather(sims, DATA_AXIS, axis=1, tiled=True)   # (B, k * devices)
    labs = jax.lax.all_gather(labs, DATA_AXIS, axis=1, tiled=True)
    top, idx = jax.lax.top_k(sims, k)
    return vote(top, jnp.take_along_axis(labs, idx, axis=1))

  rows = P(DATA_AXIS)
  # After the all_gather every device holds the same candidates and computes the same votes;
  # the type system cannot see that through top_k, hence check_vma=False.
  return jax.shard_map(sharded, mesh=mesh, in_specs=(P(), rows, rows, rows), out_specs=P(),
                       check_vma=False)(
      queries, memory, memory_labels, memory_valid)


def knn_predict(queries, memory, memory_labels, **kwargs) -> jax.Array:
  """int32 (B,) predicted classes (argmax of `knn_scores`, ties to the lower class)."""
  return jnp.argmax(knn_scores(queries, memory, memory_labels, **kwargs), axis=-1)


def topk_correct(scores, labels, ks=(1, 5)) -> dict[int, int]:
  """Number of rows whose label is among the k best scores, for each k (label -1: never).

  On the host, in NumPy: the (B, classes) scores are tiny, and eager jnp ops on mesh-sharded
  arrays run XLA CPU collectives that aborted a test worker once under load."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  order = np.argsort(-scores, axis=-1, kind="stable")
  hits = order == labels[:, None]
  return {k: int(hits[:, :k].any(axis=-1).sum()) for k in ks if k <= scores.shape[-1]}


def knn_top1(queries, query_labels, memory, memory_labels, **kwargs) -> float:
  """Top-1 accuracy (host float) of the k-NN vote for labelled queries."""
  pred = knn_predict(queries, memory, memory_labels, **kwargs)
  return float(jnp.mean(pred == jnp.asarray(query_labels)))


# ---------------------------------------------------------------------------------------------
# The monitor the training loop calls (interfaces §3).
# ---------------------------------------------------------------------------------------------


def _memory_split(config) -> str:
  """The labelled split whose features form the memory: the train split, or "train" for data
  sets whose pretraining split is unlabelled (stl10 "unlabelled")."""
  from jaxcontrast.data import datasets  # pylint: disable=g-import-not-at-top
  spec = datasets.get_spec(config.data.dataset)
  split = config.data.get("train_split") or spec.train_split
  if set(datasets.base_split_names(split)) & set(spec.unlabeled_splits):
    split = "train"
  return split


def limit_split(data_config, split: str, num: int | None) -> str:
  """The first `num` examples of `split` as a tfds split string ("train" -> "train[:num]",
  "train[1000:]" -> "train[1000:1000+num]"); `split` itself when num is None."""
  if num is None:
    return split
  if int(num) < 1:
    raise ValueError(f"knn.num_train must be >= 1 or None, got {num}")
  from jaxcontrast.data import datasets  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = datasets.get_spec(data_config.dataset)
  builder = datasets.get_builder(spec, data_config.get("data_dir"))
  if not datasets.split_names(builder):
    if "[" in split or "+" in split:
      raise ValueError(f"cannot limit split {split!r} of {builder.name} (sizes unknown)")
    return f"{split}[:{int(num)}]"
  inst = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  if len(inst) != 1:
    raise ValueError(f"knn.num_train: split {split!r} has several parts; give one range")
  total = builder.info.splits[inst[0].splitname].num_examples
  start = inst[0].from_ or 0
  stop = inst[0].to if inst[0].to is not None else total
  return f"{inst[0].splitname}[{start}:{min(stop, start + int(num))}]"


class KnnMonitor:
  """kNN top-1/top-5 of the target encoder during training.

  `KnnMonitor(config, mesh=mesh, model=models.target)(params, batch_stats)` embeds the memory
  split (train split, first `knn.num_train` examples) and the eval split with the frozen encoder
  (inference-mode BN, centre crop), keeps the memory on the devices split on `data`, and returns
  host floats {"knn/top1", "knn/top5" (if > 5 classes), "knn/seconds"}. Config keys: `knn.k`,
  `knn.temperature`, `knn.num_train`, `knn.batch_size` and optionally `knn.features`
  ("backbone" default, or "projection").
  """

  def __init__(self, config, *, mesh, model):
    from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
    knn = config.knn
    self.k, self.temperature = int(knn.k), float(knn.temperature)
    self.batch_size = int(knn.batch_size)
    self.mesh = mesh
    self.data_config = config.data
    self.num_classes = pipeline.dataset_info(config.data)["num_classes"]
    if not self.num_classes:
      raise ValueError(f"kNN monitor: dataset {config.data.dataset!r} has no labels")
    self.memory_split = limit_split(config.data, _memory_split(config), knn.get("num_train"))
    self.eval_split = config.data.get("eval_split") or None
    self.extractor = features_lib.FeatureExtractor(
        features_lib.encoder_apply(model, knn.get("features", "backbone")), mesh=mesh)
    self._score = jax.jit(functools.partial(
        knn_scores, k=self.k, temperature=self.temperature, num_classes=self.num_classes,
        mesh=mesh))

  @staticmethod
  def available(config) -> bool:
    """False when `knn_every` is 0 or the data set (or its memory split) has no labels."""
    if not config.get("knn_every"):
      return False
    from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
    try:
      return bool(pipeline.dataset_info(config.data)["num_classes"])
    except (ValueError, FileNotFoundError):
      return False

  def memory(self, variables):
    """(features (M, D) normalised, labels (M,), valid (M,)): global arrays split on `data`."""
    batches = list(self.extractor.device_batches(variables, self.data_config,
                                                 split=self.memory_split,
                                                 batch_size=self.batch_size))
    cat = lambda key: features_lib.concat_sharded([b[key] for b in batches], self.mesh)
    feats = _normalize(cat("features"))
    return feats, cat("label"), cat("mask")

  def __call__(self, params, batch_stats) -> dict[str, float]:
    start = time.perf_counter()
    variables = {"params": params, "batch_stats": batch_stats}
    memory, labels, valid = self.memory(variables)
    correct = {1: 0, 5: 0}
    total = 0
    for batch in self.extractor.device_batches(variables, self.data_config,
                                               split=self.eval_split, batch_size=self.batch_size):
      scores = self._score(batch["features"], memory, labels, memory_valid=valid)
      # The whole batch on every process (a global array spans other hosts' devices): each
      # process counts every row, so all return the same accuracy.
      scores, mask, query_labels = multihost_utils.process_allgather(
          (scores, batch["mask"], batch["label"]), tiled=True)
      mask = np.asarray(mask, bool)
      query_labels = np.where(mask, np.asarray(query_labels), -1)
      for kk, n in topk_correct(scores, query_labels).items():
        correct[kk] += n
      total += int(mask.sum())
    out = {"knn/top1": float(correct[1]) / max(total, 1)}
    if self.num_classes > 5:
      out["knn/top5"] = float(correct[5]) / max(total, 1)
    out["knn/seconds"] = time.perf_counter() - start
    return out
