"""Optimizer factory: config -> (optax.GradientTransformation, learning-rate schedule).

Optimizers (METHODS.md sections 1-2):
- `sgd`: PyTorch SGD with momentum and *coupled* weight decay: the decay is added to the gradient
  before momentum, `g <- g + wd * p; v <- m * v + g; p <- p - lr * v` (Nesterov optional).
  MoCo v2: lr 0.03 at batch 256, wd 1e-4 on every parameter, cosine schedule.
- `lars`: LARS (You et al. 2017) as in SimCLR/BYOL/SCE: `u = g + wd * p`, trust ratio
  `r = trust_coefficient * ||p|| / (||u|| + eps)` per parameter tensor (1 when either norm is 0),
  `v <- m * v + lr * r * u; p <- p - v` (the learning rate enters the momentum buffer, as in
  `optax.lars`). With `exclude_1d_from_wd`, 1-D parameters (biases, norm scales and offsets) get
  neither weight decay nor the trust ratio (r = 1): for them this is plain momentum SGD. SCE:
  lr 0.3 * B / 256, wd 1e-6, 10 warm-up epochs.
- `adamw`: `optax.adamw` (decoupled decay, multiplied by the learning rate), b1 = `momentum`.

Schedule, with peak lr `P = base_lr * global_batch / 256` (`lr_scaling="linear"`) or `base_lr`
(`"none"`), warm-up W steps (`warmup_steps`, or `floor(warmup_epochs * num_train / global_batch)`),
total T steps, final lr F:
  t < W:  lr(t) = P * t / W                                  (linear warm-up from 0)
  t >= W: lr(t) = F + (P - F) * (1 + cos(pi * min(t - W, T - W) / (T - W))) / 2   (cosine)
          lr(t) = P                                          (constant)
The schedule is a jnp function of the step, evaluated inside the compiled step, built from
optax's schedules (`linear_schedule`, `cosine_decay_schedule`, `join_schedules`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jaxcontrast.config_check import ConfigError, fail, is_number as _number, merge_known
import optax

OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "constant")
LR_SCALINGS = ("linear", "none")
LR_REFERENCE_BATCH = 256


def default_optim_config() -> ml_collections.ConfigDict:
  """MoCo v2 ImageNet optimizer: SGD lr 0.03 (batch 256), momentum 0.9, wd 1e-4, cosine."""
  c = ml_collections.ConfigDict()
  c.name = "sgd"                  # "sgd" | "lars" | "adamw"
  c.base_lr = 0.03                # peak lr at batch 256 ("linear" scaling) or the peak lr itself
  c.lr_scaling = "linear"         # "linear": peak = base_lr * global_batch / 256 | "none"
  c.momentum = 0.9                # SGD / LARS momentum; AdamW b1
  c.nesterov = False              # Nesterov momentum (sgd, lars)
  c.weight_decay = 1e-4           # L2 (sgd, lars: added to the gradient) / decoupled (adamw)
  c.exclude_1d_from_wd = False    # 1-D params (biases, norm scale/offset): no wd; lars: no trust
  #                                 ratio either (True in the SCE / FNC LARS recipes)
  c.warmup_steps = 0              # linear warm-up from 0 to the peak lr over this many steps
  # ... or over this many epochs of the train split, resolved at launch against the split's size
  # and the global batch: W = floor(warmup_epochs * num_train / global_batch). Set one of the two.
  c.warmup_epochs = config_dict.placeholder(float)
  c.schedule = "cosine"           # "cosine" (to final_lr at total_steps) | "constant"
  c.final_lr = 0.0                # lr at the end of the cosine decay (absolute, not scaled)
  c.trust_coefficient = 1e-3      # LARS trust coefficient
  c.eps = 0.0                     # LARS: added to the update norm in the trust ratio
  c.adam_b2 = 0.999               # AdamW second-moment decay
  c.adam_eps = 1e-8               # AdamW epsilon
  return c


def _fail(key: str, value: Any, allowed: str) -> None:
  fail("optim", key, value, allowed)


def resolve_optim_config(optim_config: Any) -> ml_collections.ConfigDict:
  """Defaults overridden by `optim_config` (ConfigDict or dict), validated (`validate`)."""
  c = merge_known(default_optim_config(), optim_config, "optim")
  validate(c)
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first invalid key of a complete optim section."""
  for key, allowed in (("name", OPTIMIZERS), ("schedule", SCHEDULES),
                       ("lr_scaling", LR_SCALINGS)):
    if c[key] not in allowed:
      _fail(key, c[key], f"one of {allowed}")
  for key in ("base_lr", "weight_decay", "final_lr", "trust_coefficient", "eps", "adam_eps"):
    if not _number(c[key]) or c[key] < 0:
      _fail(key, c[key], "a number >= 0")
  for key in ("momentum", "adam_b2"):
    if not _number(c[key]) or not 0 <= c[key] < 1:
      _fail(key, c[key], "a number in [0, 1)")
  for key in ("nesterov", "exclude_1d_from_wd"):
    if not isinstance(c[key], bool):
      _fail(key, c[key], "a bool")
  if not isinstance(c.warmup_steps, int) or isinstance(c.warmup_steps, bool) or (
      c.warmup_steps < 0):
    _fail("warmup_steps", c.warmup_steps, "an int >= 0")
  if c.warmup_epochs is not None:
    if not _number(c.warmup_epochs) or c.warmup_epochs < 0:
      _fail("warmup_epochs", c.warmup_epochs, "None or a number >= 0")
    if c.warmup_steps:
      _fail("warmup_epochs", c.warmup_epochs,
            f"None when warmup_steps is set (warmup_steps={c.warmup_steps}): set one of the two")


