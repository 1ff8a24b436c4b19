"""The pretraining loop: config -> data -> state -> compiled steps -> logs and checkpoints.

`train_and_evaluate(config, workdir)` resumes from the latest checkpoint in `workdir` if there is
one (after checking that it fits the config), and continues exactly: the whole state (queue,
EMA, BN statistics, optimizer) comes from the checkpoint, the per-step randomness is
`fold_in(key, step)`, and the input stream restarts at the saved position (examples consumed
per process; `pipeline.make_train_dataset(start_example=...)`), so a killed and resumed run ends
bitwise equal to an uninterrupted one (on the same devices) and sees every example once per
epoch.

Per step the host only dispatches: metrics are pulled every `log_every` steps, and non-finite
losses are tracked on the device (the first bad step, one int32) and checked at log, kNN and
save points. A checkpoint is written every `checkpoint_every` steps, at the end and on SIGTERM,
SIGINT or SIGHUP (see `preemption.py`), never of a non-finite state.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcontrast import config_lib
from jaxcontrast.data import pipeline
from jaxcontrast.run import barrier, checkpoint as checkpoint_lib
from jaxcontrast.run.barrier import wait_for_every_process
from jaxcontrast.run import metrics as metrics_lib
from jaxcontrast.run import preemption, progress as progress_lib
from jaxcontrast.sharding import DATA_AXIS, global_batch_from_local, make_mesh, replicated
from jaxcontrast.step import train_step
from jaxcontrast.step.optim import make_optimizer

log = logging.getLogger("jaxcontrast")

# What the train step reads from a batch (interfaces: view1, view2, support, id, key_id, label,
# key_label, neighbors), besides the multi-crop local views "local_i".
BATCH_KEYS = ("view1", "view2", "support", "id", "key_id", "label", "key_label", "neighbors",
              "aug")


def step_inputs(batch: dict) -> dict:
  """The entries of a pipeline batch that the train step reads (BATCH_KEYS and "local_i")."""
  keep = set(BATCH_KEYS) | set(train_step.local_view_names(batch))
  return {k: v for k, v in batch.items() if k in keep}


# Why a multi-process run stopped when this process caught no signal itself.
_NOTICE = "a preemption notice (SIGTERM, here or to another process)"


# How long a process waits at start-up for the others to finish compiling the train step.
COMPILE_WAIT_S = barrier.DEFAULT_TIMEOUT_S


def compile_on_every_process(step_fn, state, batch, *, timeout_s: int = COMPILE_WAIT_S):
  """`step_fn` (jitted) compiled for these arguments; with several processes it returns only
  once every process has compiled it (a barrier of JAX's coordination service, no device
  collective; it fails after `timeout_s`).

  Why: the devices of the processes connect at the first run of a program with collectives,
  and processes whose compile times differ reach it apart (one loads the program from a
  compilation cache while another compiles it, or its host is busier). CPU collectives (gloo)
  wait 30 s for a peer there, then fail the step (`Gloo context initialization failed: ...
  Connect timeout` or `GetKeyValue() timed out`). Compiling first and then waiting takes the
  compile time out of that skew on every backend.
  """
  started = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  log.info("compiled the train step in %.1f s", time.perf_counter() - started)
  wait_for_every_process("jaxcontrast_step_compiled", timeout_s=timeout_s)
  return compiled


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm, or state) became NaN/Inf; nothing non-finite was saved."""


