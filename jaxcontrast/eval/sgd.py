"""The MoCo v2 linear classification protocol: a linear layer on a frozen encoder, trained by SGD.

METHODS.md §7: frozen backbone (BN in inference mode), SGD momentum 0.9, lr 30, weight decay 0,
100 epochs with x0.1 at epochs 60 and 80; train images RandomResizedCrop + flip (the `crop_flip`
recipe's view 1 with `sgd.crop_scale`, torchvision's (0.08, 1) by default), evaluation resize +
centre crop. Every step runs the frozen encoder on the batch (the augmentation changes each
epoch, so features cannot be precomputed) under one `jax.jit` over the mesh, batch split on
`data`, classifier replicated.

Resumable: the classifier, the optimizer state and the step are saved by Orbax in
`checkpoint_dir` (via etils.epath, so gs:// works) every `sgd.checkpoint_every` steps and at the
end; a restart resumes from the latest one and continues the input stream at the same example
(`make_train_dataset(start_example=...)`), so an interrupted run ends where an uninterrupted one
does.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast.sharding import DATA_AXIS, global_batch_from_local

log = logging.getLogger("jaxcontrast")
HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: Any      # {"w": (D, C), "b": (C,)}
  opt_state: Any


def train_data_config(data_config, sgd_config):
  """The run's data config turned into the probe's train stream: crop + flip only, no SePP, no
  support or local views, finished on the host (normalised float32 views)."""
  cfg = data_config.copy_and_resolve_references()
  cfg.unlock()
  cfg.recipe = "crop_flip"
  cfg.view1.crop_scale = tuple(sgd_config.crop_scale)
  cfg.semantic_pairs = None
  cfg.num_support_views = 0
  cfg.local_crop_sizes = ()
  cfg.augment_on = "host"
  return cfg


def make_schedule(sgd_config, steps_per_epoch: int, total_steps: int):
  """lr x drop_factor at each of drop_epochs ("step"), or cosine to 0 over total_steps."""
  lr = float(sgd_config.lr)
  if sgd_config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  boundaries = {int(round(e * steps_per_epoch)): float(sgd_config.drop_factor)
                for e in sgd_config.drop_epochs}
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(sgd_config, schedule) -> optax.GradientTransformation:
  parts = []
  if sgd_config.weight_decay:
    parts.append(optax.add_decayed_weights(float(sgd_config.weight_decay)))
  parts.append(optax.sgd(schedule, momentum=float(sgd_config.momentum)))
  return optax.chain(*parts)


def _logits(params, feats):
  return jnp.dot(feats, params["w"], precision=HIGHEST) + params["b"]


def train_linear_sgd(*, apply_fn, variables, data_config, sgd_config, num_classes: int,
                     num_train: int, mesh, checkpoint_dir, seed: int = 0) -> dict:
  """Trains the linear classifier; returns ({"w", "b"} on the mesh, info dict).

  Args:
    apply_fn: (variables, images) -> (B, D) frozen features.
    variables: the encoder's variables (replicated on the mesh).
    data_config: the run's data config with the probe's splits (train_split = labelled split).
    sgd_config: the probe config's `sgd` section.
    num_classes, num_train: from `dataset_info`.
    checkpoint_dir: folder (str or epath) of this probe's Orbax checkpoints.
  """
  process_count = jax.process_count()
  global_bs = int(sgd_config.batch_size)
  if global_bs % (mesh.devices.size) or global_bs % process_count:
    raise ValueError(f"sgd.batch_size {global_bs} must be divisible by the {mesh.devices.size} "
                     f"devices and {process_count} processes")
  local_bs = global_bs // process_count
  steps_per_epoch = max(1, num_train // global_bs)
  total = int(sgd_config.total_steps or sgd_config.epochs * steps_per_epoch)
  schedule = make_schedule(sgd_config, steps_per_epoch, total)
  tx = make_optimizer(sgd_config, schedule)

  from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
  train_cfg = train_data_config(data_config, sgd_config)
  image_shape = pipeline.dataset_info(train_cfg)["image_shape"]
  feat_dim = jax.eval_shape(apply_fn, variables,
                            jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)).shape[-1]

  def init(rng):
    # MoCo's linear layer: weights N(0, 0.01^2), bias 0.
    params = {"w": 0.01 * jax.random.normal(rng, (feat_dim, num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    return ProbeState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  shapes = jax.eval_shape(init, jax.random.key(seed))
  shardings = jax.tree.map(lambda _: repl, shapes)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))

  def step_fn(state, variables, batch):
    feats = jax.lax.stop_gradient(apply_fn(variables, batch["view1"]).astype(jnp.float32))

    def loss_fn(params):
      logits = _logits(params, feats)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
            {"loss": loss, "acc": acc, "lr": schedule(state.step)})

  step_jit = jax.jit(step_fn, in_shardings=(shardings, repl, rows),
                     out_shardings=(shardings, repl), donate_argnums=0)

  directory = epath.Path(checkpoint_dir)
  from jaxcontrast.run import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True), item_handlers={"state": checkpoint_lib.state_handler()})
  start = 0
  if manager.latest_step() is not None:
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=checkpoint_lib.restore_arg(abstract)))["state"]
    start = int(state.step)
    log.info("linear probe: resumed from step %d in %s", start, directory)

  info = {"total_steps": total, "steps_per_epoch": steps_per_epoch, "resumed_from": start,
          "feature_dim": int(feat_dim)}
  if start < total:
    data = pipeline.make_train_iterator(train_cfg, batch_size=local_bs, seed=seed,
                                        start_example=start * local_bs)
    t0, metrics = time.perf_counter(), None
    every = max(1, int(sgd_config.checkpoint_every))
    for step in range(start, total):
      batch = next(data)
      if np.any(batch["label"] < 0):
        raise ValueError(f"split {train_cfg.train_split!r} has unlabelled examples (label -1)")
      batch = global_batch_from_local(mesh, {"view1": batch["view1"], "label": batch["label"]})
      state, metrics = step_jit(state, variables, batch)
      done = step + 1
      if done % max(1, int(sgd_config.log_every)) == 0 or done == total:
        m = jax.device_get(metrics)
        log.info("linear probe step %d/%d loss %.4f acc %.3f lr %.4g %.1f img/s", done, total,
                 m["loss"], m["acc"], m["lr"], (done - start) * global_bs /
                 (time.perf_counter() - t0))
        info.update(last_loss=float(m["loss"]), last_train_acc=float(m["acc"]))
      if done % every == 0 or done == total:
        manager.save(done, args=ocp.args.Composite(state=checkpoint_lib.save_arg(state)),
                     force=True)
    manager.wait_until_finished()
  manager.close()
  return state.params, info


def classifier_apply(apply_fn):
  """(variables with "probe" = {"w", "b"}, images) -> logits, for `FeatureExtractor`."""
  def apply(variables, images):
    feats = apply_fn(variables["encoder"], images).astype(jnp.float32)
    return _logits(variables["probe"], feats)
  return apply
