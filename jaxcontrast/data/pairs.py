"""SePP semantic positive pairs: the pairs file format, its I/O and statistics.

Written by the miner (`jaxcontrast/eval/mining.py`, CLI `python -m jaxcontrast.semantic_pairs`),
read by the SePP pipeline (`data/sepp.py`).

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
import io
import json
import os
from typing import Any, Mapping

import numpy as np

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
