"""Tests for jaxcontrast.step.optim: schedule values, SGD/LARS/AdamW updates against NumPy
references.

The references are written from the formulas (PyTorch SGD, LARS as in SimCLR/BYOL), not from
optax, so a wrong chain order, a missing mask or a wrong scaling fails them.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcontrast.step import optim

WD = 0.1
MOMENTUM = 0.9


def _params_and_grads(steps=3, seed=0):
  rng = np.random.default_rng(seed)
  params = {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(steps)]
  return params, grads


def _run(tx, params, grads):
  """Applies `tx` to the gradient sequence; returns the parameter trajectory (float64 numpy)."""
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g), state, p)
    p = optax.apply_updates(p, u)
    out.append(jax.tree.map(lambda a: np.asarray(a, np.float64), p))
  return out


def _assert_traj_close(got, want, rtol=1e-5):
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------- schedule


def test_warmup_cosine_schedule_values():
  # peak = 0.3 * 512 / 256 = 0.6; 10 warm-up steps; cosine to 0.01 at step 110.
  cfg = dict(base_lr=0.3, warmup_steps=10, final_lr=0.01)
  _, sched = optim.make_optimizer(cfg, global_batch_size=512, total_steps=110)
  expected = {0: 0.0, 5: 0.3, 10: 0.6, 35: 0.01 + 0.59 * (1 + math.sqrt(0.5)) / 2,
              60: 0.305, 85: 0.01 + 0.59 * (1 - math.sqrt(0.5)) / 2, 110: 0.01, 150: 0.01}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-5, atol=1e-7, err_msg=str(step))
  # Traceable: the same values inside jit from a traced step.
  steps = jnp.array(list(expected))
  np.testing.assert_allclose(jax.jit(jax.vmap(sched))(steps), list(expected.values()),
                             rtol=1e-5, atol=1e-7)


def test_constant_schedule_and_no_lr_scaling():
  cfg = dict(base_lr=0.06, lr_scaling="none", schedule="constant", warmup_steps=4)
  _, sched = optim.make_optimizer(cfg, global_batch_size=512, total_steps=100)
  for step, lr in {0: 0.0, 1: 0.015, 3: 0.045, 4: 0.06, 99: 0.06}.items():
    np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6)


def test_warmup_in_epochs_is_resolved_against_the_epoch_length():
  # 2 epochs of 10,000 images at batch 256: floor(2 * 39.0625) = 78 warm-up steps.
  cfg = dict(base_lr=0.3, lr_scaling="none", schedule="constant", warmup_epochs=2)
  assert optim.warmup_steps(cfg, steps_per_epoch=10_000 / 256) == 78
  _, sched = optim.make_optimizer(cfg, global_batch_size=256, total_steps=500,
                                  steps_per_epoch=10_000 / 256)
  for step, lr in {0: 0.0, 39: 0.15, 78: 0.3, 400: 0.3}.items():
    np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6, err_msg=str(step))
  # 0.1 epoch of 60,000 at batch 128 = 46 steps, as an epoch's integer step count.
  assert optim.warmup_steps(dict(warmup_epochs=0.1), steps_per_epoch=60_000 / 128) == 46
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.make_optimizer(cfg, global_batch_size=256, total_steps=500)
  with pytest.raises(ValueError, match="warmup_epochs.*set one of the two"):
    optim.make_optimizer(dict(cfg, warmup_steps=5), global_batch_size=256, total_steps=500,
                         steps_per_epoch=39)
  with pytest.raises(ValueError, match="warmup_epochs.*> total_steps"):
    optim.make_optimizer(cfg, global_batch_size=256, total_steps=50, steps_per_epoch=39)


def _numpy_schedule(t, *, peak, final, warmup, total, cosine=True):
  """The module docstring's formula, in float64 NumPy."""
  t = np.asarray(t, np.float64)
  if cosine and total > warmup:
    after = final + (peak - final) * (1 + np.cos(np.pi * np.clip(t - warmup, 0, total - warmup)
                                                 / (total - warmup))) / 2
  else:
    after = np.full_like(t, final if cosine else peak)
  return np.where(t < warmup, peak * t / max(warmup, 1), after)


@pytest.mark.parametrize("warmup,total,final,schedule", [
    (0, 50, 0.0, "cosine"), (7, 50, 0.02, "cosine"), (50, 50, 0.01, "cosine"),
    (7, 50, 0.0, "constant"), (3, 20, 0.5, "cosine")])  # final above the peak: a rising cosine
def test_schedule_matches_numpy_at_every_step(warmup, total, final, schedule):
  cfg = dict(base_lr=0.2, lr_scaling="none", warmup_steps=warmup, final_lr=final,
             schedule=schedule)
  sched = optim.make_schedule(cfg, global_batch_size=64, total_steps=total)
  steps = np.arange(total + 10)
  got = jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _numpy_schedule(steps, peak=0.2, final=final, warmup=warmup,
                                                  total=total, cosine=schedule == "cosine"),
                             rtol=1e-6, atol=1e-7)


def test_cosine_without_warmup_starts_at_peak():
  _, sched = optim.make_optimizer({}, global_batch_size=256, total_steps=200)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 100, 200)], [0.03, 0.015, 0.0],
                             atol=1e-8)


# ------------------------------------------------------------------------------------- SGD


