"""Checkpoints of a run: Orbax CheckpointManager over WORKDIR/checkpoints, paths through epath.

Layout (every path through `etils.epath`, so local folders and gs:// behave alike):

  WORKDIR/config.json               the resolved config (process 0, at start)
  WORKDIR/checkpoints/<step>/state  the whole TrainState: params, EMA params, both BN statistics,
                                    optimizer state, queue (keys, ids, labels, ptr, filled), step
  WORKDIR/checkpoints/<step>/data   JSON: where the input stream stood (`data_position`)
  WORKDIR/checkpoints/<step>/config JSON: the resolved config of the run that saved it

A checkpoint is only useful with the config that made it: before any restore, `check_compatible`
compares the saved config's structural keys and the saved array shapes (from Orbax's metadata,
no array is read) with the new run's, and raises a CheckpointError naming the first mismatch,
instead of an Orbax shape traceback. A checkpoint that cannot be read is skipped for the newest
readable one (`Checkpointer.restore_latest`), with a warning naming its step and item.

`load_run(workdir)` rebuilds a trained run (config, state, models) from its workdir alone, for
evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxcontrast.config_check import ConfigError
from jaxcontrast.run import barrier
from jaxcontrast.sharding import DATA_AXIS, make_mesh
from jaxcontrast.step import queue as queue_lib
from jaxcontrast.step import train_step
from jaxcontrast.step.optim import make_optimizer

log = logging.getLogger("jaxcontrast")


class CheckpointError(ConfigError):
  """A checkpoint this run cannot use: it does not fit the config, none is readable, or there is
  none to load. A user's error like a ConfigError (one line, no traceback from the entry points):
  the message names the checkpoint and what to do."""

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
DAMAGED_DIR = "checkpoints_damaged"

# Config keys a checkpoint must agree on (dotted prefixes): the first ones decide which arrays
# the state holds and what they mean; the last ones decide the order of the input stream, which
# resumes at the saved position (a different order there would skip or repeat examples).
# Everything else (learning rate, augmentations, logging, ...) may change on resume. The data
# set is compared as the tfds dataset `data.dataset` resolves to (the data item's
# dataset_source, `pretrain.resume_examples`), not as the name: `fashion_mnist` reads tfds' files
# or the Debian ones depending on data_dir, and `fashion_mnist_debian` / `tfds:fashion_mnist`
# name one of them whatever data_dir holds.
STRUCTURAL_KEYS = ("method", "model", "queue.size", "queue.mode", "queue.store_ids",
                   "objective.loss", "objective.symmetric", "optim.name", "ema.init", "bn.mode",
                   "bn.groups", "bn.target_only",
                   "seed", "data.train_split", "data.shuffle_buffer", "data.semantic_pairs")


def workdir_path(workdir) -> epath.Path:
  """The workdir as an `epath.Path`. Accepts str, `os.PathLike`, `epath.Path`, and `file://`
  URIs (which epath does not know: they name a local path). A relative local path is made
  absolute (Orbax refuses to save under a relative one); gs:// and other URIs are absolute."""
  if isinstance(workdir, str) and workdir.startswith("file://"):
    workdir = workdir[len("file://"):]
  path = epath.Path(workdir)
  return path if path.is_absolute() else path.absolute()


# ---------------------------------------------------------------------------------------------
# Config <-> JSON.
# ---------------------------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  """A JSON-able dict of the config (tuples become lists, placeholders None)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """Inverse of `config_to_dict`; lists become tuples, as the config files write them."""
  return ml_collections.ConfigDict(_tuples(d))


def write_config(workdir, config) -> None:
  """WORKDIR/config.json (process 0 only: one writer per file, also on gs://)."""
  if jax.process_index() != 0:
    return
  path = workdir_path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True))


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _structural(flat: dict) -> dict:
  return {k: v for k, v in flat.items()
          if any(k == p or k.startswith(p + ".") for p in STRUCTURAL_KEYS)}


# ---------------------------------------------------------------------------------------------
# Abstract state.
# ---------------------------------------------------------------------------------------------


