"""Time the compiled train step of any config on synthetic inputs already on the devices.

What it measures is the step alone (`train_step.make_train_step` + `train_step.jit_train_step`,
the exact program `python -m jaxcontrast.main` runs): compile time, per-step wall time after warm-up
(each step synchronised with `block_until_ready`; the median is reported), images/s, peak
device memory, and FLOPs per image counted from the traced program (`flops.py`), hence MFU for
a given peak.
"""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcontrast.bench import flops as flops_lib
from jaxcontrast.sharding import DATA_AXIS, global_batch_from_local, make_mesh
from jaxcontrast.step import train_step
from jaxcontrast.step.optim import make_optimizer

NUM_CLASSES = 1000   # labels of the synthetic batch (ImageNet's), for the "diag/..." metrics


# Native (size, channels, train examples) of the known datasets (data/datasets.py holds the
# same behind a TensorFlow import that GPU benchmark machines may lack); the train size only
# places a warm-up given in epochs, which changes the learning rate, not the step's cost.
_NATIVE = {"fashion_mnist": (28, 1, 60_000), "cifar10": (32, 3, 50_000),
           "cifar100": (32, 3, 50_000), "stl10": (96, 3, 100_000),
           "imagenet2012": (224, 3, 1_281_167)}
_DEFAULT = (224, 3, 1_281_167)


def image_size(config) -> int:
  return int(config.data.image_size or _NATIVE.get(config.data.dataset, _DEFAULT)[0])


def image_channels(config) -> int:
  return int(config.data.num_channels or _NATIVE.get(config.data.dataset, _DEFAULT)[1])


