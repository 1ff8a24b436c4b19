"""Export a run's encoder: `python -m jaxcontrast.export --workdir DIR --out FILE`.

  python -m jaxcontrast.export --workdir /tmp/moco_in1k --out r50.safetensors
  python -m jaxcontrast.export --workdir /tmp/moco_in1k --out r50.msgpack \\
      --config.step=1000 --config.which=online --config.features=projection

The format follows FILE's suffix (`.safetensors`: torchvision, `.msgpack`: flax) unless
`--config.format` names it; the settings are `default_export_config()` (`--help` lists them).

* `torchvision`: the backbone as a safetensors file with torchvision's ResNet key names and
  layouts (`conv1.weight` OIHW, `bn1.running_mean`, `layer1.0.conv1.weight`, ...; no `fc`),
  converted exactly (`models/torch_weights.py`). The command prints, and the file's metadata
  holds (`torchvision_code`), the torchvision model to load it into, with the stem change a
  CIFAR stem or a 1-channel input needs; then
  `model.load_state_dict(safetensors.torch.load_file(FILE), strict=False)` misses only `fc.*`.
* `flax`: the encoder's variables (`params`, `batch_stats`) as flax msgpack (FILE) and FILE with
  `.json` in place of `.msgpack`: the model config, which network, features, step, the input
  shape and the normalisation. `read_flax(FILE)` gives back (module, variables, metadata).

Only the exported network is read from the checkpoint (`jaxcontrast.load_encoder`). Paths are
`etils.epath` paths (gs:// works). A bad setting, a missing flag or a workdir (or step) without a
checkpoint is one line on stderr and exit status 2 (`jaxcontrast.cli`).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxcontrast import errors
from jaxcontrast.config_check import fail, is_int

FORMATS = ("torchvision", "flax")
WHICH = ("target", "online")
FEATURES = ("backbone", "projection")
# The format an output file's suffix implies when --config.format is not given.
SUFFIX_FORMATS = {".safetensors": "torchvision", ".msgpack": "flax"}


def default_export_config() -> ml_collections.ConfigDict:
  """The export's settings (--config.KEY=VALUE)."""
  c = ml_collections.ConfigDict()
  # "torchvision" (safetensors) or "flax" (msgpack + json); None: from --out's suffix
  # (.safetensors: torchvision, .msgpack: flax).
  c.format = config_dict.placeholder(str)
  c.which = "target"            # "target": the EMA (key) encoder; "online": the query encoder
  c.features = "backbone"       # "backbone", or "projection" (backbone + projector; flax only)
  c.step = config_dict.placeholder(int)   # checkpoint step; None = the latest
  return c


def export_format(fmt, out) -> str:
  """`fmt` if given, else the format `out`'s suffix implies; a ConfigError names both when
  neither says which."""
  if fmt is not None:
    if fmt not in FORMATS:
      fail("", "format", fmt, f"None (from --out's suffix) or one of {FORMATS}")
    return fmt
  suffix = os.path.splitext(str(out))[1]
  if suffix not in SUFFIX_FORMATS:
    implied = ", ".join(f"{s} -> {f}" for s, f in SUFFIX_FORMATS.items())
    fail("", "format", fmt, f"one of {FORMATS} when --out {str(out)!r} has a suffix other than "
         f"{implied}")
  return SUFFIX_FORMATS[suffix]


def validate(c, out) -> str:
  """The format to write (`export_format`); ConfigError naming the first bad key of `c`."""
  fmt = export_format(c.format, out)
  if c.which not in WHICH:
    fail("", "which", c.which, f"one of {WHICH}")
  if c.features not in FEATURES:
    fail("", "features", c.features, f"one of {FEATURES}")
  if fmt == "torchvision" and c.features != "backbone":
    fail("", "features", c.features, "'backbone' with format torchvision (torchvision's ResNet "
         "has no projector); 'projection' needs format flax (--out FILE.msgpack)")
  if c.step is not None and (not is_int(c.step) or c.step < 0):
    fail("", "step", c.step, "None (the latest) or a saved step >= 0")
  return fmt


def flax_metadata_path(out) -> str:
  """The JSON beside a flax export: FILE.msgpack -> FILE.json (else FILE + ".json")."""
  out = str(out)
  return (out[:-len(".msgpack")] if out.endswith(".msgpack") else out) + ".json"


