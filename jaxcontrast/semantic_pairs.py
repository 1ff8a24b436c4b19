"""SePP semantic positive pairs: the pairs file format, its I/O, and (below) the miner.

METHODS.md §6: every training image is embedded, and for each image we keep the neighbours whose
cosine similarity is above `threshold` among its `top_k` nearest (itself excluded). The training
pipeline then draws key views from {anchor} U neighbours.

File format (`.npz`, written by `save_pairs`, read and validated by `load_pairs`):

  indices        int32   (N, k)  partner ids (row position in dataset order), -1 = padding
  similarities   float32 (N, k)  cosine similarity of each partner, -inf on padding
  metadata       str     ()      JSON object; always has "format_version", "threshold", "top_k",
                                 "n" and "embedding" (free text, e.g. "pixels" or a checkpoint
                                 path), plus whatever else the writer passed.

Row i lists the partners of image i sorted by decreasing similarity; the valid entries come first
and padding (-1 / -inf) fills the rest, so `indices[i, :count[i]]` are image i's partners. A pair
appears in both rows only when it is mutual (j can be among i's top-k without i being among j's).
We chose -inf (not NaN) for padding so that the rows stay sorted under ordinary comparisons and
`similarities > threshold` is False on padding without special cases.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAD_INDEX = -1
PAD_SIMILARITY = -np.inf
REQUIRED_METADATA = ("threshold", "top_k", "n", "embedding")


@dataclasses.dataclass(frozen=True)
class SemanticPairs:
  """Mined semantic neighbours of N images, at most k per image.

  Attributes:
    indices: int32 (N, k), partner ids in dataset order, -1 on padding.
    similarities: float32 (N, k), cosine similarities, decreasing along each row, -inf on padding.
    metadata: JSON-serialisable description (threshold, top_k, n, embedding, ...).
  """
  indices: np.ndarray
  similarities: np.ndarray
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def n(self) -> int:
    """Number of images (rows)."""
    return int(self.indices.shape[0])

  @property
  def k(self) -> int:
    """Maximum number of partners per image (columns)."""
    return int(self.indices.shape[1])

  @property
  def valid(self) -> np.ndarray:
    """bool (N, k): True where the entry is a real partner, not padding."""
    return self.indices >= 0

  @property
  def counts(self) -> np.ndarray:
    """int (N,): number of partners of each image."""
    return self.valid.sum(axis=1)

  @property
  def num_pairs(self) -> int:
    """Number of (anchor, partner) entries, i.e. directed pairs."""
    return int(self.valid.sum())

  def partners(self, i: int) -> np.ndarray:
    """The partner ids of image `i`, most similar first."""
    row = self.indices[i]
    return row[row >= 0]


def _check_arrays(indices: np.ndarray, similarities: np.ndarray, n: int | None,
                  where: str) -> None:
  """Raises ValueError unless (indices, similarities) follow the file format.

  Checks dtypes, shapes, id range, no self-pairs, padding at the end of each row, finite valid
  similarities, -inf padding and decreasing order. `where` names the source in the messages.
  """
  if indices.dtype != np.int32:
    raise ValueError(f"{where}: 'indices' must be int32, got {indices.dtype}")
  if similarities.dtype != np.float32:
    raise ValueError(f"{where}: 'similarities' must be float32, got {similarities.dtype}")
  if indices.ndim != 2:
    raise ValueError(f"{where}: 'indices' must be 2-D (N, k), got shape {indices.shape}")
  if similarities.shape != indices.shape:
    raise ValueError(f"{where}: 'similarities' shape {similarities.shape} differs from "
                     f"'indices' shape {indices.shape}")
  rows = indices.shape[0]
  if n is not None and n != rows:
    raise ValueError(f"{where}: metadata n={n} but arrays have {rows} rows")
  if indices.size == 0:
    return
  lo, hi = int(indices.min()), int(indices.max())
  if lo < PAD_INDEX or hi >= rows:
    raise ValueError(f"{where}: ids must be in [0, {rows}) or -1 (padding); found range "
                     f"[{lo}, {hi}]")
  valid = indices >= 0
  self_rows = np.nonzero((indices == np.arange(rows, dtype=np.int32)[:, None]).any(axis=1))[0]
  if self_rows.size:
    raise ValueError(f"{where}: image {int(self_rows[0])} lists itself as a partner "
                     f"({self_rows.size} rows do)")
  # Padding only at the end of a row: once invalid, stays invalid.
  if (valid[:, 1:] & ~valid[:, :-1]).any():
    bad = int(np.nonzero((valid[:, 1:] & ~valid[:, :-1]).any(axis=1))[0][0])
    raise ValueError(f"{where}: row {bad} has a partner after padding; padding must come last")
  if not np.isfinite(similarities[valid]).all():
    raise ValueError(f"{where}: similarities of valid partners must be finite")
  if not (similarities[~valid] == PAD_SIMILARITY).all():
    raise ValueError(f"{where}: similarities on padding (index -1) must be -inf")
  if (similarities[:, 1:] > similarities[:, :-1]).any():
    bad = int(np.nonzero((similarities[:, 1:] > similarities[:, :-1]).any(axis=1))[0][0])
    raise ValueError(f"{where}: row {bad} is not sorted by decreasing similarity")


def validate_pairs(pairs: SemanticPairs, where: str = "pairs") -> None:
  """Raises ValueError if `pairs` does not follow the file format (see module docstring)."""
  n = pairs.metadata.get("n") if pairs.metadata else None
  _check_arrays(np.asarray(pairs.indices), np.asarray(pairs.similarities),
                None if n is None else int(n), where)
  top_k = pairs.metadata.get("top_k") if pairs.metadata else None
  if top_k is not None and int(top_k) != pairs.k:
    raise ValueError(f"{where}: metadata top_k={top_k} but arrays have {pairs.k} columns")


PAIRS_FILE = "semantic_pairs.npz"


def _as_path(path):
  """str / PathLike / gs:// -> etils.epath.Path (file:// URIs name local paths)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if isinstance(path, str) and path.startswith("file://"):
    path = path[len("file://"):]
  return epath.Path(path)