def abstract_state(config, *, models, tx, mesh, image_shape) -> tuple[Any, Any]:
  """(state of jax.ShapeDtypeStruct with shardings, shardings) without allocating anything."""
  sample = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  shapes = jax.eval_shape(
      lambda r: train_step.create_state(config, models=models, tx=tx, mesh=mesh,
                                        sample_images=sample, rng=r)[0], jax.random.key(0))
  shardings = train_step.state_shardings(shapes, mesh, config.queue.mode)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


# ---------------------------------------------------------------------------------------------
# The manager.
# ---------------------------------------------------------------------------------------------


# Orbax writes a replicated array "replica-parallel" by default: each replica writes a slice,
# cut by one compiled slice program per array shape. A fresh process (every resume, every
# preemption save after one) compiles them all at its first save: 136 programs for the `:tiny`
# state, over a minute for a 175-array tree on a loaded 2-core CPU, against under 2 s when the
# small arrays are written whole. Only arrays whose slice per replica is at least this many
# bytes are split, so the large kernels of a big model still spread their writes over replicas.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler for the train state (and the probe's): jax.Arrays written
  replica-parallel only above `REPLICA_PARALLEL_MIN_BYTES` per replica; other leaf types as
  Orbax's defaults. The state holds no typed PRNG keys, the one thing Orbax's ArrayMetadata
  files are read back for, so none are written."""
  from orbax.checkpoint import type_handlers  # pylint: disable=g-import-not-at-top
  arrays = type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES, array_metadata_store=None)
  defaults = [(ty, type_handlers.get_type_handler(ty)) for ty in type_handlers.supported_types()
              if ty is not jax.Array]
  return ocp.PyTreeCheckpointHandler(
      type_handler_registry=type_handlers.create_type_handler_registry(
          (jax.Array, arrays), *defaults))


def save_arg(state) -> ocp.args.PyTreeSave:
  return ocp.args.PyTreeSave(state)


def restore_arg(abstract) -> ocp.args.PyTreeRestore:
  """Restores every leaf of `abstract` (ShapeDtypeStructs with shardings) as a jax.Array."""
  return ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class _Unreadable(Exception):
  """An item of a checkpoint could not be read; the message names it."""


def _first_line(error: Exception, limit: int = 300) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return f"{type(error).__name__}: {text[:limit]}"


def _read_item(manager, step: int, name: str, arg):
  """One item of a checkpoint; _Unreadable naming it and Orbax's first line on failure."""
  if not (manager.directory / str(step) / name).exists():
    raise _Unreadable(f"item {name!r} is missing")
  try:
    return manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and TensorStore raise many types (ValueError OUT_OF_RANGE, FileNotFoundError,
    # JSONDecodeError, ...); any of them means this item cannot be used.
    raise _Unreadable(f"item {name!r}: {_first_line(e)}") from e


def _listed(skipped: dict) -> str:
  return "; ".join(f"step {step} ({why})" for step, why in skipped.items())


def _on_every_process(ok: bool) -> bool:
  """`ok` and-ed over the processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: dict
  config: dict


class Checkpointer:
  """Orbax CheckpointManager over WORKDIR/checkpoints with items state / data / config.

  Saves are asynchronous (Orbax writes in a background thread; the next save or `close` waits).
  Every process must call `save` and `restore` (collective).
  """

  def __init__(self, workdir, *, keep: Optional[int] = 2, read_only: bool = False):
    self.directory = workdir_path(workdir) / CHECKPOINT_DIR
    # cleanup_tmp_directories: a killed run can leave a half-written step behind; the resumed
    # run removes it and writes that step again.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    # Handlers named up front: a fresh process can then read the state's metadata (shapes)
    # before any restore, for `check_compatible`.
    handlers = {"state": state_handler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (multi-process runs): True on every process at the same
    step after any of them got a preemption notice (SIGTERM)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, *, data: dict, config) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=save_arg(state), data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config_to_dict(config))), force=True)

  def saved_json(self, step: int) -> tuple[dict, dict]:
    """(data position, config) of a checkpoint; reads no array."""
    r = self._manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return dict(r["data"]), dict(r["config"])

  def check_compatible(self, step: int, config, abstract) -> None:
    """CheckpointError naming the first mismatched config key (both values) or array, if the
    checkpoint at `step` cannot be restored into `abstract` for `config`."""
    where = self.directory / str(step)
    _, saved = self.saved_json(step)
    old = _structural(_flatten(config_to_dict(config_from_dict(saved))))
    new = _structural(_flatten(config_to_dict(config)))
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        raise CheckpointError(
            f"The checkpoint in {where} does not fit this config: {key} = {old.get(key)!r} in "
            f"the checkpoint but {new.get(key)!r} now. Use a fresh --workdir, or set "
            f"--config.{key} to the checkpoint's value.")
    metadata = self._manager.item_metadata(step)["state"]
    if metadata is None:  # Unreadable metadata: leave the shapes to Orbax's restore.
      return
    saved_arrays = ocp.tree.to_flat_dict(metadata)
    wanted = ocp.tree.to_flat_dict(abstract)
    for path in sorted(set(saved_arrays) | set(wanted), key=str):
      name = ".".join(str(p) for p in path)
      if path not in saved_arrays or path not in wanted:
        raise CheckpointError(
            f"The checkpoint in {where} does not fit this config: state array {name} is "
            f"{'missing from' if path not in saved_arrays else 'not in'} the checkpoint's state. "
            "Use a fresh --workdir.")
      a, b = saved_arrays[path], wanted[path]
      if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
        raise CheckpointError(
            f"The checkpoint in {where} does not fit this config: state array {name} has shape "
            f"{tuple(a.shape)} {np.dtype(a.dtype)} in the checkpoint but {tuple(b.shape)} "
            f"{np.dtype(b.dtype)} now. Use a fresh --workdir.")

  def restore(self, step: int, abstract, config=None, *, mesh=None) -> Restored:
    """The checkpoint at `step` restored into `abstract`'s shapes and shardings.

    With `config`, checks compatibility first. A `sharded` queue saved on another number of
    devices is re-blocked for `mesh` (`queue.reblock`): into the rows that run would have
    written them to, when the global batch is the same. CheckpointError when it does not fit
    or an item cannot be read (naming the step and the item).
    """
    try:
      loaded = self._read(step, abstract, config)
    except _Unreadable as e:
      raise CheckpointError(f"The checkpoint in {self.directory / str(step)} cannot be read: "
                            f"{e}") from e.__cause__
    return self._finish(step, loaded, abstract, config, mesh)

  def restore_latest(self, abstract, config=None, *, mesh=None) -> Optional[Restored]:
    """The newest checkpoint that every process can read, restored as by `restore`; None when
    there is none at all.

    A damaged checkpoint (a truncated or missing file, a missing item: what a partial copy
    between buckets or a full disk leaves) is skipped with a warning that names its step and
    item, and the next older one is tried; all processes agree on each attempt (a process may
    fail alone: each reads its own shards), so they resume from the same step. CheckpointError
    when checkpoints exist but none is readable, or the newest does not fit `config` (that is
    the config's fault, not the checkpoint's: no fallback).
    """
    skipped = {}   # step -> why it was skipped
    for step in sorted(self.all_steps(), reverse=True):
      failure = None
      try:
        loaded = self._read(step, abstract, config)
      except _Unreadable as e:
        failure = str(e)
      if not _on_every_process(failure is None):
        skipped[step] = failure or "another process could not read its part"
        log.warning("skipping the damaged checkpoint %s: %s", self.directory / str(step),
                    skipped[step])
        continue
      if skipped:
        aside = self._set_aside(skipped)
        log.warning("resuming from the older checkpoint of step %d; skipped %s (moved to %s: "
                    "the run saves those steps again)", step, _listed(skipped), aside)
      return self._finish(step, loaded, abstract, config, mesh)
    if skipped:
      raise CheckpointError(
          f"No readable checkpoint in {self.directory}: {_listed(skipped)}. Restore a good "
          "copy, or move the checkpoints away to start from scratch.")
    return None

  def _set_aside(self, steps) -> epath.Path:
    """Moves the checkpoints of `steps` to WORKDIR/checkpoints_damaged/ (process 0; every
    process waits for it): Orbax saves no step at or below the newest one it lists, so the
    resumed run could not save until it passed them. Moved, not deleted: a copy may be
    repairable."""
    aside = self.directory.parent / DAMAGED_DIR
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / str(step)
        n = 1
        while target.exists():
          target, n = aside / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
    barrier.wait_for_every_process("jaxcontrast_damaged_checkpoints_moved")
    self._manager.reload()
    return aside

  def _read(self, step: int, abstract, config):
    """(state, data, config dict) of `step`, compatibility checked with `config`; _Unreadable
    naming the item that cannot be read, CheckpointError when it does not fit."""
    items = {}
    for name, arg in (("config", ocp.args.JsonRestore()), ("data", ocp.args.JsonRestore())):
      items[name] = _read_item(self._manager, step, name, arg)
    if config is not None:
      try:
        self.check_compatible(step, config, abstract)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise _Unreadable(f"state metadata: {_first_line(e)}") from e
    state = _read_item(self._manager, step, "state", restore_arg(abstract))
    return state, dict(items["data"]), dict(items["config"])

  def _finish(self, step, loaded, abstract, config, mesh) -> Restored:
    state, data, saved_config = loaded
    saved_devices = data.get("data_devices")
    if (mesh is not None and state.queue is not None and saved_devices
        and saved_config.get("queue", {}).get("mode") == "sharded"
        and saved_devices != mesh.shape[DATA_AXIS]):
      log.info("re-blocking the sharded queue from %d to %d devices", saved_devices,
               mesh.shape[DATA_AXIS])
      # The layout the new device count would have written, when the steps are the same
      # (same global batch); else every key in age order.
      batch = saved_config.get("global_batch_size")
      if config is not None and config.global_batch_size != batch:
        batch = None
      # A gather on the devices into the new shardings: with several processes no host holds
      # the whole queue.
      queue = queue_lib.reblock(
          state.queue, saved_devices, mesh.shape[DATA_AXIS], batch=batch,
          views=queue_lib.views_pushed(saved_config.get("objective", {})),
          out_shardings=jax.tree.map(lambda a: a.sharding, abstract.queue))
      state = state.replace(queue=queue)
    return Restored(step=step, state=state, data=data, config=saved_config)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# ---------------------------------------------------------------------------------------------
# Loading a finished (or running) run for evaluation.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RestoredRun:
  """A run restored from its workdir: the saved config, the step, the state on `mesh`, and the
  flax modules (`models.target.apply({"params": state.ema_params, "batch_stats":
  state.ema_batch_stats}, images, train=False, predict=False)` -> {"features", "projection"})."""
  config: ml_collections.ConfigDict
  step: int
  state: Any
  models: train_step.Models


def load_run(workdir, *, step: Optional[int] = None, mesh=None) -> RestoredRun:
  """The run in `workdir` at `step` (default: the latest checkpoint), state placed on `mesh`
  (default: all devices). Needs only the workdir: the config comes from the checkpoint."""
  ckpt = Checkpointer(workdir, keep=None, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise CheckpointError(f"No checkpoint in {ckpt.directory}: nothing to load (train first, or "
                     "check --workdir).")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"No checkpoint at step {step} in {ckpt.directory}; saved steps: "
                     f"{sorted(steps)}")
  data, saved = ckpt.saved_json(step)
  config = config_from_dict(saved)
  mesh = make_mesh() if mesh is None else mesh
  models = train_step.build_models(config, mesh)
  # The schedule does not shape the optimizer state; `steps_per_epoch` (saved since warm-up
  # could be given in epochs) only keeps make_optimizer's warm-up checks satisfied.
  tx, _ = make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                         total_steps=int(data.get("total_steps") or 1),
                         steps_per_epoch=data.get("steps_per_epoch"))
  image_shape = data.get("image_shape")
  if image_shape is None:
    from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
    image_shape = pipeline.dataset_info(config.data)["image_shape"]
  abstract, _ = abstract_state(config, models=models, tx=tx, mesh=mesh, image_shape=image_shape)
  restored = ckpt.restore(step, abstract, mesh=mesh)
  ckpt.close()
  return RestoredRun(config=config, step=step, state=restored.state, models=models)