def torchvision_export(loaded, workdir) -> tuple[bytes, dict]:
  """(safetensors bytes, metadata) of a `LoadedEncoder`'s backbone."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
  from jaxcontrast.models.config import resolve_model_config  # pylint: disable=g-import-not-at-top
  model = resolve_model_config(loaded.config.model)
  tensors = torch_weights.to_torchvision(loaded.variables, num_batches_tracked=loaded.step)
  ctor, code = torch_weights.torchvision_model(model.arch, model.stem, float(model.width),
                                               model.norm, loaded.image_shape[-1])
  metadata = {"format": "pt", "source": f"jaxcontrast:{workdir}@{loaded.step}:{loaded.which}",
              "arch": model.arch, "stem": model.stem, "width": repr(float(model.width)),
              "norm": model.norm, "in_channels": str(loaded.image_shape[-1]),
              "image_size": str(loaded.image_shape[0]), "mean": json.dumps(loaded.mean),
              "std": json.dumps(loaded.std), "torchvision_model": ctor or "",
              "torchvision_code": code}
  return save(tensors, metadata=metadata), metadata


def flax_export(loaded, workdir) -> tuple[bytes, dict]:
  """(msgpack bytes, JSON metadata) of a `LoadedEncoder`."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
  meta = {"format": "jaxcontrast-flax", "source": str(workdir), "step": loaded.step,
          "which": loaded.which, "features": loaded.features,
          "model": checkpoint.config_to_dict(loaded.config.model),
          "image_shape": list(loaded.image_shape), "mean": list(loaded.mean),
          "std": list(loaded.std),
          "apply": "module.apply(variables, images, train=False) -> (B, D); images NHWC, "
                   "normalised (pixels / 255 - mean) / std"}
  return serialization.msgpack_serialize(_numpy_tree(loaded.variables)), meta


def _numpy_tree(tree):
  if isinstance(tree, dict):
    return {k: _numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def read_flax(path):
  """(module, variables, metadata) of a flax export: `module.apply(variables, images,
  train=False)` gives the features it was exported with."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import encoders  # pylint: disable=g-import-not-at-top
  meta = json.loads(epath.Path(flax_metadata_path(path)).read_text())
  variables = serialization.msgpack_restore(epath.Path(path).read_bytes())
  return encoders.encoder_module(meta["model"], meta["features"]), variables, meta


def export(workdir, *, out, fmt: str, step=None, which: str = "target",
           features: str = "backbone") -> dict:
  """Writes the export (see the module docstring); returns its metadata. A format, network or
  features that cannot be exported is a `ConfigError`, a workdir or step without a checkpoint a
  `CheckpointNotFoundError` (both `ValueError`s)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import encoders  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise errors.ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "torchvision" and features != "backbone":
    raise errors.ConfigError("format torchvision exports the backbone only (torchvision's ResNet "
                             f"has no projector); got features={features!r}")
  loaded = encoders.load_encoder(workdir, step=step, which=which, features=features)
  out = epath.Path(out)
  if out.parent and not out.parent.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
  if fmt == "torchvision":
    blob, meta = torchvision_export(loaded, workdir)
  else:
    blob, meta = flax_export(loaded, workdir)
    epath.Path(flax_metadata_path(out)).write_text(json.dumps(meta, indent=2, sort_keys=True))
  out.write_bytes(blob)
  return meta


def summary(meta: dict, out, fmt: str) -> str:
  """What the command prints after writing `out`: for torchvision, the PyTorch code that loads
  it."""
  if fmt == "torchvision":
    return (f"wrote {out}: {meta['arch']} backbone ({meta['source']}) in torchvision layout. "
            "Load it with:\n  import math, torch, torchvision, safetensors.torch\n  " +
            meta["torchvision_code"].replace("\n", "\n  ") +
            f"\n  model.load_state_dict(safetensors.torch.load_file({str(out)!r}), "
            f"strict=False)\n  # inputs: NCHW, (pixels / 255 - {meta['mean']}) / {meta['std']}")
  return (f"wrote {out} and {flax_metadata_path(out)}: {meta['which']} encoder, "
          f"{meta['features']}, step {meta['step']}; jaxcontrast.export.read_flax({str(out)!r})"
          " -> (module, variables, metadata)")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The pretraining run's workdir.")
  flags.DEFINE_string("out", None, "Output file: .safetensors (torchvision) or .msgpack (flax; "
                      "the metadata goes beside it as .json).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
  """After `cli.run` parsed the flags: --workdir, --out, --config.KEY=VALUE."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxcontrast import cli  # pylint: disable=g-import-not-at-top
  c, out = flags.FLAGS.config, flags.FLAGS.out
  fmt = validate(c, out)
  os.environ.update(cli.quiet_environment())   # before TensorFlow is imported
  meta = export(flags.FLAGS.workdir, out=out, fmt=fmt, step=c.step, which=c.which,
                features=c.features)
  print(summary(meta, out, fmt), flush=True)


if __name__ == "__main__":
  from jaxcontrast import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, config=default_export_config)
