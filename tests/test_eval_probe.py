"""End to end on a real (tiny) pretraining run: linear probe with every encoder, the SGD
protocol with a resume, the kNN monitor against NumPy, and `semantic_pairs --workdir`.

One module-scoped workdir is made by the real loop (`pretrain.train_and_evaluate` on the tiny
MoCo Fashion-MNIST config, 2 steps on 64 images); everything else reads it.
"""
import fcntl
import json
import os

import jax
import numpy as np
import pytest

from jaxcontrast.eval import config as probe_config_lib
from jaxcontrast.eval import encoders
from jaxcontrast.eval import knn
from jaxcontrast.eval import linear_probe
from jaxcontrast.eval import sgd as sgd_lib
from jaxcontrast.run import checkpoint
from jaxcontrast.sharding import make_mesh
from test_eval_knn import numpy_knn_scores

SPLITS = {"train_split": "train[:256]", "test_split": "test[:128]", "batch_size": 128,
          "full_batch.max_iter": 50}


def _pretrain(path):
  from jaxcontrast import config_lib
  from jaxcontrast.run import pretrain
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.data.train_split = "train[:64]"
  config.total_steps = 2
  pretrain.train_and_evaluate(config, str(path))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The tiny run; under pytest-xdist made once per test session and shared by the workers
  (the tests write distinct files into it), so `-n 2` does not pretrain twice."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not uid:
    path = tmp_path_factory.mktemp("tiny_run")
    _pretrain(path)
    return path
  shared = tmp_path_factory.getbasetemp().parent
  path = shared / f"eval_tiny_run_{uid}"
  with open(shared / f"eval_tiny_run_{uid}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (path / "DONE").exists():
      _pretrain(path)
      (path / "DONE").write_text("")
    fcntl.flock(lock, fcntl.LOCK_UN)
  return path


def _probe(workdir, **overrides):
  """What `python -m jaxcontrast.eval.linear_probe --workdir DIR --config.KEY=VALUE ...` runs
  after parsing (its command line itself: test_cli.py)."""
  cfg = probe_config_lib.default_probe_config()
  cfg.update_from_flattened_dict({**SPLITS, **overrides})
  return linear_probe.run_probes(workdir, cfg)


def test_every_encoder(workdir):
  [result] = _probe(workdir)
  assert result["output"].endswith("linear_probe.json")
  target = json.loads((workdir / "linear_probe.json").read_text())
  assert target["encoder"] == "target" and target["step"] == 2
  assert target["protocol"] == "full_batch"   # auto: a small train split
  assert 0.1 < target["top1"] <= 1 and target["top1"] <= target["top5"] <= 1
  assert target["l2"] in target["probe_config"]["full_batch"]["l2_grid"]
  assert 0 <= target["held_out_top1"] <= 1 and target["held_out_size"] == 26
  assert target["num_train"] == 256 and target["num_test"] == 128
  assert target["feature_dim"] == 16   # ResNet-6 at width 1/8: 128 / 8
  results = _probe(workdir, encoder="random,pixels")   # two probes, one process
  assert [r["encoder"] for r in results] == ["random", "pixels"]
  for encoder in ("random", "pixels"):
    result = json.loads((workdir / f"linear_probe_{encoder}.json").read_text())
    assert result["encoder"] == encoder and 0.1 < result["top1"] <= 1
  assert json.loads((workdir / "linear_probe_pixels.json").read_text())["feature_dim"] == 256
  # The baselines did not overwrite the main result.
  assert json.loads((workdir / "linear_probe.json").read_text()) == target
  # "online" reads the query encoder's parameters (the probe code path is the target's).
  run = checkpoint.load_run(workdir)
  online = encoders.load_probe_encoder(workdir, encoder="online", mesh=make_mesh())
  same = lambda a, b: all(np.array_equal(x, y) for x, y in
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(online.variables["params"], run.state.params["backbone"])
  assert not same(online.variables["params"], run.state.ema_params["backbone"])


def test_sgd_protocol_resumes_exactly(workdir, tmp_path):
  """run_probes: 2 SGD steps (checkpointed); API: resume to 4 == 4 uninterrupted steps."""
  _probe(workdir, **{"protocol": "sgd", "sgd.batch_size": 16, "sgd.lr": 0.5,
                     "sgd.checkpoint_every": 2, "sgd.total_steps": 2})
  result = json.loads((workdir / "linear_probe_sgd.json").read_text())
  assert result["protocol"] == "sgd" and result["total_steps"] == 2 and 0 <= result["top1"] <= 1
  assert (workdir / "linear_probe_sgd" / "2").exists()

  cfg = probe_config_lib.default_probe_config()
  cfg.train_split = "train[:256]"
  cfg.sgd.update(batch_size=16, lr=0.5, checkpoint_every=2, total_steps=4)
  mesh = make_mesh()
  enc = encoders.load_probe_encoder(workdir, encoder="target", mesh=mesh)
  data_cfg = linear_probe.probe_data_config(enc.run_config, cfg)
  run = lambda directory: sgd_lib.train_linear_sgd(
      apply_fn=enc.apply_fn, variables=enc.variables, data_config=data_cfg, sgd_config=cfg.sgd,
      num_classes=10, num_train=256, mesh=mesh, checkpoint_dir=directory)
  resumed, info = run(workdir / "linear_probe_sgd")
  assert info["resumed_from"] == 2
  straight, info = run(tmp_path / "straight")
  assert info["resumed_from"] == 0
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_knn_monitor_matches_numpy(workdir):
  run = checkpoint.load_run(workdir)
  config = run.config
  config.data.eval_split = "test[:128]"
  config.knn.update(k=20, num_train=48, batch_size=32)
  monitor = knn.KnnMonitor(config, mesh=make_mesh(), model=run.models.target)
  assert monitor.memory_split == "train[0:48]"
  state = run.state
  got = monitor(state.ema_params, state.ema_batch_stats)
  extractor = monitor.extractor
  variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  x_mem, y_mem = extractor.host_features(variables, config.data, split="train[:48]",
                                         batch_size=32)
  x_q, y_q = extractor.host_features(variables, config.data, split="test[:128]", batch_size=32)
  scores = numpy_knn_scores(x_q, x_mem, y_mem, k=20, temperature=0.1, num_classes=10)
  assert got["knn/top1"] == pytest.approx(np.mean(scores.argmax(1) == y_q))
  assert 0 <= got["knn/top5"] <= 1 and got["knn/top5"] >= got["knn/top1"]


def test_semantic_pairs_from_workdir(workdir):
  from jaxcontrast.data import pairs as pairs_lib
  from jaxcontrast import semantic_pairs as sp
  from jaxcontrast.data import sepp
  c = sp.default_mining_config()
  c.update(threshold=0.5, top_k=5)
  sp.mine_to_file(c, str(workdir))
  pairs = pairs_lib.load_pairs(workdir)   # a workdir resolves to WORKDIR/semantic_pairs.npz
  assert pairs.n == 64 and pairs.k == 5
  assert pairs.metadata["embedding"].startswith("checkpoint:")
  assert pairs.metadata["step"] == 2 and "same_label_rate" in pairs.metadata
  np.testing.assert_array_equal(sepp.load_pair_indices(str(workdir)), pairs.indices)
