"""Encoders out of checkpoints and to / from PyTorch: `load_encoder` (partial restore, bytes
read), `export` and its command line `python -m jaxcontrast.export`, the torchvision state-dict
conversion (round trip, MoCo prefix, mismatch errors), `init_from`, and our forward against
torchvision's numbers
(tests/fixtures/torchvision_features.json.gz, made by benchmarks/torchvision_features.py).

One module-scoped checkpoint: the tiny MoCo config's initial state saved by the run's own
`Checkpointer` (no training step: the arrays' values do not matter, their layout does).
"""
import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from safetensors.numpy import load_file, save_file

import jaxcontrast
from jaxcontrast import export
from jaxcontrast.errors import CheckpointNotFoundError, ConfigError
from jaxcontrast.eval import encoders
from jaxcontrast.models import torch_weights
from jaxcontrast.run import checkpoint

STEP = 3
IMAGE_SHAPE = (16, 16, 1)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _assert_same(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x, y), path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, state): the tiny config's initial state saved at step STEP."""
  from jaxcontrast import config_lib
  from jaxcontrast.sharding import make_mesh
  from jaxcontrast.step import train_step
  from jaxcontrast.step.optim import make_optimizer
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.model.arch = "resnet10"   # 4 stages: what torchvision's ResNet builds
  mesh = make_mesh()
  models = train_step.build_models(config, mesh)
  tx, _ = make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                         total_steps=10, steps_per_epoch=None)
  state, _ = train_step.create_state(config, models=models, tx=tx, mesh=mesh,
                                     sample_images=jnp.zeros((2,) + IMAGE_SHAPE),
                                     rng=jax.random.key(0))
  # Distinct values in both networks' BN statistics and EMA params (init copies them), so a
  # restore of the wrong subtree cannot pass.
  bump = lambda tree, d: jax.tree.map(lambda a: a + d, tree)
  state = state.replace(ema_params=bump(state.ema_params, 0.5),
                        batch_stats=bump(state.batch_stats, 0.25),
                        ema_batch_stats=bump(state.ema_batch_stats, 0.75))
  workdir = tmp_path_factory.mktemp("export_run")
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(STEP, state, data={"image_shape": list(IMAGE_SHAPE), "total_steps": 10},
            config=config)
  ckpt.wait()
  ckpt.close()
  return workdir, state


def _bytes_read() -> int:
  metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
  return sum(v["value"] for m in metrics for v in m["values"])


def _nbytes(tree) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_load_encoder_reads_only_its_network(run, tmp_path):
  """After the optimizer state, the queue and the online network are deleted from the
  checkpoint's OCDBT store, load_encoder still restores the target backbone, bit for bit, and
  reads no more than its arrays' bytes plus metadata (a full restore reads more than twice that);
  the normalisation is Fashion-MNIST's."""
  workdir, state = run
  shutil.copytree(workdir, tmp_path / "run")
  store = tmp_path / "run" / checkpoint.CHECKPOINT_DIR / str(STEP) / "state"
  kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": str(store)}}
                       ).result()
  gone = ("opt_state.", "queue.", "params.", "batch_stats.")
  for prefix in gone:
    kv.delete_range(ts.KvStore.KeyRange(prefix.encode(), prefix[:-1].encode() + b"/")).result()
  keys = [k.decode() for k in kv.list().result()]
  assert keys and all(k.startswith(("ema_", "step")) for k in keys), keys[:5]

  before = _bytes_read()
  enc = jaxcontrast.load_encoder(tmp_path / "run")
  read = _bytes_read() - before
  expected = {"params": state.ema_params["backbone"],
              "batch_stats": state.ema_batch_stats["backbone"]}
  _assert_same(enc.variables, expected)
  encoder_bytes = _nbytes(expected)
  total_bytes = _nbytes(state)
  assert total_bytes > 2.5 * encoder_bytes
  assert read <= encoder_bytes + 64 * 1024, (read, encoder_bytes)
  assert enc.step == STEP and enc.image_shape == IMAGE_SHAPE and enc.which == "target"
  assert enc.mean == pytest.approx((0.2860,)) and enc.std == pytest.approx((0.3530,))
  # The module computes the features of the whole encoder's backbone.
  images = np.random.default_rng(0).uniform(size=(2,) + IMAGE_SHAPE).astype(np.float32)
  model = encoders.encoder_module(enc.config.model, "projection")
  # Jitted: one compiled program instead of one per layer op run eagerly.
  full = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {"params": {"backbone": expected["params"], "projector": state.ema_params["projector"]},
       "batch_stats": {"backbone": expected["batch_stats"]}}, (images - 0.2860) / 0.3530)
  enc_proj = jaxcontrast.load_encoder(workdir, features="projection")
  np.testing.assert_allclose(enc_proj.encode(images), full, rtol=1e-6, atol=1e-6)