def resolve_pairs_path(path):
  """A pairs file, or a workdir holding one (WORKDIR/semantic_pairs.npz, as written by
  `python -m jaxcontrast.semantic_pairs --workdir WORKDIR`); returns an epath.Path."""
  path = _as_path(path)
  if path.is_dir():
    return path / PAIRS_FILE
  return path


def save_pairs(path: str | os.PathLike, pairs: SemanticPairs, **metadata: Any) -> None:
  """Writes `pairs` to `path` (.npz, see the module docstring; etils.epath, so gs:// works),
  validating it first.

  Metadata: `pairs.metadata` updated with the keyword arguments; "n" and "top_k" are filled in
  from the arrays when missing, "threshold" and "embedding" must be given somewhere. Values must be
  JSON-serialisable. The file is written to a temporary name and renamed, so a reader never sees a
  half-written file.
  """
  meta = dict(pairs.metadata or {})
  meta.update(metadata)
  meta.setdefault("n", pairs.n)
  meta.setdefault("top_k", pairs.k)
  meta["format_version"] = FORMAT_VERSION
  missing = [key for key in REQUIRED_METADATA if key not in meta]
  if missing:
    raise ValueError(f"save_pairs: metadata is missing {missing} (pass them as keyword arguments)")
  pairs = SemanticPairs(np.asarray(pairs.indices), np.asarray(pairs.similarities), meta)
  validate_pairs(pairs, "save_pairs")
  try:
    meta_json = json.dumps(meta, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"save_pairs: metadata must be JSON-serialisable: {e}") from e
  path = _as_path(path)
  if path.suffix != ".npz":
    path = path.with_name(path.name + ".npz")  # np.savez would append it anyway.
  buffer = io.BytesIO()
  np.savez(buffer, indices=pairs.indices, similarities=pairs.similarities,
           metadata=np.asarray(meta_json))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name[:-4] + ".tmp.npz")
  tmp.write_bytes(buffer.getvalue())
  tmp.rename(path)


