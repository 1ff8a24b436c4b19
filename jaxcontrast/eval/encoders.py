"""Encoders out of a run's checkpoint, for the probe, mining and users' own code.

`load_encoder(workdir)` (also `jaxcontrast.load_encoder`) restores one network's backbone (and,
with `features="projection"`, its projector) from the Orbax checkpoint and nothing else: the
optimizer state, the other network and the queue (for ImageNet's MoCo v2: SGD momentum, the
online network and K 65,536 x 128 keys, several times the encoder) are never read.

What a probe embeds (`load_probe_encoder`):
* "target": the EMA (key) encoder, the one MoCo evaluates; "online": the query encoder. Both
  from `load_encoder`.
* "random": the run's architecture, freshly initialised (seeded): how much of the probe's
  accuracy the pretraining earned.
* "pixels": the normalised input images, flattened.
* "torchvision:PATH": someone else's ResNet weights (a torchvision or MoCo v1/v2 state dict,
  `.safetensors` or `.pth`), converted by `models/torch_weights.py`.

Every encoder is frozen and run in inference mode (BatchNorm with its running statistics).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np

from jaxcontrast import errors
from jaxcontrast.eval import features as features_lib
from jaxcontrast.sharding import replicated

WHICH = ("target", "online")
TORCHVISION_PREFIX = "torchvision:"


@dataclasses.dataclass
class ProbeEncoder:
  """apply_fn(variables, images) -> (B, D); the run's config and checkpoint step."""
  name: str
  apply_fn: features_lib.ApplyFn
  variables: Any
  run_config: ml_collections.ConfigDict
  step: int


class BackboneProjector(nn.Module):
  """Backbone then projector, with `Encoder`'s parameter names: `(B, H, W, C) -> (B, P)`."""
  backbone: nn.Module
  projector: nn.Module

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.projector(self.backbone(x, train=train), train=train).astype(jnp.float32)