# As if not installed: `import` fails, importlib.util.find_spec says None (etils asks it).
_WITHOUT_TENSORFLOW = """
import json, sys
sys.modules.update(tensorflow=None, tensorflow_datasets=None)
import jaxcontrast
given, looked_up = (jaxcontrast.load_encoder(path) for path in sys.argv[1:])
try:
  import jaxcontrast.data.pipeline
  blocked = None
except ImportError as e:
  blocked = str(e)
print(json.dumps(dict(given=[given.mean, given.std], looked_up=[looked_up.mean, looked_up.std],
                      blocked=blocked)))
"""


def test_load_encoder_without_tensorflow(run, tmp_path):
  """With TensorFlow and tfds unimportable, load_encoder restores a run with the statistics its
  config gives (data.mean / data.std), or else its dataset's; the input pipeline does not import
  there (the blocker works)."""
  workdir, _ = run
  shutil.copytree(workdir, tmp_path / "run")
  config_item = tmp_path / "run" / checkpoint.CHECKPOINT_DIR / str(STEP) / "config" / "metadata"
  saved = json.loads(config_item.read_text())
  saved["data"].update(mean=[0.5], std=[0.25])
  config_item.write_text(json.dumps(saved))
  proc = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path / "run"),
                         str(workdir)], capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["given"] == [[0.5], [0.25]]
  assert result["looked_up"] == [[0.2860], [0.3530]]     # Fashion-MNIST's
  assert "tensorflow" in result["blocked"]


def test_load_encoder_online_projection(run):
  workdir, state = run
  enc = jaxcontrast.load_encoder(workdir, step=STEP, which="online", features="projection")
  _assert_same(enc.variables["params"], {"backbone": state.params["backbone"],
                                         "projector": state.params["projector"]})
  _assert_same(enc.variables["batch_stats"], {"backbone": state.batch_stats["backbone"]})
  with pytest.raises(ValueError, match="No checkpoint at step 7"):
    jaxcontrast.load_encoder(workdir, step=7)
  with pytest.raises(ValueError, match="which must be one of"):
    jaxcontrast.load_encoder(workdir, which="ema")