def load_pairs(path: str | os.PathLike) -> SemanticPairs:
  """Reads and validates a pairs file written by `save_pairs` (or WORKDIR/semantic_pairs.npz
  when `path` is a directory). Paths go through etils.epath: gs:// works.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an .npz, missing keys, bad metadata, wrong dtypes or shapes, ids out of range,
      self-pairs, misplaced padding or unsorted rows.
  """
  path = resolve_pairs_path(path)
  where = f"load_pairs({str(path)!r})"
  if not path.exists():
    raise FileNotFoundError(f"{where}: no such file")
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
  except Exception as e:  # zipfile.BadZipFile, pickle refusal, truncated file, ...
    raise ValueError(f"{where}: not a readable .npz pairs file: {e}") from e
  missing = [key for key in ("indices", "similarities", "metadata") if key not in arrays]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}; found {sorted(arrays)}")
  try:
    meta = json.loads(str(arrays["metadata"][()]))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: 'metadata' is not a JSON string: {e}") from e
  if not isinstance(meta, dict):
    raise ValueError(f"{where}: 'metadata' must be a JSON object, got {type(meta).__name__}")
  missing = [key for key in REQUIRED_METADATA if key not in meta]
  if missing:
    raise ValueError(f"{where}: metadata is missing {missing}")
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{where}: format_version {version!r}, this code reads {FORMAT_VERSION}")
  pairs = SemanticPairs(arrays["indices"], arrays["similarities"], meta)
  validate_pairs(pairs, where)
  return pairs


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------


def same_label_rate(pairs: SemanticPairs, labels) -> float:
  """Fraction of valid (anchor, partner) entries whose two images share a label.

  This is METHODS.md §6's quality report for mined pairs: 1.0 means every semantic positive is a
  true positive; chance is sum_c p_c^2 (0.1 on balanced 10-class data). Directed pairs are
  counted, i.e. a mutual pair counts twice. Returns NaN when there are no pairs.
  """
  labels = np.asarray(labels)
  if labels.shape != (pairs.n,):
    raise ValueError(f"labels must have shape ({pairs.n},), got {labels.shape}")
  valid = pairs.valid
  if not valid.any():
    return float("nan")
  anchors = np.broadcast_to(np.arange(pairs.n)[:, None], pairs.indices.shape)[valid]
  partners = pairs.indices[valid]
  return float(np.mean(labels[anchors] == labels[partners]))


def coverage(pairs: SemanticPairs) -> float:
  """Fraction of images with at least one semantic partner (the rest train as plain MoCo)."""
  if pairs.n == 0:
    return float("nan")
  return float(np.mean(pairs.counts > 0))


def pair_stats(pairs: SemanticPairs, labels=None) -> dict[str, float]:
  """Summary numbers for logs and metadata: pairs, coverage, mean partners, same-label rate."""
  stats = {
      "num_pairs": pairs.num_pairs,
      "coverage": coverage(pairs),
      "mean_partners": float(pairs.counts.mean()) if pairs.n else float("nan"),
  }
  if labels is not None:
    stats["same_label_rate"] = same_label_rate(pairs, labels)
    _, class_counts = np.unique(np.asarray(labels), return_counts=True)
    stats["chance_same_label_rate"] = float(np.sum((class_counts / class_counts.sum()) ** 2))
  return stats