@pytest.mark.parametrize("exclude_1d", [False, True])
def test_sgd_pytorch_style_weight_decay(exclude_1d):
  params, grads = _params_and_grads()
  cfg = dict(base_lr=0.5, lr_scaling="none", weight_decay=WD, warmup_steps=2,
             exclude_1d_from_wd=exclude_1d)
  tx, sched = optim.make_optimizer(cfg, global_batch_size=64, total_steps=5)
  # torch.optim.SGD: d = g + wd * p; buf = m * buf + d (buf = d at step 0); p -= lr * buf.
  p = {k: v.copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  want = []
  for t, g in enumerate(grads):
    lr = float(sched(t))
    for k in p:
      wd = 0.0 if (exclude_1d and p[k].ndim == 1) else WD
      buf[k] = MOMENTUM * buf[k] + g[k] + wd * p[k]
      p[k] = p[k] - lr * buf[k]
    want.append({k: v.copy() for k, v in p.items()})
  _assert_traj_close(_run(tx, params, grads), want)


def test_sgd_nesterov_matches_pytorch():
  params, grads = _params_and_grads(seed=1)
  cfg = dict(base_lr=0.1, lr_scaling="none", weight_decay=WD, nesterov=True,
             schedule="constant")
  tx, _ = optim.make_optimizer(cfg, global_batch_size=1, total_steps=3)
  p = {k: v.copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  want = []
  for g in grads:
    for k in p:
      d = g[k] + WD * p[k]
      buf[k] = MOMENTUM * buf[k] + d
      p[k] = p[k] - 0.1 * (d + MOMENTUM * buf[k])
    want.append({k: v.copy() for k, v in p.items()})
  _assert_traj_close(_run(tx, params, grads), want)


# ------------------------------------------------------------------------------------ LARS


def _lars_reference(params, grads, sched, exclude_1d, coef=1e-3):
  """LARS (SimCLR/BYOL form): u = g + wd p; r = coef |p| / |u|; v = m v + lr r u; p -= v."""
  p = {k: v.copy() for k, v in params.items()}
  v = {k: np.zeros_like(a) for k, a in params.items()}
  out = []
  for t, g in enumerate(grads):
    lr = float(sched(t))
    for k in p:
      if exclude_1d and p[k].ndim == 1:
        u, r = g[k], 1.0
      else:
        u = g[k] + WD * p[k]
        r = coef * np.linalg.norm(p[k]) / np.linalg.norm(u)
      v[k] = MOMENTUM * v[k] + lr * r * u
      p[k] = p[k] - v[k]
    out.append({k: a.copy() for k, a in p.items()})
  return out


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lars_matches_reference(exclude_1d):
  params, grads = _params_and_grads(steps=4, seed=2)
  cfg = dict(name="lars", base_lr=2.0, weight_decay=WD, warmup_steps=2,
             exclude_1d_from_wd=exclude_1d)
  tx, sched = optim.make_optimizer(cfg, global_batch_size=512, total_steps=6)
  _assert_traj_close(_run(tx, params, grads), _lars_reference(params, grads, sched, exclude_1d))


def test_lars_1d_params_update_like_momentum_sgd():
  params, grads = _params_and_grads(seed=3)
  cfg = dict(name="lars", base_lr=0.2, lr_scaling="none", schedule="constant",
             weight_decay=WD, exclude_1d_from_wd=True)
  tx, _ = optim.make_optimizer(cfg, global_batch_size=1, total_steps=3)
  lars = _run(tx, params, grads)
  sgd = _run(optax.sgd(0.2, momentum=MOMENTUM), params, grads)
  for a, b in zip(lars, sgd):
    np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-6)
    # The kernel does get the trust ratio and weight decay: a different trajectory.
    assert np.abs(a["kernel"] - b["kernel"]).max() > 1e-3


# ----------------------------------------------------------------------------------- AdamW


def test_adamw_excludes_1d_params_from_weight_decay():
  params, grads = _params_and_grads(seed=4)
  cfg = dict(name="adamw", base_lr=1e-2, lr_scaling="none", schedule="constant",
             weight_decay=0.5, exclude_1d_from_wd=True)
  tx, _ = optim.make_optimizer(cfg, global_batch_size=1, total_steps=3)
  got = _run(tx, params, grads)
  no_wd = _run(optax.adam(1e-2), params, grads)
  full_wd = _run(optax.adamw(1e-2, weight_decay=0.5), params, grads)
  for a, b, c in zip(got, no_wd, full_wd):
    np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-6)
    np.testing.assert_allclose(a["kernel"], c["kernel"], rtol=1e-6)


# ---------------------------------------------------------------------------------- config


def test_default_optim_config_keys():
  assert set(optim.default_optim_config()) == {
      "name", "base_lr", "lr_scaling", "momentum", "nesterov", "weight_decay",
      "exclude_1d_from_wd", "warmup_steps", "warmup_epochs", "schedule", "final_lr",
      "trust_coefficient", "eps", "adam_b2", "adam_eps"}


@pytest.mark.parametrize("key,value", [
    ("name", "adam"), ("schedule", "linear"), ("lr_scaling", "sqrt"), ("base_lr", -1.0),
    ("momentum", 1.0), ("warmup_steps", 1.5), ("exclude_1d_from_wd", "yes"), ("nesterov", 1),
    ("learning_rate", 0.1), ("warmup_steps", 20), ("warmup_epochs", -1.0)])
def test_invalid_optim_config_raises_naming_key(key, value):
  with pytest.raises(ValueError, match=key):
    optim.make_optimizer({key: value}, global_batch_size=256, total_steps=10)