def _torch_layout(variables):
  """Independent of torch_weights: the expected safetensors entries, by hand."""
  out = {}
  for path, leaf in _leaves(variables["params"]):
    names = [p.key for p in path]
    mods = [{"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(n, n)
            for n in names[:-1]]
    mods = [m.replace("_", ".") if m.startswith("layer") else m for m in mods]
    leaf = np.asarray(leaf)
    if names[-1] == "kernel":
      out[".".join(mods + ["weight"])] = np.transpose(leaf, (3, 2, 0, 1))
    else:
      out[".".join(mods + [{"scale": "weight", "bias": "bias"}[names[-1]]])] = leaf
  for path, leaf in _leaves(variables["batch_stats"]):
    names = [p.key for p in path]
    mods = [{"downsample_bn": "downsample.1"}.get(n, n) for n in names[:-1]]
    mods = [m.replace("_", ".") if m.startswith("layer") else m for m in mods]
    out[".".join(mods + [{"mean": "running_mean", "var": "running_var"}[names[-1]]])] = \
        np.asarray(leaf)
  return out


def test_export_import_round_trip(run, tmp_path):
  """torchvision export: torchvision's names and OIHW layout (checked against a by-hand
  mapping), no fc; importing it gives the exported variables bit for bit; the flax export
  reads back bit for bit."""
  workdir, state = run
  out = tmp_path / "r10.safetensors"
  meta = export.export(workdir, out=out, fmt="torchvision")
  # What the command prints: the code that loads the file into torchvision.
  assert (f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}), strict=False)"
          in export.summary(meta, out, "torchvision"))
  tensors = load_file(str(out))
  variables = {"params": state.ema_params["backbone"],
               "batch_stats": state.ema_batch_stats["backbone"]}
  by_hand = _torch_layout(variables)
  tracked = {k for k in tensors if k.endswith("num_batches_tracked")}
  assert set(tensors) - tracked == set(by_hand)
  assert tracked == {k.replace("running_mean", "num_batches_tracked")
                     for k in by_hand if k.endswith("running_mean")}
  for k, v in by_hand.items():
    assert tensors[k].dtype == np.float32 and np.array_equal(tensors[k], v), k
  assert tensors["conv1.weight"].shape == (8, 1, 3, 3)   # width 1/8, 1 channel, CIFAR stem
  assert all(int(tensors[k]) == STEP for k in tracked)
  imported = torch_weights.from_torchvision(torch_weights.read_state_dict(out), variables)
  _assert_same(imported, variables)

  out = tmp_path / "enc.msgpack"
  export.export(workdir, out=out, fmt="flax", which="online", features="projection")
  module, restored, meta = export.read_flax(out)
  _assert_same(restored, {"params": {"backbone": state.params["backbone"],
                                     "projector": state.params["projector"]},
                          "batch_stats": {"backbone": state.batch_stats["backbone"]}})
  assert meta["image_shape"] == list(IMAGE_SHAPE) and meta["step"] == STEP
  y = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1,) + IMAGE_SHAPE), train=False),
                     restored)   # shapes only: traced, not compiled
  assert y.shape == (1, 16)   # the tiny projector's width
  # The flax export is also accepted wherever PyTorch weights are (probe, init_from).
  online = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
  _assert_same(torch_weights.from_torchvision(torch_weights.read_state_dict(out), online),
               online)


def test_export_command(run, tmp_path):
  """`python -m jaxcontrast.export` (subprocesses, started together): the format follows --out's
  suffix, --config.KEY sets the network, features and step, and the files equal `export`'s; a
  workdir without a checkpoint, an --out whose suffix names no format and a missing --out are
  each one line on stderr, exit status 2, and write nothing."""
  workdir, _ = run
  empty = tmp_path / "empty"
  empty.mkdir()
  out = tmp_path / "out"
  commands = {
      "flax": [f"--workdir={workdir}", f"--out={out / 'enc.msgpack'}", "--config.which=online",
               "--config.features=projection", f"--config.step={STEP}"],
      "no_checkpoint": [f"--workdir={empty}", f"--out={out / 'a.safetensors'}"],
      "no_format": [f"--workdir={workdir}", f"--out={out / 'a.pt'}"],
      "no_out": [f"--workdir={workdir}"],
  }
  env = dict(os.environ, PYTHONPATH=REPO)
  started = {name: subprocess.Popen([sys.executable, "-m", "jaxcontrast.export", *args], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
  results = {}
  for name, proc in started.items():
    stdout, stderr = proc.communicate(timeout=600)
    results[name] = (proc.returncode, stdout, stderr)
  code, stdout, stderr = results["flax"]
  assert code == 0, stderr[-3000:]
  assert f"wrote {out / 'enc.msgpack'} and {out / 'enc.json'}: online encoder" in stdout
  export.export(workdir, out=tmp_path / "ref.msgpack", fmt="flax", which="online",
                features="projection")
  _, restored, meta = export.read_flax(out / "enc.msgpack")
  assert (meta["which"], meta["features"], meta["step"]) == ("online", "projection", STEP)
  _assert_same(restored, export.read_flax(tmp_path / "ref.msgpack")[1])

  errors = {}
  for name in ("no_checkpoint", "no_format", "no_out"):
    code, _, stderr = results[name]
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    errors[name] = lines[0]
  assert f"No checkpoint in {empty}" in errors["no_checkpoint"]
  assert "config format = None" in errors["no_format"] and "a.pt" in errors["no_format"]
  assert "--out" in errors["no_out"]
  assert sorted(p.name for p in out.iterdir()) == ["enc.json", "enc.msgpack"]


def test_export_settings_errors(run, tmp_path):
  """The settings' ConfigErrors, each naming the key and value; `export` raises the same types
  for a bad format or a missing step."""
  c = export.default_export_config()
  assert export.validate(c, "r.safetensors") == "torchvision"
  assert export.validate(c, "gs://b/r.msgpack") == "flax"
  c.format = "flax"
  assert export.validate(c, "weights.bin") == "flax"
  for key, value, out, match in (
      ("format", None, "r.pt", r"config format = None: expected .*--out 'r\.pt'.*"
                               r"\.safetensors -> torchvision, \.msgpack -> flax"),
      ("format", "onnx", "r.onnx", r"config format = 'onnx'"),
      ("features", "projection", "r.safetensors", r"config features = 'projection': expected "
                                                  r"'backbone' with format torchvision"),
      ("which", "ema", "r.msgpack", r"config which = 'ema': expected one of"),
      ("step", -1, "r.msgpack", r"config step = -1")):
    c = export.default_export_config()
    c[key] = value
    with pytest.raises(ConfigError, match=match):
      export.validate(c, out)
  workdir, _ = run
  with pytest.raises(ConfigError, match="format must be one of"):
    export.export(workdir, out=tmp_path / "a", fmt="onnx")
  with pytest.raises(CheckpointNotFoundError, match="No checkpoint at step 7"):
    export.export(workdir, out=tmp_path / "a.msgpack", fmt="flax", step=7)
  assert not list(tmp_path.iterdir())


def _template(arch, stem="imagenet", channels=3, size=32):
  from jaxcontrast.models import build_resnet
  model = build_resnet(arch, stem=stem)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                           train=False))


