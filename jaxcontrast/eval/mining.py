"""SePP's miner: embed every training image, then keep each image's neighbours with cosine
similarity above `threshold` among its `top_k` nearest (itself excluded), blockwise on the
devices (METHODS.md section 6). Writes `data.pairs.SemanticPairs`; the command line is
`python -m jaxcontrast.semantic_pairs`.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcontrast.data.pairs import FORMAT_VERSION, PAD_INDEX, SemanticPairs, pair_stats
from jaxcontrast.losses import l2_normalize

logger = logging.getLogger(__name__)


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
  block_size, chunk_size, m = _block_layout(n, int(block_size), int(chunk_size or block_size))

  start = time.perf_counter()
  device = device or jax.devices()[0]
  padded = np.zeros((m, dim), np.float32)
  padded[:n] = host
  on_device = jax.device_put(padded, device)
  if normalize:  # on the device; the zero padding rows stay zero (similarity 0 to everything)
    on_device = jax.jit(l2_normalize)(on_device)
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