# ---------------------------------------------------------------------------------------------
# Mining.
# ---------------------------------------------------------------------------------------------


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Row-wise L2 normalisation in float32 (zero rows stay zero: similarity 0 to everything)."""
  x = np.asarray(x, dtype=np.float32)
  norms = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=1, keepdims=True))
  return (x / np.maximum(norms, eps)).astype(np.float32)


def embed_dataset(embed_fn: Callable[[Any], Any], batches: Iterable[Mapping[str, Any]],
                  ) -> tuple[np.ndarray, np.ndarray | None]:
  """Embeds every image of `batches` with `embed_fn`; returns host (N, D) float32 and labels.

  Args:
    embed_fn: images -> (b, D) embeddings, typically a jitted encoder apply with the parameters
      closed over (centre crop, no augmentation, inference-mode BatchNorm).
    batches: iterable of dicts with "image" and optionally "mask" (bool (b,): False marks padding
      rows of a last, padded batch, which are dropped), "label" and "id" (int (b,): the image's
      position in the dataset; when given, rows are placed by id and the ids must cover 0..N-1
      exactly once, so a shuffled or sharded reader still yields dataset order).

  Returns:
    (embeddings, labels): float32 (N, D) on the host, not normalised; int labels (N,) or None when
    the batches have no "label".
  """
  chunks, label_chunks, id_chunks = [], [], []
  have_labels = have_ids = None
  for batch in batches:
    if "image" not in batch:
      raise ValueError(f"embed_dataset: batch without 'image' (keys {sorted(batch)})")
    out = np.asarray(embed_fn(batch["image"]), dtype=np.float32)
    b = np.shape(batch["image"])[0]
    if out.ndim != 2 or out.shape[0] != b:
      raise ValueError(f"embed_fn must return (b, D) for b={b} images, got {out.shape}")
    keep = np.ones(b, bool) if batch.get("mask") is None else np.asarray(batch["mask"], bool)
    if keep.shape != (b,):
      raise ValueError(f"embed_dataset: 'mask' must have shape ({b},), got {keep.shape}")
    for key, flag in (("label", have_labels), ("id", have_ids)):
      if flag is not None and flag != (batch.get(key) is not None):
        raise ValueError(f"embed_dataset: some batches have '{key}' and some do not")
    have_labels, have_ids = batch.get("label") is not None, batch.get("id") is not None
    chunks.append(out[keep])
    if have_labels:
      label_chunks.append(np.asarray(batch["label"]).reshape(b)[keep])
    if have_ids:
      id_chunks.append(np.asarray(batch["id"]).reshape(b)[keep].astype(np.int64))
  if not chunks:
    raise ValueError("embed_dataset: no batches")
  embeddings = np.concatenate(chunks)
  labels = np.concatenate(label_chunks) if have_labels else None
  if have_ids:
    ids = np.concatenate(id_chunks)
    n = embeddings.shape[0]
    if not np.array_equal(np.sort(ids), np.arange(n)):
      raise ValueError(f"embed_dataset: 'id's must be a permutation of 0..{n - 1} after masking")
    order = np.argsort(ids)
    embeddings = embeddings[order]
    labels = None if labels is None else labels[order]
  return embeddings, labels


@functools.partial(jax.jit, static_argnames=("n", "block_size", "chunk_size", "top_k",
                                             "precision"))
def _topk_block(embeddings: jax.Array, row_start: jax.Array, threshold: jax.Array, *, n: int,
                block_size: int, chunk_size: int, top_k: int, precision: str):
  """Top-k neighbours (self excluded, similarity > threshold) of rows [row_start, +block_size).

  `embeddings` (M, D) is normalised and zero-padded to M >= n rows, M a multiple of `chunk_size`
  and M >= row_start + block_size. A fori_loop walks the column chunks; each step computes a
  (block_size, chunk_size) similarity tile, masks self, padding columns and similarities <=
  threshold to -inf, and merges it with the running (block_size, top_k) best by `lax.top_k` over
  the concatenation. Running entries come first and hold lower ids, and top_k puts the lower
  position first among equal values, so ties resolve to the lower id, as a stable sort of the
  full row would. Peak memory O(block_size * (chunk_size + top_k)): no N x N array exists.

  Masking values <= threshold before the merge does not change the result (they would be dropped
  afterwards anyway) and returns -inf / -1 for them directly.

  Returns:
    (similarities float32 (block_size, top_k), indices int32 (block_size, top_k)), -inf / -1 on
    padding, sorted by decreasing similarity.
  """
  m, d = embeddings.shape
  rows = jax.lax.dynamic_slice(embeddings, (row_start, 0), (block_size, d))
  row_ids = row_start + jnp.arange(block_size, dtype=jnp.int32)

  def merge(c, carry):
    best_sims, best_ids = carry
    col_start = c * chunk_size
    cols = jax.lax.dynamic_slice(embeddings, (col_start, 0), (chunk_size, d))
    col_ids = col_start + jnp.arange(chunk_size, dtype=jnp.int32)
    sims = jnp.dot(rows, cols.T, precision=precision, preferred_element_type=jnp.float32)
    drop = (row_ids[:, None] == col_ids[None, :]) | (col_ids[None, :] >= n) | ~(sims > threshold)
    sims = jnp.where(drop, -jnp.inf, sims)
    cand_sims = jnp.concatenate([best_sims, sims], axis=1)
    cand_ids = jnp.concatenate([best_ids, jnp.broadcast_to(col_ids, sims.shape)], axis=1)
    best_sims, pos = jax.lax.top_k(cand_sims, top_k)
    return best_sims, jnp.take_along_axis(cand_ids, pos, axis=1)

  init = (jnp.full((block_size, top_k), -jnp.inf, jnp.float32),
          jnp.full((block_size, top_k), PAD_INDEX, jnp.int32))
  best_sims, best_ids = jax.lax.fori_loop(0, m // chunk_size, merge, init)
  best_ids = jnp.where(jnp.isfinite(best_sims), best_ids, PAD_INDEX)
  return best_sims, best_ids


def _block_layout(n: int, block_size: int, chunk_size: int) -> tuple[int, int, int]:
  """Clamps block/chunk sizes to n and returns (block_size, chunk_size, padded rows M)."""
  block_size = max(1, min(block_size, n))
  chunk_size = max(1, min(chunk_size, n))
  rows_needed = -(-n // block_size) * block_size
  m = -(-max(rows_needed, n) // chunk_size) * chunk_size
  return block_size, chunk_size, m


def mine_semantic_pairs(embeddings=None, *, embed_fn: Callable[[Any], Any] | None = None,
                        batches: Iterable[Mapping[str, Any]] | None = None, threshold: float,
                        top_k: int, block_size: int = 1024, chunk_size: int | None = None,
                        labels=None, normalize: bool = True, precision: str = "highest",
                        device: jax.Device | None = None,
                        progress: Callable[[dict[str, float]], None] | None = None,
                        log_every_s: float = 10.0, **metadata: Any) -> SemanticPairs:
  """Mines SePP semantic pairs: for each image, its top_k cosine neighbours above threshold.

  Give either `embeddings` (N, D) or `embed_fn` + `batches` (see `embed_dataset`). Embeddings are
  L2-normalised (unless `normalize=False`: then they must be already), put on one device once
  (N x D; fine for the datasets SePP targets), and scanned in row blocks of `block_size` against
  column chunks of `chunk_size` by `_topk_block`, keeping a running top-k: memory
  O(N * D + block_size * (chunk_size + top_k)), never N x N. N need not divide by either size.

  Self is excluded by index, so an exact duplicate of image i is still found (similarity 1).
  Ties resolve to the lower id. Similarities are float32 with `precision` ("highest" by default:
  TPU/GPU default matmul precision would move values across the threshold).

  Args:
    embeddings: float (N, D), host or device; alternative to embed_fn + batches.
    embed_fn: images -> (b, D) encoder apply (jitted), used with `batches`.
    batches: iterable of batch dicts in dataset order ("image", optional "mask"/"label"/"id").
    threshold: keep neighbours with cosine similarity strictly above this.
    top_k: number of nearest neighbours considered per image (the file's k).
    block_size: rows per device call.
    chunk_size: columns per merge step; default block_size.
    labels: optional int (N,) labels; taken from the batches when they carry "label". When
      present, same-label rate and chance rate go into the metadata.
    normalize: L2-normalise rows first.
    precision: matmul precision for the similarity tiles.
    device: where to compute; default jax.devices()[0].
    progress: called after every block with {"done", "total", "images_per_s", "elapsed_s"}.
    log_every_s: also log progress through `logging` at most this often (<= 0: never).
    **metadata: extra JSON-serialisable metadata, e.g. embedding="checkpoint:/path@step".

  Returns:
    SemanticPairs with metadata threshold, top_k, n, dim, block_size, chunk_size, embedding
    (default "unspecified"), the `pair_stats`, and the mining wall time and throughput.
  """
  if (embeddings is None) == (embed_fn is None or batches is None):
    raise ValueError("mine_semantic_pairs: pass either embeddings or embed_fn and batches")
  if embed_fn is not None and embeddings is None:
    start = time.perf_counter()
    embeddings, batch_labels = embed_dataset(embed_fn, batches)
    logger.info("embedded %d images in %.1f s", embeddings.shape[0], time.perf_counter() - start)
    if labels is None:
      labels = batch_labels
  top_k = int(top_k)
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  threshold = float(threshold)
  if np.isnan(threshold):
    raise ValueError("threshold must not be NaN")
  if embeddings.ndim != 2 or embeddings.shape[0] < 1:
    raise ValueError(f"embeddings must be (N, D) with N >= 1, got {embeddings.shape}")
  n, dim = embeddings.shape
  if labels is not None and np.shape(labels) != (n,):
    raise ValueError(f"labels must have shape ({n},), got {np.shape(labels)}")
  host = np.asarray(embeddings, dtype=np.float32)
  if not np.isfinite(host).all():
    raise ValueError("embeddings contain NaN or inf")
  if normalize:
    host = l2_normalize(host)
  block_size, chunk_size, m = _block_layout(n, int(block_size), int(chunk_size or block_size))

  start = time.perf_counter()
  device = device or jax.devices()[0]
  padded = np.zeros((m, dim), np.float32)
  padded[:n] = host
  on_device = jax.device_put(padded, device)
  thr = jax.device_put(np.float32(threshold), device)
  out_sims = np.empty((n, top_k), np.float32)
  out_ids = np.empty((n, top_k), np.int32)
  last_log = start
  kwargs = dict(n=n, block_size=block_size, chunk_size=chunk_size, top_k=top_k,
                precision=precision)
  # Dispatch block r+1 before reading block r back, so the host copy overlaps device work.
  starts = list(range(0, n, block_size))
  pending = _topk_block(on_device, np.int32(starts[0]), thr, **kwargs)
  for i, row_start in enumerate(starts):
    current = pending
    if i + 1 < len(starts):
      pending = _topk_block(on_device, np.int32(starts[i + 1]), thr, **kwargs)
    sims, ids = jax.device_get(current)
    stop = min(row_start + block_size, n)
    out_sims[row_start:stop] = sims[:stop - row_start]
    out_ids[row_start:stop] = ids[:stop - row_start]
    now = time.perf_counter()
    info = {"done": stop, "total": n, "elapsed_s": now - start,
            "images_per_s": stop / max(now - start, 1e-9)}
    if progress is not None:
      progress(info)
    if log_every_s > 0 and (now - last_log >= log_every_s or stop == n):
      last_log = now
      logger.info("mined %d/%d images, %.0f images/s", stop, n, info["images_per_s"])
  elapsed = time.perf_counter() - start

  meta = {"embedding": "unspecified", "dim": int(dim), "block_size": block_size,
          "chunk_size": chunk_size, "precision": precision}
  meta.update(metadata)
  meta.update(threshold=threshold, top_k=top_k, n=int(n), format_version=FORMAT_VERSION,
              mining_seconds=round(elapsed, 3), images_per_s=round(n / max(elapsed, 1e-9), 1))
  pairs = SemanticPairs(out_ids, out_sims, meta)
  meta.update(pair_stats(pairs, labels))
  return pairs


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

DATASETS = ("fashion_mnist",)
EMBEDDINGS = ("pixels", "checkpoint")


def pixel_embed_fn(images) -> jax.Array:
  """Raw-pixel "encoder": (b, H, W, C) uint8 -> (b, H*W*C) float32 in [0, 1].

  The no-checkpoint baseline embedding; jitted like a real encoder apply so the CLI exercises
  the same embed_fn + batches path that checkpoint embeddings will use.
  """
  images = jnp.asarray(images)
  return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0


def numpy_batches(images: np.ndarray, labels: np.ndarray | None = None, batch_size: int = 1024
                  ) -> Iterable[dict[str, np.ndarray]]:
  """Fixed-size batches in dataset order; the last one zero-padded and masked (one compile)."""
  n = images.shape[0]
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    image = images[start:stop]
    mask = np.ones(batch_size, bool)
    if stop - start < batch_size:
      mask[stop - start:] = False
      image = np.concatenate([image, np.zeros((batch_size - (stop - start),) + image.shape[1:],
                                              image.dtype)])
    batch = {"image": image, "mask": mask,
             "id": np.arange(start, start + batch_size) * mask - (~mask)}
    if labels is not None:
      label = np.zeros(batch_size, labels.dtype)
      label[:stop - start] = labels[start:stop]
      batch["label"] = label
    yield batch


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
    from jaxcontrast.checkpoint import workdir_path  # pylint: disable=g-import-not-at-top
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
