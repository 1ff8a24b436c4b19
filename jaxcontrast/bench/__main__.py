"""`python -m jaxcontrast.bench`: time the compiled train step; one JSON object on stdout.

  python -m jaxcontrast.bench                                  # MoCo v2 ImageNet recipe, R50, 224
  python -m jaxcontrast.bench --method sce --dtype bfloat16    # any method's ImageNet config
  python -m jaxcontrast.bench --config configs/sce_imagenet2012.py:multicrop
  python -m jaxcontrast.bench --dtype bfloat16 --reference torch --peak_flops 989e12  # vs PyTorch
  python -m jaxcontrast.bench --arch resnet18 --stem cifar --image_size 32 --batch 256 \\
      --queue_size 4096 --reference torch                       # the CPU comparison
  python -m jaxcontrast.bench --devices 8 --queue_mode sharded --queue_size 1048576   # 8 CPU devices

The config is `configs/<method>_imagenet2012.py` (or `--config`), with the flags below overriding
its model, batch and queue. Fields: the settings, `compile_s`, `step_ms_median` (each step
synchronised, after `--warmup` steps), `images_per_s`, `peak_memory_bytes` (device 0; null on
CPU), `compiled_temp_bytes`, `state_bytes_per_device`, `flops_per_image` (counted from the traced
step: jaxcontrast/bench/flops.py), `achieved_tflops`, `mfu` (with `--peak_flops`), and with
`--reference torch` a `reference` object (PyTorch eager and `torch.compile`, same model, batch,
queue, loss, optimizer and EMA; jaxcontrast/bench/torch_reference.py) and `ratio_vs_torch_<mode>`
(our images/s over theirs); `ema_update_ms` (the EMA pass alone); with `--profile DIR`,
`profile` (device ms per step by kernel kind: jaxcontrast/bench/profile.py); with `--input`, the
input pipeline alone and the whole input + step loop on the config's real data (`input_*`,
`loop_*`). Progress goes to stderr.
"""
import json
import os
import sys

from absl import app, flags

_METHOD = flags.DEFINE_enum("method", "moco", ["moco", "co2", "xmoco", "sce", "fnc", "sepp"],
                            "Uses configs/<method>_imagenet2012.py.")
_CONFIG = flags.DEFINE_string("config", None, "A config spec (path.py[:variants]) instead.")
_ARCH = flags.DEFINE_string("arch", None, "model.arch (resnet10/18/34/50).")
_STEM = flags.DEFINE_string("stem", None, "model.stem (imagenet, cifar, cifar_s2).")
_WIDTH = flags.DEFINE_float("width", None, "model.width multiplier.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "data.image_size (default 224).")
_BATCH = flags.DEFINE_integer("batch", None, "global_batch_size.")
_QUEUE_SIZE = flags.DEFINE_integer("queue_size", None, "queue.size (K).")
_QUEUE_MODE = flags.DEFINE_enum("queue_mode", None, ["replicated", "sharded"], "queue.mode.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "model.dtype (compute).")
_BN_MODE = flags.DEFINE_enum("bn_mode", None, ["sync", "ghost", "shuffle"], "bn.mode.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "KEY=VALUE on the config (e.g. objective.loss=sce, "
    "objective.fnc.num_support_views=2); VALUE is a Python literal or a bare string.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Devices of the mesh (default all; on CPU this many are simulated).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_INPUT = flags.DEFINE_bool(
    "input", False, "Also time the whole input + step loop on the config's real data (tf.data "
    "on this host; the dataset must be prepared): `input_*` and `loop_*` fields.")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", None, "Device peak FLOP/s, for `mfu`.")
_REFERENCE = flags.DEFINE_enum("reference", "none", ["none", "torch"],
                               "Also time the PyTorch MoCo v2 reference step.")
_PROFILE = flags.DEFINE_string("profile", None, "Folder for a jax.profiler trace of 3 steps; "
                               "adds `profile`: device ms per step by kernel kind.")
_TORCH_MODES = flags.DEFINE_list("torch_modes", ["eager", "compile"],
                                 "PyTorch reference modes (eager, compile).")
_TORCH_CHANNELS_LAST = flags.DEFINE_bool(
    "torch_channels_last", True, "PyTorch reference in channels_last memory (else NCHW).")


def _literal(text: str):
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def config_from_flags():
  from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
  spec = _CONFIG.value or f"configs/{_METHOD.value}_imagenet2012.py"
  config = config_lib.load_config(spec)
  overrides = {("model", "arch"): _ARCH.value, ("model", "stem"): _STEM.value,
               ("model", "width"): _WIDTH.value, ("data", "image_size"): _IMAGE_SIZE.value,
               ("global_batch_size",): _BATCH.value, ("queue", "size"): _QUEUE_SIZE.value,
               ("queue", "mode"): _QUEUE_MODE.value, ("model", "dtype"): _DTYPE.value,
               ("bn", "mode"): _BN_MODE.value}
  for item in _OVERRIDE.value:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--override wants KEY=VALUE, got {item!r}")
    overrides[tuple(key.strip().split("."))] = _literal(value.strip())
  with config.unlocked():
    for path, value in overrides.items():
      if value is None:
        continue
      section = config
      for key in path[:-1]:
        section = section[key]
      if path[-1] not in section:
        raise app.UsageError(f"no config key {'.'.join(path)!r}; keys there: {sorted(section)}")
      section[path[-1]] = value
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DEVICES.value and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):   # CPU: simulate the devices (ignored by GPU/TPU backends)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
  from jaxcontrast.bench import step as step_lib  # pylint: disable=g-import-not-at-top
  config = config_from_flags()
  print(f"[bench] {config.method} {config.model.arch} {step_lib.image_size(config)}px batch "
        f"{config.global_batch_size} K {config.queue.size} ({config.queue.mode}) "
        f"{config.model.dtype}", file=sys.stderr, flush=True)
  result = step_lib.bench_step(config, steps=_STEPS.value, warmup=_WARMUP.value,
                               devices=_DEVICES.value, peak_flops=_PEAK_FLOPS.value,
                               profile_dir=_PROFILE.value, input_loop=_INPUT.value)
  print(f"[bench] jaxcontrast: {result['images_per_s']} img/s "
        f"(compile {result['compile_s']} s)", file=sys.stderr, flush=True)
  if _INPUT.value:
    print(f"[bench] input alone {result['input_images_per_s']} img/s, input + step "
          f"{result['loop_images_per_s']} img/s", file=sys.stderr, flush=True)
  if _REFERENCE.value == "torch":
    from jaxcontrast.bench import torch_reference  # pylint: disable=g-import-not-at-top
    reference = torch_reference.bench_reference(
        config, image_size=step_lib.image_size(config), steps=_STEPS.value,
        warmup=_WARMUP.value, device=None, modes=tuple(_TORCH_MODES.value),
        channels_last=_TORCH_CHANNELS_LAST.value)
    result["reference"] = reference
    for mode in _TORCH_MODES.value:
      if mode in reference:
        result[f"ratio_vs_torch_{mode}"] = round(
            result["images_per_s"] / reference[mode]["images_per_s"], 3)
    print(f"[bench] reference: {json.dumps(reference)}", file=sys.stderr, flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
