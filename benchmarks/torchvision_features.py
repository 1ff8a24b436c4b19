"""Exported backbones in torchvision give our features: the check behind tests/fixtures/.

  python benchmarks/torchvision_features.py --torch_python /path/to/torch-venv/bin/python

For each case (ResNet-18 with the CIFAR stem at 32 px; ResNet-50 with the ImageNet stem at
64 px), in this (JAX) interpreter:

1. backbone variables from our initialisation with a fixed seed, then every BatchNorm's scale and
   bias drawn at random and its running statistics set to those of a few random images (what a
   trained network holds, so no layer is an identity and activations stay of order 1);
2. `torch_weights.to_torchvision` -> safetensors, and two random input images;
3. the torch interpreter (`--torch_python`, with torch, torchvision, safetensors; torch is not
   needed here) builds the torchvision model with the code the export prints
   (`torch_weights.torchvision_model`), loads the file with `strict=False` (it checks that only
   `fc.*` is missing and nothing unexpected), and computes eval-mode float32 features;
4. compares them with our eval-mode features (max |difference|, the bar is 1e-4) and writes
   tests/fixtures/torchvision_features.json.gz: the seeds, torchvision's features of the two
   images (the first `KEEP` dimensions) and its state-dict key names and shapes. The CI test
   (tests/test_export.py) regenerates the same variables and compares our forward with those
   numbers without torch.

Run with torch only: `--torch_side DIR` (what step 3 calls).
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CASES = {
    "resnet18_cifar": dict(arch="resnet18", stem="cifar", size=32, channels=3, seed=0),
    "resnet50_imagenet": dict(arch="resnet50", stem="imagenet", size=64, channels=3, seed=1),
}
NUM_IMAGES = 2
NUM_CALIBRATION_IMAGES = 4
KEEP = 512            # feature dimensions kept in the fixture (of 512 / 2048)
TOLERANCE = 1e-4
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                       "fixtures", "torchvision_features.json.gz")


def images(case: dict, *, calibration: bool = False) -> np.ndarray:
  """Normalised NHWC float32 inputs (standard normal), fixed by the case's seed."""
  rng = np.random.default_rng(case["seed"] + (1000 if calibration else 0))
  n = NUM_CALIBRATION_IMAGES if calibration else NUM_IMAGES
  return rng.standard_normal((n, case["size"], case["size"], case["channels"])).astype(np.float32)


def backbone(case: dict):
  from jaxcontrast.models import build_resnet  # pylint: disable=g-import-not-at-top
  return build_resnet(case["arch"], stem=case["stem"])


