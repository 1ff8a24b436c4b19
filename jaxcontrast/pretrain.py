"""The pretraining loop: config -> data -> state -> compiled steps -> logs and checkpoints.

Resumes automatically from the latest checkpoint in `workdir` (Orbax CheckpointManager; every
process takes part in saves). The state, queue included, resumes exactly; the input pipeline is
re-seeded with the resumed step, so the data order after a resume differs from an uninterrupted
run. Metrics are pulled to the host only every `log_every` steps.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxcontrast import train
from jaxcontrast.data import pipeline
from jaxcontrast.optim import make_optimizer
from jaxcontrast.sharding import global_batch_from_local, make_mesh

log = logging.getLogger("jaxcontrast")


def total_steps(config, num_train) -> int:
  if config.get("total_steps"):
    return int(config.total_steps)
  if not num_train:
    raise ValueError("config.total_steps is not set and the train split size is unknown")
  return max(1, int(config.num_epochs * num_train // config.global_batch_size))


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrain per `config`, writing checkpoints and `metrics.jsonl` to `workdir`; returns the
  last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh()
  if config.global_batch_size % jax.process_count():
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  local_batch = config.global_batch_size // jax.process_count()
  info = pipeline.dataset_info(config.data)
  steps = total_steps(config, info["num_train"])
  tx, schedule = make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                                total_steps=steps)
  models = train.build_models(config, mesh)
  sample = jnp.zeros((2,) + tuple(info["image_shape"]), jnp.float32)
  state, shardings = train.create_state(config, models=models, tx=tx, mesh=mesh,
                                        sample_images=sample,
                                        rng=jax.random.key(config.seed))
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                           save_interval_steps=config.get("checkpoint_every", 1000)))
  start = 0
  if manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    start = int(state.step)
    log.info("resumed from step %d", start)
  step_fn = train.jit_train_step(
      train.make_train_step(config, models=models, tx=tx, mesh=mesh, total_steps=steps,
                            base_rng=jax.random.fold_in(jax.random.key(config.seed), 1)),
      mesh=mesh, shardings=shardings)
  data = pipeline.make_train_iterator(config.data, batch_size=local_batch,
                                      seed=config.seed + start)
  keep = ("view1", "view2", "support", "id", "key_id")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  last, t0, done_at_t0 = {}, time.perf_counter(), start
  log.info("training %s for %d steps (global batch %d, %d devices)", config.method, steps,
           config.global_batch_size, jax.device_count())
  for step in range(start, steps):
    batch = next(data)
    batch = global_batch_from_local(mesh, {k: v for k, v in batch.items() if k in keep})
    state, metrics = step_fn(state, batch)
    manager.save(step + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    if (step + 1) % config.log_every == 0 or step + 1 == steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - t0
      last = {k: float(v) for k, v in metrics.items()}
      last.update(step=step + 1, lr=float(schedule(step)),
                  images_per_s=(step + 1 - done_at_t0) * config.global_batch_size / elapsed)
      t0, done_at_t0 = time.perf_counter(), step + 1
      if jax.process_index() == 0:
        log.info("step %d/%d loss %.4f acc %.3f %.1f img/s", step + 1, steps, last["loss"],
                 last.get(f"{config.objective.loss}/acc", float("nan")), last["images_per_s"])
        with open(metrics_path, "a") as f:
          f.write(json.dumps(last) + "\n")
  manager.save(steps, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  return last
