"""Target-network EMA: the momentum schedule (computed from `step` inside the compiled update,
as in DeepMind's BYOL) and the parameter average."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxcontrast.config_check import fail

SCHEDULES = ("constant", "cosine")


def default_ema_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.momentum = 0.99           # m_0: MoCo 0.999 (ImageNet), 0.99 (CIFAR); SCE 0.99 -> 1 (cosine)
  c.schedule = "constant"     # "constant" | "cosine": m_t = 1 - (1 - m_0)(cos(pi t / T) + 1) / 2
  c.init = "copy"             # "copy" (MoCo: target starts as the online net) | "independent"
  # When the EMA step happens. (Not "update": that would shadow ConfigDict.update.)
  c.update_at = "before_keys"  # "before_keys" (MoCo v2) | "after_step" (SCE, FNC)
  return c


def validate(ema: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first invalid key of the `ema` section."""
  if not 0.0 <= ema.momentum <= 1.0:
    fail("ema", "momentum", ema.momentum, "a number in [0, 1]")
  for key, allowed in (("schedule", SCHEDULES), ("init", ("copy", "independent")),
                       ("update_at", ("before_keys", "after_step"))):
    if ema[key] not in allowed:
      fail("ema", key, ema[key], f"one of {allowed}")


def momentum(step, *, base: float, schedule: str, total_steps: int):
  """m_t. Cosine: `1 - (1 - m_0) (cos(pi t / T) + 1) / 2` with T = total_steps (BYOL, SCE): m_0
  at the first step (t = 0), just below 1 at the last (t = T - 1), 1 from t = T on."""
  if schedule == "constant":
    return jnp.asarray(base, jnp.float32)
  t = jnp.asarray(step, jnp.float32)
  horizon = max(total_steps, 1)
  cos = jnp.cos(jnp.pi * jnp.minimum(t, horizon) / horizon)
  return 1.0 - (1.0 - base) * (cos + 1.0) / 2.0


def update(target, online, m):
  """theta_k <- m * theta_k + (1 - m) * theta_q, leaf by leaf."""
  return jax.tree.map(lambda t, o: m * t + (1.0 - m) * o, target, online)