def warmup_steps(optim_config: Any, *, steps_per_epoch: float | None) -> int:
  """W in steps: `warmup_steps`, or `floor(warmup_epochs * steps_per_epoch)` when
  `warmup_epochs` is set (steps_per_epoch = train examples / global batch)."""
  return _warmup_steps(resolve_optim_config(optim_config), steps_per_epoch=steps_per_epoch)


def _warmup_steps(c: ml_collections.ConfigDict, *, steps_per_epoch: float | None) -> int:
  if c.warmup_epochs is None:
    return int(c.warmup_steps)
  if steps_per_epoch is None:
    raise ConfigError("config optim.warmup_epochs needs the train split's size (steps_per_epoch); "
                      "the split's size is unknown: set optim.warmup_steps instead")
  # Floor, as the step count of an epoch: 0.1 epoch of 60,000 images at batch 128 is 46 steps.
  return int(math.floor(c.warmup_epochs * steps_per_epoch + 1e-6))


def peak_learning_rate(optim_config: Any, global_batch_size: int) -> float:
  """base_lr * global_batch_size / 256 with linear scaling, else base_lr."""
  return _peak_learning_rate(resolve_optim_config(optim_config), global_batch_size)


def _peak_learning_rate(c: ml_collections.ConfigDict, global_batch_size: int) -> float:
  if c.lr_scaling == "linear":
    return c.base_lr * global_batch_size / LR_REFERENCE_BATCH
  return float(c.base_lr)


def make_schedule(optim_config: Any, *, global_batch_size: int, total_steps: int,
                  steps_per_epoch: float | None = None) -> Callable[[jax.Array], jax.Array]:
  """Learning rate as a traceable function of the step (formula in the module docstring).
  `steps_per_epoch` resolves `warmup_epochs` (see `warmup_steps`)."""
  return _make_schedule(resolve_optim_config(optim_config), global_batch_size=global_batch_size,
                        total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def _make_schedule(c: ml_collections.ConfigDict, *, global_batch_size: int, total_steps: int,
                   steps_per_epoch: float | None) -> Callable[[jax.Array], jax.Array]:
  if not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
  warmup = _warmup_steps(c, steps_per_epoch=steps_per_epoch)
  if warmup > total_steps:
    key = "warmup_steps" if c.warmup_epochs is None else "warmup_epochs"
    _fail(key, c[key], f"at most the run: {warmup} warm-up steps > total_steps ({total_steps})")
  peak = _peak_learning_rate(c, global_batch_size)
  final = float(c.final_lr)
  decay_steps = total_steps - warmup
  if c.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif decay_steps > 0:
    # F + (P - F) * cosine: written with the offset rather than optax's `alpha = F / P`, which
    # has no value for P = 0.
    cosine = optax.cosine_decay_schedule(peak - final, decay_steps)
    after = lambda t: final + cosine(t)
  else:  # All steps are warm-up: the decay is empty.
    after = optax.constant_schedule(final)
  schedule = after if warmup == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), after], [warmup])
  return lambda step: jnp.asarray(schedule(step), jnp.float32)


def _not_1d_mask(params):
  """True for parameters with more than one dimension (kernels), False for biases/scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(optim_config: Any, *, global_batch_size: int, total_steps: int,
                   steps_per_epoch: float | None = None
                   ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """Returns `(tx, schedule)`: the optax transformation and its learning-rate schedule.

  Args:
    optim_config: ConfigDict/dict with `default_optim_config()`'s keys (missing keys default).
    global_batch_size: batch size summed over all devices (for linear lr scaling).
    total_steps: length of the run in optimizer steps (end of the cosine).
    steps_per_epoch: train examples / global batch; needed when `warmup_epochs` is set.
  """
  c = resolve_optim_config(optim_config)   # the only time: the helpers take it resolved
  schedule = _make_schedule(c, global_batch_size=global_batch_size, total_steps=total_steps,
                            steps_per_epoch=steps_per_epoch)
  mask = _not_1d_mask if c.exclude_1d_from_wd else None
  if c.name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(c.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=c.momentum or None, nesterov=c.nesterov))
  elif c.name == "lars":
    tx = optax.lars(
        schedule, weight_decay=c.weight_decay, weight_decay_mask=mask or True,
        trust_coefficient=c.trust_coefficient, eps=c.eps, trust_ratio_mask=mask or True,
        momentum=c.momentum, nesterov=c.nesterov)
  else:
    tx = optax.adamw(schedule, b1=c.momentum, b2=c.adam_b2, eps=c.adam_eps,
                     weight_decay=c.weight_decay, mask=mask)
  return tx, schedule
