"""Frozen-encoder features of an evaluation split: global arrays over the mesh, or host arrays.

The eval pipeline (`make_eval_dataset`: resize, centre crop, normalise; padded batches with a
mask) feeds a jitted apply whose inputs and outputs are split on the mesh's `data` axis, as in
training. Two ways out:

* `host_features`: NumPy (N, D) features and labels in dataset order (sorted by example id), on
  every process (`process_allgather`), for the full-batch probe and mining;
* `device_batches`: the global per-batch arrays, left on the devices; `concat_sharded` joins them
  without moving rows between devices (the kNN memory never goes through one device or the host).

An "apply function" maps (variables, images (B, H, W, C)) -> (B, D); `encoder_apply` makes one
from an `Encoder` (BatchNorm in inference mode: `train=False`).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast.sharding import DATA_AXIS, global_batch_from_local

FEATURES = ("backbone", "projection")
ApplyFn = Callable[[Any, jax.Array], jax.Array]


@functools.lru_cache(maxsize=64)
def encoder_apply(model, features: str = "backbone") -> ApplyFn:
  """(variables, images) -> pooled backbone features ("backbone") or projector output.

  BatchNorm uses its running statistics (`train=False`): the probe and the kNN monitor see the
  frozen network, and a batch's features do not depend on the rest of the batch (or padding).
  Cached on (model, features): flax modules compare by value, so equal models (e.g. the same
  run loaded twice) share one function and therefore one compiled extractor.
  """
  if features not in FEATURES:
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
  key = "features" if features == "backbone" else "projection"

  def apply(variables, images):
    return model.apply(variables, images, train=False, predict=False)[key]
  return apply


def pixels_apply(variables, images):
  """The raw-pixel baseline: normalised images flattened to (B, H*W*C)."""
  del variables
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


def global_batch_size(batch_size: int, mesh) -> int:
  """`batch_size` rounded up so every process and every device gets whole rows."""
  devices = mesh.devices.size
  unit = devices * jax.process_count() // np.gcd(devices, jax.process_count())
  return -(-int(batch_size) // unit) * unit


# Evaluation datasets kept for the process's lifetime when the data config sets `cache` (the
# small-data configs): the kNN monitor and the three probes of launch/local.sh then decode and
# prepare each split once, not at every call. Keyed by the whole data config.
_CACHED_EVAL_DATASETS: dict = {}


def eval_dataset(data_config, *, batch_size: int, split: str | None):
  """`pipeline.make_eval_dataset`, held in memory after its first full pass when
  `data_config.cache` is set and the split's images fit in `data_config.in_memory_max_bytes`."""
  from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
  if not data_config.get("cache"):
    return pipeline.make_eval_dataset(data_config, batch_size=batch_size, split=split)
  config_json = json.dumps(data_config.to_dict(), sort_keys=True, default=str)
  key = (config_json, split, batch_size, jax.process_index(), jax.process_count())
  if key not in _CACHED_EVAL_DATASETS:
    ds = pipeline.make_eval_dataset(data_config, batch_size=batch_size, split=split)
    batches = int(ds.cardinality())
    image_bytes = 4 * int(np.prod(ds.element_spec["image"].shape))   # float32, one batch
    limit = int(data_config.get("in_memory_max_bytes") or 0)
    if batches < 0 or batches * image_bytes > limit:
      return ds   # Unknown or too large: stream it every time.
    _CACHED_EVAL_DATASETS[key] = ds.cache()
  return _CACHED_EVAL_DATASETS[key]


@functools.lru_cache(maxsize=64)
def _jitted_run(apply_fn: ApplyFn, mesh):
  """One compiled extractor per (apply function, mesh)."""
  rows = NamedSharding(mesh, P(DATA_AXIS))

  def run(variables, batch):
    out = apply_fn(variables, batch["image"]).astype(jnp.float32)
    return {"features": out, "label": batch["label"], "id": batch["id"], "mask": batch["mask"]}
  return jax.jit(run, out_shardings=rows)


class FeatureExtractor:
  """Runs a frozen apply function over an evaluation split, sharded like training.

  Args:
    apply_fn: (variables, images) -> (B, D); see `encoder_apply`, `pixels_apply`.
    mesh: the device mesh; batches are split on `data`.
  """

  def __init__(self, apply_fn: ApplyFn, *, mesh):
    self.mesh = mesh
    self._run = _jitted_run(apply_fn, mesh)

  def device_batches(self, variables, data_config, *, split: str, batch_size: int
                     ) -> Iterator[dict[str, jax.Array]]:
    """Global arrays per batch: "features" (B, D), "label", "id", "mask" (B,), split on `data`.

    `batch_size` is global (rounded up to whole rows per device); padding rows have mask False.
    """
    global_bs = global_batch_size(batch_size, self.mesh)
    ds = eval_dataset(data_config, batch_size=global_bs // jax.process_count(), split=split)
    for batch in ds.as_numpy_iterator():
      yield self._run(variables, global_batch_from_local(self.mesh, batch))

  def host_features(self, variables, data_config, *, split: str, batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D), labels int32 (N,)) of `split` in dataset order, every process.

    Each batch is gathered from all processes (`process_allgather`), padding dropped, rows sorted
    by example id (ids are positions in the base split, so "train[100:200]" gives ids 100..199).
    """
    feats, labels, ids = [], [], []
    for out in self.device_batches(variables, data_config, split=split, batch_size=batch_size):
      out = multihost_utils.process_allgather(out, tiled=True)
      keep = np.asarray(out["mask"], bool)
      feats.append(np.asarray(out["features"])[keep])
      labels.append(np.asarray(out["label"])[keep])
      ids.append(np.asarray(out["id"])[keep])
    if not feats:
      raise ValueError(f"split {split!r} gave no batches")
    ids = np.concatenate(ids)
    order = np.argsort(ids, kind="stable")
    if np.any(np.diff(ids[order]) == 0):
      raise ValueError(f"split {split!r}: an example id appears twice")
    return np.concatenate(feats)[order], np.concatenate(labels)[order].astype(np.int32)


def concat_sharded(arrays: list[jax.Array], mesh) -> jax.Array:
  """Concatenates arrays split on `data` along axis 0, each device keeping its own rows.

  The result is split on `data` too, but device d's block is [its rows of arrays[0]; its rows of
  arrays[1]; ...]: the global row ORDER differs from a plain concatenation (which would move rows
  between devices). Apply it to features, labels and masks alike and the rows stay aligned.
  """
  if not arrays:
    raise ValueError("concat_sharded: no arrays")
  return _local_concat(mesh)(*arrays)


@functools.lru_cache(maxsize=16)
def _local_concat(mesh):
  spec = P(DATA_AXIS)
  return jax.jit(jax.shard_map(lambda *xs: jnp.concatenate(xs, axis=0), mesh=mesh,
                               in_specs=spec, out_specs=spec))