def variables(case: dict) -> dict:
  """The case's backbone variables (NumPy), deterministic given the seed: our init, random
  BatchNorm affine parameters, running statistics of `images(case, calibration=True)`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxcontrast.models.norm import BN_MOMENTUM  # pylint: disable=g-import-not-at-top
  model = backbone(case)
  calib = images(case, calibration=True)
  v = jax.device_get(jax.jit(lambda k: model.init(k, calib[:1], train=False))(
      jax.random.key(case["seed"])))
  rng = np.random.default_rng(case["seed"])

  last_bn = "'bn3'" if case["arch"] == "resnet50" else "'bn2'"

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'scale'" in name and last_bn in name and "'layer" in name:
      # A residual branch's last BatchNorm: small scales, as trained ResNets have (and as
      # zero-init-residual starts them), so features stay of order 1 as in a trained network.
      return rng.uniform(0.1, 0.4, leaf.shape).astype(np.float32)
    if "'scale'" in name:
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    if "'bias'" in name:
      return rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    return np.asarray(leaf)
  params = jax.tree_util.tree_map_with_path(draw, v["params"])
  # One train-mode pass: running <- m * running + (1 - m) * batch, solved for the batch value.
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      {"params": params, "batch_stats": v["batch_stats"]}, calib)
  batch_stats = jax.tree.map(
      lambda old, new: np.asarray((np.asarray(new) - BN_MOMENTUM * np.asarray(old))
                                  / (1 - BN_MOMENTUM), np.float32),
      v["batch_stats"], jax.device_get(updates["batch_stats"]))
  return {"params": params, "batch_stats": batch_stats}


def jax_features(case: dict, variables_=None) -> np.ndarray:
  """Our eval-mode float32 features (NUM_IMAGES, F) of `images(case)`."""
  import jax  # pylint: disable=g-import-not-at-top
  v = variables(case) if variables_ is None else variables_
  model = backbone(case)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(jax.device_get(apply(v, images(case))))


def _encode(a: np.ndarray) -> str:
  return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()


def decode(s: str, shape) -> np.ndarray:
  return np.frombuffer(base64.b64decode(s), np.float32).reshape(shape)


def torch_side(directory: str) -> None:
  """Step 3, in an interpreter with torch: DIR/<case>.safetensors + .npz -> DIR/<case>.out.npz."""
  import math  # pylint: disable=g-import-not-at-top,unused-import
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except RuntimeError:
    # A CUDA build of torchvision beside a CPU torch: its compiled detection ops (unused by
    # ResNets) do not load, and registering their meta kernels fails; skip that module.
    import types  # pylint: disable=g-import-not-at-top
    for m in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[m]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
    import torchvision  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for name in CASES:
    spec = json.loads(open(os.path.join(directory, f"{name}.json")).read())
    scope = {"torch": torch, "torchvision": torchvision, "math": math}
    exec(spec["code"].replace("model.fc = torch.nn.Identity()", "pass"), scope)  # pylint: disable=exec-used
    model = scope["model"].float().eval()
    result = model.load_state_dict(
        safetensors.torch.load_file(os.path.join(directory, f"{name}.safetensors")), strict=False)
    if sorted(result.missing_keys) != ["fc.bias", "fc.weight"] or result.unexpected_keys:
      raise SystemExit(f"{name}: missing {result.missing_keys}, unexpected "
                       f"{result.unexpected_keys}")
    model.fc = torch.nn.Identity()
    x = torch.from_numpy(np.load(os.path.join(directory, f"{name}.npz"))["images"])
    feats = model(x.permute(0, 3, 1, 2).contiguous()).numpy()
    keys = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    # float64: how far float32 itself is from the exact features (context for the tolerance).
    feats64 = model.double()(x.double().permute(0, 3, 1, 2).contiguous()).numpy()
    np.savez(os.path.join(directory, f"{name}.out.npz"), features=feats, features64=feats64)
    with open(os.path.join(directory, f"{name}.keys.json"), "w") as f:
      json.dump({"keys": keys, "torch": torch.__version__,
                 "torchvision": torchvision.__version__}, f)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch_python", help="interpreter with torch, torchvision, safetensors")
  parser.add_argument("--torch_side", help=argparse.SUPPRESS)
  parser.add_argument("--fixture", default=FIXTURE)
  args = parser.parse_args()
  if args.torch_side:
    torch_side(args.torch_side)
    return 0
  if not args.torch_python:
    parser.error("--torch_python is required")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
  directory = tempfile.mkdtemp(prefix="torchvision_features_")
  ours = {}
  for name, case in CASES.items():
    v = variables(case)
    ours[name] = jax_features(case, v)
    save_file(torch_weights.to_torchvision(v), os.path.join(directory, f"{name}.safetensors"))
    np.savez(os.path.join(directory, f"{name}.npz"), images=images(case))
    _, code = torch_weights.torchvision_model(case["arch"], case["stem"], 1.0, "batch",
                                              case["channels"])
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
      json.dump({"code": code}, f)
  subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch_side", directory],
                 check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  fixture = {"tolerance": TOLERANCE, "keep": KEEP, "num_images": NUM_IMAGES, "cases": {}}
  worst = 0.0
  for name, case in CASES.items():
    out = np.load(os.path.join(directory, f"{name}.out.npz"))
    theirs, exact = out["features"], out["features64"]
    info = json.loads(open(os.path.join(directory, f"{name}.keys.json")).read())
    diff = float(np.max(np.abs(theirs - ours[name])))
    worst = max(worst, diff)
    print(f"{name}: features {theirs.shape}, max |torchvision - ours| = {diff:.2e} in float32 "
          f"(max |feature| {np.max(np.abs(theirs)):.3f}); against torchvision in float64: ours "
          f"{np.max(np.abs(exact - ours[name])):.2e}, torchvision float32 "
          f"{np.max(np.abs(exact - theirs)):.2e} (torch {info['torch']}, torchvision "
          f"{info['torchvision']})", flush=True)
    fixture["cases"][name] = dict(case, features=_encode(theirs[:, :KEEP]),
                                  shape=[NUM_IMAGES, min(KEEP, theirs.shape[1])],
                                  max_abs_diff=diff, torch=info["torch"],
                                  torchvision=info["torchvision"],
                                  state_dict=[k for k in info["keys"]
                                              if not k[0].startswith("fc.")])
  os.makedirs(os.path.dirname(args.fixture), exist_ok=True)
  with open(args.fixture, "wb") as f:   # mtime 0: the same numbers give the same file
    f.write(gzip.compress(json.dumps(fixture, separators=(",", ":"), sort_keys=True).encode(),
                          mtime=0))
  print(f"wrote {args.fixture} ({os.path.getsize(args.fixture)} bytes)")
  return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
  sys.exit(main())
