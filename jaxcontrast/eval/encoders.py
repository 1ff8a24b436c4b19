"""What a probe embeds: a run's target or online encoder, or one of the two baselines.

* "target": `models.target` with the EMA parameters and BN statistics (the encoder MoCo
  evaluates); "online": the query encoder. Both come from `checkpoint.load_run`.
* "random": the run's architecture, freshly initialised (seeded): how much of the probe's
  accuracy the pretraining earned.
* "pixels": the normalised input images, flattened.

Every encoder is frozen and run in inference mode (BatchNorm with its running statistics).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxcontrast import errors
from jaxcontrast.eval import features as features_lib
from jaxcontrast.sharding import replicated


@dataclasses.dataclass
class ProbeEncoder:
  """apply_fn(variables, images) -> (B, D); the run's config and checkpoint step."""
  name: str
  apply_fn: features_lib.ApplyFn
  variables: Any
  run_config: ml_collections.ConfigDict
  step: int


def _saved_config(workdir, step):
  """(config, step) of a checkpoint without restoring its arrays."""
  from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise errors.CheckpointNotFoundError(
          f"No checkpoint in {ckpt.directory}: nothing to probe (train first, or check --workdir).")
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise errors.CheckpointNotFoundError(
          f"No checkpoint at step {step} in {ckpt.directory}; saved steps: {sorted(steps)}")
    _, saved = ckpt.saved_json(step)
  finally:
    ckpt.close()
  return checkpoint.config_from_dict(saved), step


def load_probe_encoder(workdir, *, encoder: str, features: str = "backbone", step=None, mesh,
                       seed: int = 0, image_shape=None) -> ProbeEncoder:
  """The frozen encoder `encoder` ("target" | "online" | "random" | "pixels") of the run in
  `workdir` at checkpoint `step` (None = latest). `image_shape` (H, W, C) is needed only by
  "random" (default: from the run's data config)."""
  if encoder in ("target", "online"):
    from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
    run = checkpoint.load_run(workdir, step=step, mesh=mesh)
    state = run.state
    if encoder == "target":
      model = run.models.target
      variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    else:
      model = run.models.online
      variables = {"params": state.params, "batch_stats": state.batch_stats}
    return ProbeEncoder(encoder, features_lib.encoder_apply(model, features), variables,
                        run.config, run.step)
  config, step = _saved_config(workdir, step)
  if encoder == "pixels":
    return ProbeEncoder(encoder, features_lib.pixels_apply, {}, config, step)
  if encoder == "random":
    from jaxcontrast.models import build_encoder  # pylint: disable=g-import-not-at-top
    if image_shape is None:
      from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
      image_shape = pipeline.dataset_info(config.data)["image_shape"]
    model = build_encoder(config.model)
    sample = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, sample, train=False),
                        out_shardings=replicated(mesh))(jax.random.key(seed))
    return ProbeEncoder(encoder, features_lib.encoder_apply(model, features),
                        {"params": variables["params"],
                         "batch_stats": variables.get("batch_stats", {})}, config, step)
  raise ValueError(f"encoder must be 'target', 'online', 'random' or 'pixels', got {encoder!r}")