def synthetic_batch(config, *, batch_size: int, seed: int = 0) -> dict:
  """Host arrays with every entry the config's step reads: the two views, FNC's support views,
  multi-crop local views, ids and labels (the pipeline delivers labels on ImageNet, and with
  `queue.store_labels` the step computes its false-negative diagnostics from them)."""
  rng = np.random.default_rng(seed)
  size, channels = image_size(config), image_channels(config)
  images = lambda *lead, s=size: rng.standard_normal((*lead, s, s, channels), np.float32)
  batch = {"view1": images(batch_size), "view2": images(batch_size),
           "id": np.arange(batch_size, dtype=np.int32),
           "key_id": np.arange(batch_size, dtype=np.int32),
           "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)}
  support = int(config.objective.fnc.num_support_views or 0)
  if support:
    batch["support"] = images(batch_size, support)
  for i, crop in enumerate(config.data.local_crop_sizes or ()):
    batch[f"local_{i}"] = images(batch_size, s=int(crop))
  if config.objective.loss == "multi_positive":
    batch["neighbors"] = rng.integers(0, batch_size, (batch_size, 4)).astype(np.int32)
  if on_device(config):   # uint8 views and their photometric parameters, as the pipeline ships
    from jaxcontrast.data import augment_jax  # pylint: disable=g-import-not-at-top
    views = [k for k in batch if k in ("view1", "view2", "support") or k.startswith("local_")]
    batch["aug"] = {k: augment_jax.random_params(rng, batch[k].shape[:-3]) for k in views}
    for k in views:
      batch[k] = rng.integers(0, 256, batch[k].shape, dtype=np.uint8)
  return batch


def on_device(config) -> bool:
  """Whether the step finishes the views (`data.augment_on` resolved as the pipeline does)."""
  from jaxcontrast.data import config as data_config_lib  # pylint: disable=g-import-not-at-top
  return data_config_lib.augment_on(config.data) == "device"


def device_augment(config):
  """The step's `DeviceAugment` without TensorFlow: the config's recipes and statistics
  (`data.mean` / `data.std`, else ImageNet's: the values do not change the cost)."""
  from jaxcontrast.data import augment_jax, recipes  # pylint: disable=g-import-not-at-top
  channels = image_channels(config)
  mean = tuple(config.data.mean or (0.485, 0.456, 0.406)[:channels])
  std = tuple(config.data.std or (0.229, 0.224, 0.225)[:channels])
  return augment_jax.DeviceAugment.create(recipes.view_recipes(config.data), mean, std)


def build(config, *, devices: int | None = None, total_steps: int = 10_000_000):
  """(mesh, step function, jitted step, state, global batch) for `config` on the first `devices`
  devices. `total_steps` only places the schedules (a long run: warm-ups of any length fit)."""
  mesh = make_mesh(devices)
  if config.global_batch_size % mesh.shape[DATA_AXIS]:
    raise ValueError(f"batch {config.global_batch_size} is not divisible by the "
                     f"{mesh.shape[DATA_AXIS]} devices")
  num_train = _NATIVE.get(config.data.dataset, _DEFAULT)[2]
  tx, _ = make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                         total_steps=total_steps,
                         steps_per_epoch=num_train / config.global_batch_size)
  models = train_step.build_models(config, mesh)
  size, channels = image_size(config), image_channels(config)
  state, shardings = train_step.create_state(
      config, models=models, tx=tx, mesh=mesh,
      sample_images=jnp.zeros((2, size, size, channels), jnp.float32), rng=jax.random.key(0))
  step_fn = train_step.make_train_step(
      config, models=models, tx=tx, mesh=mesh, total_steps=total_steps,
      base_rng=jax.random.key(1), augment=device_augment(config) if on_device(config) else None)
  jitted = train_step.jit_train_step(step_fn, mesh=mesh, shardings=shardings)
  batch = global_batch_from_local(
      mesh, synthetic_batch(config, batch_size=config.global_batch_size))
  return mesh, step_fn, jitted, state, batch


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 since the process started (None where the backend does not
  report it, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def time_calls(call, *, steps: int, warmup: int) -> list[float]:
  """Wall seconds of `steps` calls after `warmup` calls; `call()` must block until done."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def ema_update_ms(state, *, steps: int = 10) -> float:
  """Median milliseconds of the EMA update alone (target <- m target + (1 - m) online) on the
  state's parameters: the step's one pass over every parameter outside the optimizer."""
  from jaxcontrast.step import ema  # pylint: disable=g-import-not-at-top
  update = jax.jit(lambda target, online: ema.update(target, online, 0.999))
  call = lambda: jax.block_until_ready(update(state.ema_params, state.params))
  return round(1e3 * statistics.median(time_calls(call, steps=steps, warmup=2)), 3)


def bench_step(config, *, steps: int = 20, warmup: int = 3, devices: int | None = None,
               peak_flops: float | None = None, profile_dir: str | None = None,
               input_loop: bool = False) -> dict:
  """The step benchmark's JSON fields for `config` (see module docstring); with `profile_dir`,
  also a device-time breakdown of 3 profiled steps (`profile.py`); with `input_loop`, the
  fields of `bench_loop`, on the same state and mesh."""
  mesh, step_fn, jitted, state, batch = build(config, devices=devices)
  total_flops = flops_lib.count_flops(step_fn, state, batch)

  t0 = time.perf_counter()
  compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
    holder["metrics"] = metrics

  times = time_calls(call, steps=steps, warmup=warmup)
  median = statistics.median(times)
  b = config.global_batch_size
  memory = compiled.memory_analysis()
  result = {
      "method": config.method, "loss": config.objective.loss, "arch": config.model.arch,
      "stem": config.model.stem, "width": float(config.model.width),
      "image_size": image_size(config), "batch": b, "queue_size": int(config.queue.size),
      "queue_mode": config.queue.mode, "dtype": config.model.dtype,
      "bn_mode": config.bn.mode,
      "augment_on": "device" if on_device(config) else "host",
      "symmetric": bool(config.objective.symmetric),
      "support_views": int(config.objective.fnc.num_support_views or 0),
      "local_crops": list(config.data.local_crop_sizes or ()),
      "devices": int(mesh.shape[DATA_AXIS]), "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "compile_s": round(compile_s, 2), "steps": steps, "warmup": warmup,
      "step_ms_median": round(1e3 * median, 3),
      "step_ms_min": round(1e3 * min(times), 3), "step_ms_max": round(1e3 * max(times), 3),
      "images_per_s": round(b / median, 1),
      "peak_memory_bytes": peak_memory_bytes(),
      "compiled_temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0) or 0),
      "state_bytes_per_device": state_bytes_per_device(holder["state"]),
      "flops_per_step": total_flops, "flops_per_image": total_flops / b,
      "achieved_tflops": significant(total_flops / median / 1e12),
      "final_loss": float(holder["metrics"]["loss"]),
  }
  result["ema_update_ms"] = ema_update_ms(holder["state"])
  if profile_dir:
    from jaxcontrast.bench import profile  # pylint: disable=g-import-not-at-top
    result["profile"] = profile.profile_calls(call, steps=3, logdir=profile_dir,
                                              hlo_text=compiled.as_text())
  if input_loop:
    result.update(_time_loop(config, mesh, jitted, holder["state"], steps=steps, warmup=warmup))
  if peak_flops:
    result["peak_flops"] = peak_flops
    result["mfu"] = significant(total_flops / median / peak_flops)
  return result


def significant(x: float, digits: int = 4) -> float:
  """`x` rounded to `digits` significant digits: a CPU's MFU (~5e-4) keeps its precision, which
  rounding to decimal places would not."""
  return float(f"{x:.{digits}g}")


def state_bytes_per_device(state) -> int:
  """Bytes of the train state held by device 0 (a sharded queue counts its block only)."""
  total = 0
  device = jax.local_devices()[0]
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def bench_loop(config, *, steps: int = 20, warmup: int = 3, devices: int | None = None) -> dict:
  """The whole input + step loop, as `run.pretrain` runs it: the config's tf.data pipeline on
  this host (this process's share of the global batch), host-to-device transfer, the compiled
  step. Returns the input alone (batches pulled without stepping) and the loop, each as median
  seconds per step and images/s, after `warmup` steps; the loop is limited by the slower of
  the two unless they overlap (tf.data prefetches on its own threads while the step runs)."""
  mesh, _, jitted, state, _ = build(config, devices=devices)
  return _time_loop(config, mesh, jitted, state, steps=steps, warmup=warmup)


def _time_loop(config, mesh, jitted, state, *, steps: int, warmup: int) -> dict:
  from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxcontrast.run.pretrain import step_inputs  # pylint: disable=g-import-not-at-top
  local_batch = config.global_batch_size // jax.process_count()
  data = pipeline.make_train_iterator(config.data, batch_size=local_batch, seed=config.seed)
  to_device = lambda b: global_batch_from_local(mesh, step_inputs(b))

  input_times = time_calls(lambda: next(data), steps=steps, warmup=warmup)
  first = to_device(next(data))
  t0 = time.perf_counter()
  compiled = jitted.lower(state, first).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def loop_step():
    holder["state"], metrics = compiled(holder["state"], to_device(next(data)))
    jax.block_until_ready(metrics["loss"])

  loop_times = time_calls(loop_step, steps=steps, warmup=warmup)
  b = config.global_batch_size
  per_s = lambda times: round(b / statistics.median(times), 1)
  return {"input_ms_median": round(1e3 * statistics.median(input_times), 3),
          "input_images_per_s": per_s(input_times),
          "input_images_per_s_per_core": round(per_s(input_times) / (os.cpu_count() or 1), 1),
          "loop_compile_s": round(compile_s, 2),
          "loop_ms_median": round(1e3 * statistics.median(loop_times), 3),
          "loop_images_per_s": per_s(loop_times), "host_cores": os.cpu_count(),
          "dataset": config.data.dataset}