def _random_state_dict(template, seed=0):
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), template)
  return variables, torch_weights.to_torchvision(variables)


def test_moco_checkpoint_prefix_and_mismatch(tmp_path):
  """A MoCo v1/v2 state dict (query encoder under module.encoder_q., key encoder, queue and
  fc head beside it) loads as its query backbone; a mismatched architecture names the first
  key in torchvision's order with both shapes."""
  template = _template("resnet18", stem="cifar")
  variables, sd = _random_state_dict(template)
  _, other = _random_state_dict(template, seed=1)
  moco = {f"module.encoder_q.{k}": v for k, v in sd.items()}
  moco.update({f"module.encoder_k.{k}": v for k, v in other.items()})
  moco["module.encoder_q.fc.0.weight"] = np.ones((2048, 512), np.float32)
  moco["module.encoder_q.fc.2.bias"] = np.ones((128,), np.float32)
  moco["module.queue"] = np.zeros((128, 16), np.float32)
  path = tmp_path / "moco.safetensors"
  save_file(moco, str(path))
  state_dict = torch_weights.read_state_dict(path)
  assert torch_weights.infer_model_config(state_dict) == dict(
      arch="resnet18", stem="cifar", width=1.0, norm="batch", in_channels=3)
  _assert_same(torch_weights.from_torchvision(state_dict, template), variables)
  assert torch_weights.backbone_state_dict({"state_dict": moco}).keys() == state_dict.keys()

  # ResNet-18 weights into a ResNet-10: layer1.1 is the first key in torchvision's order.
  with pytest.raises(ValueError, match=r"first: layer1\.1\.conv1\.weight \(shape "
                                       r"\(64, 64, 3, 3\)\) in the PyTorch weights has no place"):
    torch_weights.from_torchvision(state_dict, _template("resnet10", stem="cifar"))
  # CIFAR stem weights into an ImageNet-stem model: conv1 comes first, both shapes named.
  with pytest.raises(ValueError, match=r"first: conv1\.weight has shape \(64, 3, 3, 3\) in the "
                                       r"PyTorch weights but the model expects \(64, 3, 7, 7\)"):
    torch_weights.from_torchvision(state_dict, _template("resnet18"))
  del state_dict["layer4.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"first: layer4\.1\.bn2\.running_var is missing"):
    torch_weights.from_torchvision(state_dict, template)


def test_torchvision_code_for_cifar_stem():
  ctor, code = torch_weights.torchvision_model("resnet18", "cifar", 1.0, "batch", 3)
  assert ctor == "torchvision.models.resnet18"
  assert "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in code
  assert "model.maxpool = torch.nn.Identity()" in code
  assert torch_weights.torchvision_model("resnet50", "imagenet", 2.0)[0] is None


def test_init_from_sets_both_backbones(run, tmp_path):
  workdir, state = run
  template = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
  variables, sd = _random_state_dict(template, seed=3)
  path = tmp_path / "w.safetensors"
  save_file({f"module.encoder_q.{k}": v for k, v in sd.items()}, str(path))
  new = torch_weights.init_state_from(state, path)
  for params, stats in ((new.params, new.batch_stats), (new.ema_params, new.ema_batch_stats)):
    _assert_same({"params": params["backbone"], "batch_stats": stats["backbone"]}, variables)
  _assert_same(new.params["projector"], state.params["projector"])
  _assert_same(new.ema_params["projector"], state.ema_params["projector"])
  _assert_same(new.opt_state, state.opt_state)
  del workdir


def test_probe_torchvision_encoder_matches_target(run, tmp_path):
  """The exported target backbone, probed as torchvision:PATH, embeds as the target does."""
  from jaxcontrast.sharding import make_mesh
  workdir, _ = run
  out = tmp_path / "r10.safetensors"
  export.export(workdir, out=out, fmt="torchvision")
  mesh = make_mesh()
  target = encoders.load_probe_encoder(workdir, encoder="target", mesh=mesh)
  theirs = encoders.load_probe_encoder(workdir, encoder=f"torchvision:{out}", mesh=mesh,
                                       image_shape=IMAGE_SHAPE)
  assert theirs.run_config.model.arch == "resnet10" and theirs.step is None
  images = jnp.asarray(np.random.default_rng(0).standard_normal((8,) + IMAGE_SHAPE), jnp.float32)
  np.testing.assert_array_equal(theirs.apply_fn(theirs.variables, images),
                                target.apply_fn(target.variables, images))


def _fixture():
  with gzip.open(os.path.join(FIXTURES, "torchvision_features.json.gz"), "rt") as f:
    return json.load(f)


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_imagenet"])
def test_forward_matches_torchvision(name):
  """Our eval-mode features equal torchvision's (computed by benchmarks/torchvision_features.py
  with torch from the same exported weights) to 1e-4, and our export has exactly torchvision's
  state-dict keys and shapes (fc aside)."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
  try:
    import torchvision_features as tvf  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  fixture = _fixture()
  case = fixture["cases"][name]
  variables = tvf.variables(tvf.CASES[name])
  exported = torch_weights.to_torchvision(variables)
  assert [[k, list(v.shape)] for k, v in exported.items()] == case["state_dict"]
  theirs = tvf.decode(case["features"], case["shape"])
  ours = tvf.jax_features(tvf.CASES[name], variables)[:, :theirs.shape[1]]
  assert np.max(np.abs(theirs)) > 0.1
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=fixture["tolerance"])


def test_probe_config_for_torchvision_weights():
  from jaxcontrast.eval import config as probe_config_lib
  c = probe_config_lib.default_probe_config()
  c.encoder = "torchvision:/w/moco_v2_800ep.pth.tar"
  with pytest.raises(ConfigError, match=r"config data\.dataset = None: expected the data set"):
    probe_config_lib.validate(c)
  c.data.dataset = "imagenet2012"
  probe_config_lib.validate(c)
  assert probe_config_lib.output_stem(c) == "linear_probe_torchvision_moco_v2_800ep"
  c.encoder = "target"
  with pytest.raises(ConfigError, match=r"config data\.dataset = 'imagenet2012': expected None: "
                     r"data\.\* applies to encoder='torchvision:PATH' only"):
    probe_config_lib.validate(c)
  assert jaxcontrast.load_encoder is encoders.load_encoder