@dataclasses.dataclass
class LoadedEncoder:
  """One network of a run, ready to embed images.

  `module.apply(variables, images, train=False)` maps normalised NHWC float images
  `(B, H, W, C)` to features `(B, D)`: pooled backbone features (`features="backbone"`, D = F)
  or the projector's output ("projection", D = P). `mean` / `std` (per channel, [0, 1] pixel
  units) are the normalisation the run trained with: images = (pixels / 255 - mean) / std;
  `encode` applies it. `image_shape` (H, W, C) is what the run fed its model; `config` the run's
  whole config, `step` the checkpoint's step.
  """
  module: nn.Module
  variables: dict
  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_shape: tuple[int, int, int]
  config: ml_collections.ConfigDict
  step: int
  which: str
  features: str

  def encode(self, images) -> jax.Array:
    """Features of `images` in [0, 1] (NHWC, the run's channel count), normalised here."""
    x = (jnp.asarray(images, jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return self.module.apply(self.variables, x, train=False)


def _checkpoint_step(ckpt, step):
  steps = ckpt.all_steps()
  if not steps:
    raise errors.CheckpointNotFoundError(
        f"No checkpoint in {ckpt.directory}: nothing to load (train first, or check --workdir).")
  step = max(steps) if step is None else int(step)
  if step not in steps:
    raise errors.CheckpointNotFoundError(
        f"No checkpoint at step {step} in {ckpt.directory}; saved steps: {sorted(steps)}")
  return step


def saved_run(workdir, step=None) -> tuple[ml_collections.ConfigDict, int, dict]:
  """(config, step, data position) of the checkpoint at `step` (None = latest) of the run in
  `workdir`; reads no array."""
  from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  try:
    step = _checkpoint_step(ckpt, step)
    data, saved = ckpt.saved_json(step)
  finally:
    ckpt.close()
  return checkpoint.config_from_dict(saved), step, data


def encoder_module(model_config, features: str = "backbone") -> nn.Module:
  """The module `load_encoder` returns for a run's model config: its ResNet (backbone) or
  `BackboneProjector`."""
  from jaxcontrast.models import build_encoder  # pylint: disable=g-import-not-at-top
  if features not in features_lib.FEATURES:
    raise ValueError(f"features must be one of {features_lib.FEATURES}, got {features!r}")
  encoder = build_encoder(model_config)
  if features == "backbone":
    return encoder.backbone
  return BackboneProjector(backbone=encoder.backbone, projector=encoder.projector)


def load_encoder(workdir, *, step=None, which: str = "target", features: str = "backbone"
                 ) -> LoadedEncoder:
  """One network of the run in `workdir` (any `etils.epath` path) at checkpoint `step` (None =
  latest): `which` = "target" (the EMA / key encoder, MoCo's evaluation convention) or "online"
  (the query encoder); `features` = "backbone" or "projection" (backbone + projector).

  Restores only that network's parameters and BatchNorm statistics (an Orbax partial restore of
  `[ema_]params` / `[ema_]batch_stats` under "backbone" [and "projector"]); the optimizer state,
  the other network and the queue are not read. Arrays come back as host NumPy arrays.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  config, step, data = saved_run(workdir, step)
  module = encoder_module(config.model, features)
  image_shape = data.get("image_shape")
  if image_shape is None:
    from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
    image_shape = pipeline.dataset_info(config.data)["image_shape"]
  image_shape = tuple(int(d) for d in image_shape)
  abstract = _abstract_variables(module, image_shape)
  # The checkpoint's tree: state.{[ema_]params, [ema_]batch_stats}.{backbone, projector}.
  parts = ("backbone",) if features == "backbone" else ("backbone", "projector")
  prefix = "ema_" if which == "target" else ""
  as_parts = (lambda tree: {"backbone": tree}) if features == "backbone" else (lambda tree: tree)
  item = {}
  for collection in ("params", "batch_stats"):
    tree = {k: v for k, v in as_parts(abstract.get(collection, {})).items() if k in parts}
    if tree:
      item[prefix + collection] = tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  path = checkpoint.workdir_path(workdir) / checkpoint.CHECKPOINT_DIR / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  variables = {}
  for collection in ("params", "batch_stats"):
    tree = restored.get(prefix + collection, {})
    variables[collection] = tree.get("backbone", {}) if features == "backbone" else tree
  from jaxcontrast.data import config as data_config  # pylint: disable=g-import-not-at-top
  mean, std = data_config.normalization(config.data, image_shape[-1])
  return LoadedEncoder(module=module, variables=variables, mean=mean, std=std,
                       image_shape=image_shape, config=config, step=step, which=which,
                       features=features)


@functools.lru_cache(maxsize=64)
def module_apply(module) -> features_lib.ApplyFn:
  """(variables, images) -> module.apply(variables, images, train=False), one function per
  (equal) module so equal encoders share one compiled extractor."""
  def apply(variables, images):
    return module.apply(variables, images, train=False)
  return apply


def torchvision_run_config(state_dict, data_overrides=None) -> ml_collections.ConfigDict:
  """A run-like config for a PyTorch ResNet backbone `state_dict`
  (`torch_weights.read_state_dict`): the model the weights imply
  (`torch_weights.infer_model_config`), the default data settings overridden by
  `data_overrides` (None values ignored), and as many input channels as the weights take."""
  from jaxcontrast.data.config import default_data_config  # pylint: disable=g-import-not-at-top
  from jaxcontrast.models import default_model_config  # pylint: disable=g-import-not-at-top
  from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
  inferred = torch_weights.infer_model_config(state_dict)
  config = ml_collections.ConfigDict({"method": "torchvision"})
  config.model = default_model_config()
  for key in ("arch", "stem", "width", "norm"):
    config.model[key] = inferred[key]
  config.data = default_data_config()
  for key, value in (data_overrides or {}).items():
    if value is not None:
      config.data[key] = value
  if config.data.num_channels is None:
    config.data.num_channels = inferred["in_channels"]
  return config


def torchvision_path(encoder: str) -> str | None:
  """PATH of a probe encoder "torchvision:PATH", else None."""
  if encoder.startswith(TORCHVISION_PREFIX):
    return encoder[len(TORCHVISION_PREFIX):]
  return None


def probe_run_config(workdir, *, encoder: str, step=None, data_overrides=None
                     ) -> tuple[ml_collections.ConfigDict, int | None]:
  """(run config, checkpoint step) behind a probe encoder: the run's saved config, or for
  "torchvision:PATH" the config the weights imply with `data_overrides` (step None)."""
  path = torchvision_path(encoder)
  if path is not None:
    from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
    return torchvision_run_config(torch_weights.read_state_dict(path), data_overrides), None
  config, step, _ = saved_run(workdir, step)
  return config, step


def _abstract_variables(module, image_shape):
  sample = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), sample)


def load_probe_encoder(workdir, *, encoder: str, features: str = "backbone", step=None, mesh,
                       seed: int = 0, image_shape=None, run_config=None) -> ProbeEncoder:
  """The frozen encoder `encoder` ("target" | "online" | "random" | "pixels" |
  "torchvision:PATH") of the run in `workdir` at checkpoint `step` (None = latest), variables
  replicated on `mesh`. `image_shape` (H, W, C) is needed by "random" and "torchvision:PATH"
  (default: from the run's data config); `run_config` (from `probe_run_config`) saves reading
  it again."""
  if encoder in WHICH:
    loaded = load_encoder(workdir, step=step, which=encoder, features=features)
    variables = jax.device_put(loaded.variables, replicated(mesh))
    return ProbeEncoder(encoder, module_apply(loaded.module), variables, loaded.config,
                        loaded.step)
  path = torchvision_path(encoder)
  if run_config is None:
    run_config, step = probe_run_config(workdir, encoder=encoder, step=step)
  elif path is not None:
    step = None
  if encoder == "pixels":
    return ProbeEncoder(encoder, features_lib.pixels_apply, {}, run_config, step)
  if image_shape is None:
    from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
    image_shape = pipeline.dataset_info(run_config.data)["image_shape"]
  if path is not None:
    if features != "backbone":
      raise ValueError(f"encoder {encoder!r}: PyTorch weights hold a backbone only; features "
                       f"must be 'backbone', got {features!r}")
    from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
    module = encoder_module(run_config.model, "backbone")
    variables = torch_weights.from_torchvision(torch_weights.read_state_dict(path),
                                               _abstract_variables(module, image_shape))
    return ProbeEncoder(encoder, module_apply(module),
                        jax.device_put(variables, replicated(mesh)), run_config, step)
  if encoder == "random":
    from jaxcontrast.models import build_encoder  # pylint: disable=g-import-not-at-top
    model = build_encoder(run_config.model)
    sample = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, sample, train=False),
                        out_shardings=replicated(mesh))(jax.random.key(seed))
    return ProbeEncoder(encoder, features_lib.encoder_apply(model, features),
                        {"params": variables["params"],
                         "batch_stats": variables.get("batch_stats", {})}, run_config, step)
  raise ValueError(f"encoder must be 'target', 'online', 'random', 'pixels' or "
                   f"'torchvision:PATH', got {encoder!r}")
