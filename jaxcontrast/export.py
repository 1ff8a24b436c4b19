"""Export a run's encoder: `python -m jaxcontrast.export --workdir DIR --format F --out FILE`.

  python -m jaxcontrast.export --workdir /tmp/moco_in1k --format torchvision --out r50.safetensors
  python -m jaxcontrast.export --workdir /tmp/moco_in1k --format flax --out r50.msgpack \
      [--step 1000] [--which online] [--features projection]

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
`etils.epath` paths (gs:// works). Usage errors exit with status 2 and one line on stderr.
"""
from __future__ import annotations

import json
import logging
import sys

import numpy as np

FORMATS = ("torchvision", "flax")
PROG = "python -m jaxcontrast.export"


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
  """Writes the export (see the module docstring); returns its metadata."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import encoders  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "torchvision" and features != "backbone":
    raise ValueError("format torchvision exports the backbone only (torchvision's ResNet has no "
                     f"projector); got features={features!r}")
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


def main(argv: list[str] | None = None) -> int:
  """The command line; `argv` excludes the program name."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def usage_error(message: str):
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The pretraining run's workdir.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", flag_values=fv)
  flags.DEFINE_enum("which", "target", ("target", "online"),
                    "target: the EMA (key) encoder; online: the query encoder.", flag_values=fv)
  flags.DEFINE_enum("format", None, FORMATS, "torchvision (safetensors) or flax (msgpack + json).",
                    flag_values=fv)
  flags.DEFINE_enum("features", "backbone", ("backbone", "projection"),
                    "flax only: the backbone, or backbone + projector.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output file (.safetensors / .msgpack).", flag_values=fv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv):
    print(f"{PROG} --workdir DIR --format {'|'.join(FORMATS)} --out FILE [flags]\n\n"
          + fv.get_help())
    raise SystemExit(0)
  try:
    fv(["jaxcontrast.export"] + argv)
  except flags.Error as e:
    usage_error(str(e))
  for name in ("workdir", "format", "out"):
    if fv[name].value is None:
      usage_error(f"--{name} is required")
  if fv.format == "torchvision" and fv.features != "backbone":
    usage_error("--features projection needs --format flax (torchvision's ResNet has no "
                "projector)")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    meta = export(fv.workdir, out=fv.out, fmt=fv.format, step=fv.step, which=fv.which,
                  features=fv.features)
  except (ValueError, FileNotFoundError) as e:
    usage_error(" ".join(str(e).split()))
  if fv.format == "torchvision":
    print(f"wrote {fv.out}: {meta['arch']} backbone ({meta['source']}) in torchvision layout. "
          "Load it with:\n  import math, torch, torchvision, safetensors.torch\n  " +
          meta["torchvision_code"].replace("\n", "\n  ") +
          f"\n  model.load_state_dict(safetensors.torch.load_file({str(fv.out)!r}), "
          f"strict=False)\n  # inputs: NCHW, (pixels / 255 - {meta['mean']}) / {meta['std']}",
          flush=True)
  else:
    print(f"wrote {fv.out} and {flax_metadata_path(fv.out)}: {meta['which']} encoder, "
          f"{meta['features']}, step {meta['step']}; jaxcontrast.export.read_flax({str(fv.out)!r})"
          " -> (module, variables, metadata)", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