def total_steps(config, num_train) -> int:
  if config.get("total_steps"):
    return int(config.total_steps)
  if not num_train:
    raise ValueError("config.total_steps is not set and the train split size is unknown")
  return max(1, int(config.num_epochs * num_train // config.global_batch_size))


# ---------------------------------------------------------------------------------------------
# Data position.
# ---------------------------------------------------------------------------------------------


def data_position(*, step: int, examples: int, local_batch: int, local_size: Optional[int],
                  streams: int, source: str, **extra) -> dict:
  """The checkpoint's "data" item: where this run's input stream stood after `step` steps.

  examples: examples consumed per process (every process consumes `local_batch` a step);
  examples_per_stream: per input stream (`data.streams`), what a resume on another process
  count with the same streams continues from; epoch / index_in_epoch: of process 0's streams
  (informational); dataset_source: the tfds dataset read (`pipeline.dataset_info`'s "source"),
  which gives the position its meaning.
  """
  per_process = streams // jax.process_count()
  pos = {"step": int(step), "examples_per_process": int(examples),
         "examples_per_stream": int(examples) // per_process, "streams": int(streams),
         "local_batch": int(local_batch), "process_count": jax.process_count(),
         "dataset_source": str(source)}
  if local_size:
    pos.update(epoch=examples // local_size, index_in_epoch=examples % local_size,
               local_examples=int(local_size))
  pos.update(extra)
  return pos


def resume_examples(saved: dict, *, step: int, local_batch: int, streams: int,
                    source: str) -> int:
  """Examples per process already consumed at a checkpoint, checked against this run.

  The split is cut into `streams` parts (`data.streams`), so a position carries over to any
  process count that reads the same streams; a different local batch is fine (each stream
  continues at the same example). The position counts examples of one tfds dataset (`source`,
  `pipeline.dataset_info`'s): `fashion_mnist` resolves to tfds' own files or to the Debian ones
  depending on what `data_dir` holds, and the two order the same images differently, so a
  resume on the other source is refused.
  """
  fields = ("examples_per_stream", "streams", "dataset_source")
  if any(key not in saved for key in fields):
    raise checkpoint_lib.CheckpointError(
        f"The checkpoint at step {step} has no input position (its data item lacks "
        f"{' / '.join(k for k in fields if k not in saved)}): it was not written by this "
        "version. Use a fresh --workdir.")
  if saved["dataset_source"] != source:
    from jaxcontrast.data import specs  # pylint: disable=g-import-not-at-top
    was = saved["dataset_source"]
    raise checkpoint_lib.CheckpointError(
        f"The checkpoint at step {step} was written reading the tfds dataset {was!r}; this run "
        f"resolves data.dataset to {source!r}, which orders its examples differently, so the "
        "saved input position would continue at other examples. Resume on the saved source "
        f"with --config.data.dataset={specs.pinned_name(was)} (a source named so does not "
        "depend on what data.data_dir holds), or start a fresh --workdir.")
  count = saved.get("process_count")
  saved_streams = saved["streams"]
  if saved_streams != streams:
    raise checkpoint_lib.CheckpointError(
        f"The checkpoint at step {step} was written with {saved_streams} input streams "
        f"(data.streams, default one per process: {count} processes), this run has {streams} "
        f"({jax.process_count()} processes): each stream reads its own part of the split, so "
        "the saved input position does not carry over (resuming would skip or repeat examples). "
        f"Resume with --config.data.streams={saved_streams} (a multiple of the process count), "
        "or start a fresh --workdir.")
  examples = int(saved["examples_per_stream"]) * (streams // jax.process_count())
  if saved.get("local_batch") != local_batch:
    log.info("local batch %s -> %d: the input stream continues at example %d of each process",
             saved.get("local_batch"), local_batch, examples)
  return examples


# ---------------------------------------------------------------------------------------------
# On-device checks.
# ---------------------------------------------------------------------------------------------


@jax.jit
def _track_first_bad(first_bad, step, loss, grad_norm):
  """first_bad <- step if it is still -1 and this step's loss or gradient is not finite."""
  bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return jnp.where((first_bad < 0) & bad, step.astype(jnp.int32), first_bad)


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def knn_due(done: int, *, steps: int, every: int) -> bool:
  """Whether the kNN monitor runs after step `done` of `steps`: every `every` steps and at the end.

  A periodic evaluation less than a quarter period before the end is skipped: the final one
  follows within a few steps (3 epochs of 234 steps end at step 703, not 702 and 703).
  """
  if done == steps:
    return True
  return done % every == 0 and steps - done >= every // 4


def _knn_monitor(config, mesh, models):
  """EVAL's kNN monitor (interfaces §3) when `knn_every` > 0 and the dataset has labels."""
  if not config.get("knn_every"):
    return None
  from jaxcontrast.eval.knn import KnnMonitor  # pylint: disable=g-import-not-at-top
  if not KnnMonitor.available(config):
    log.info("knn_every is set but the dataset has no labels: kNN monitor off")
    return None
  return KnnMonitor(config, mesh=mesh, model=models.target)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir) -> dict:
  """Pretrain per `config` in `workdir` (str, `file://` URI, gs://, or epath.Path); resumes
  from its latest checkpoint. Returns the last logged metrics (host floats, with "step")."""
  config_lib.validate_config(config)   # command-line overrides come after load_config's check
  workdir = checkpoint_lib.workdir_path(workdir)
  mesh = make_mesh()
  process_count = jax.process_count()
  if config.global_batch_size % process_count:
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  local_batch = config.global_batch_size // process_count
  streams = pipeline.num_streams(config.data, process_count)
  info = pipeline.dataset_info(config.data)
  # A data set that is not prepared fails here in one line, not after the model has compiled.
  pipeline.check_readable(config.data)
  local_size = pipeline.local_train_size(config.data)
  steps = total_steps(config, info["num_train"])
  log_every = max(1, int(config.log_every))
  checkpoint_every = int(config.get("checkpoint_every") or 0)
  knn_every = int(config.get("knn_every") or 0)
  per_epoch = (info["num_train"] / config.global_batch_size) if info["num_train"] else None
  tx, schedule = make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                                total_steps=steps, steps_per_epoch=per_epoch)
  models = train_step.build_models(config, mesh)
  abstract, shardings = checkpoint_lib.abstract_state(
      config, models=models, tx=tx, mesh=mesh, image_shape=info["image_shape"])

  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 2))
  start, examples = 0, 0
  # Checks the fit first; skips damaged checkpoints, with a warning, for the newest readable one.
  restored = ckpt.restore_latest(abstract, config, mesh=mesh)
  if restored is not None:
    state, start = restored.state, restored.step
    examples = resume_examples(restored.data, step=start, local_batch=local_batch,
                               streams=streams, source=info["source"])
    log.info("resumed from %s at step %d (input: example %d of each process)",
             ckpt.directory / str(start), start, examples)
  else:
    sample = jnp.zeros((2,) + tuple(info["image_shape"]), jnp.float32)
    state, _ = train_step.create_state(config, models=models, tx=tx, mesh=mesh,
                                       sample_images=sample, rng=jax.random.key(config.seed))
    if config.get("init_from"):   # PyTorch ResNet weights for both backbones (fresh runs only)
      from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
      state = torch_weights.init_state_from(state, config.init_from)
      log.info("backbones initialised from %s", config.init_from)
  checkpoint_lib.write_config(workdir, config)
  if start >= steps:  # Already finished: report what it logged last.
    ckpt.close()
    log.info("nothing to do: the checkpoint in %s is at step %d of %d", ckpt.directory, start,
             steps)
    rows = (metrics_lib.read_metrics(workdir)
            if (workdir / metrics_lib.METRICS_FILE).exists() else [])
    return rows[-1] if rows else {}

  augment = (pipeline.device_augment(config.data)
             if pipeline.augment_on(config.data) == "device" else None)
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(config, models=models, tx=tx, mesh=mesh, total_steps=steps,
                                 base_rng=jax.random.fold_in(jax.random.key(config.seed), 1),
                                 augment=augment),
      mesh=mesh, shardings=shardings)
  data = pipeline.make_train_iterator(config.data, batch_size=local_batch, seed=config.seed,
                                      start_example=examples)
  knn = _knn_monitor(config, mesh, models)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  bar = progress_lib.Progress(total=steps, start=start, global_batch=config.global_batch_size,
                              enabled=is_main)
  watcher = preemption.PreemptionWatcher(ckpt)
  position_extra = dict(streams=streams, source=info["source"], seed=int(config.seed),
                        data_devices=int(mesh.shape[DATA_AXIS]), steps_per_epoch=per_epoch,
                        image_shape=list(info["image_shape"]), total_steps=steps)
  # Replicated like the step's outputs (a plain jnp.array would live on one local device).
  first_bad = jax.jit(lambda: jnp.array(-1, jnp.int32), out_shardings=replicated(mesh))()
  last: dict = {}
  log.info("training %s for %d steps from step %d (global batch %d, %d devices, %d processes)",
           config.method, steps, start, config.global_batch_size, jax.device_count(),
           process_count)

  def check_finite(step: int) -> None:
    bad = int(jax.device_get(first_bad))
    if bad >= 0:
      ckpt.wait()
      good = ckpt.latest_step()
      where = (f"step {good} ({ckpt.directory / str(good)})" if good is not None else "none")
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {bad} (checked at step {step}); stopping. "
          f"Last good checkpoint: {where}. Nothing non-finite was saved.")

  try:
    if watcher.begin(start):
      log.warning("stopped by %s during start-up, at step %d: the checkpoint of step %d in %s "
                  "is the latest. Run the same command again to resume.",
                  watcher.signalled or _NOTICE, start, start, ckpt.directory / str(start))
      return last
    batches = (global_batch_from_local(mesh, step_inputs(b)) for b in data)
    first = next(batches)
    run_step = compile_on_every_process(step_fn, state, first)
    # zip stops at the end of the range before it asks for another batch.
    for step, batch in zip(range(start, steps), itertools.chain([first], batches)):
      state, metrics = run_step(state, batch)
      examples += local_batch
      first_bad = _track_first_bad(first_bad, state.step, metrics["loss"], metrics["grad_norm"])
      done = step + 1
      if step == start:  # Leave the first step (its set-up) out of images/s.
        jax.block_until_ready(metrics)
        bar.started(done)
      stop = watcher.reached(done)
      log_now = done % log_every == 0 or done == steps
      knn_now = knn is not None and knn_due(done, steps=steps, every=knn_every)
      save_now = stop or done == steps or (checkpoint_every and done % checkpoint_every == 0)
      if log_now or knn_now or save_now:
        check_finite(done)
      host = {}
      if log_now:
        host = dict(jax.device_get(metrics), lr=float(schedule(step)))
        rate = bar.rate(done)
        if not np.isnan(rate):  # Undefined until a step after the first (compiling) one.
          host["images_per_s"] = rate
        if local_size:
          host["epoch"] = examples / local_size
      if knn_now:
        knn_metrics = knn(state.ema_params, state.ema_batch_stats)
        host.update(knn_metrics)
        if is_main:
          log.info("step %d kNN %s", done, {k: round(float(v), 4) for k, v in knn_metrics.items()})
      if host:  # One line per step in metrics.jsonl.
        last = writer.write(done, host)
      if log_now:
        bar.log(done, last.get("loss"))
      else:
        bar.update(done)
      if save_now:
        if not bool(jax.device_get(_all_finite(state))):
          ckpt.wait()
          raise NonFiniteLossError(
              f"The state at step {done} holds NaN/Inf although every loss so far was finite; "
              f"not saved. Last good checkpoint: step {ckpt.latest_step()}.")
        ckpt.save(done, state, data=data_position(
            step=done, examples=examples, local_batch=local_batch, local_size=local_size,
            **position_extra), config=config)
      if stop:
        ckpt.wait()
        log.warning("stopped by %s, at step %d: saved the checkpoint of step %d in %s. Run "
                    "the same command again to resume.", watcher.signalled or _NOTICE, done,
                    done, ckpt.directory / str(done))
        break
  finally:
    bar.close()
    watcher.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return last
