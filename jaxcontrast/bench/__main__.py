"""`python -m jaxcontrast.bench`: time the compiled train step; one JSON object on stdout.

  python -m jaxcontrast.bench                          # MoCo v2 ImageNet recipe, R50, 224
  python -m jaxcontrast.bench --config configs/sce_imagenet2012.py --config.model.dtype=bfloat16
  python -m jaxcontrast.bench --config configs/sce_imagenet2012.py:multicrop
  python -m jaxcontrast.bench --config.model.dtype=bfloat16 --reference torch --peak_flops 989e12
  python -m jaxcontrast.bench --config.model.arch=resnet18 --config.model.stem=cifar \\
      --config.data.image_size=32 --config.global_batch_size=256 --config.queue.size=4096 \\
      --reference torch                                # the CPU comparison
  python -m jaxcontrast.bench --devices 8 --config.queue.mode=sharded \\
      --config.queue.size=1048576                      # 8 simulated CPU devices

The config is `--config` (default configs/moco_imagenet2012.py), any key overridden with
`--config.KEY=VALUE` (`--help` lists them; a bad key or value is one line, exit status 2); the
flags below say what is timed. Fields: the settings, `compile_s`, `step_ms_median` (each step
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

from absl import flags

from jaxcontrast import cli

DEFAULT_CONFIG = "configs/moco_imagenet2012.py"
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


def main(argv):
  del argv
  from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  config_lib.validate_config(config)   # the overrides
  os.environ.update(cli.quiet_environment())
  if _DEVICES.value and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):   # CPU: simulate the devices (a CPU-backend option; GPU/TPU ignore it)
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  from jaxcontrast.bench import step as step_lib  # pylint: disable=g-import-not-at-top
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
  cli.run(main, config_file=DEFAULT_CONFIG)
