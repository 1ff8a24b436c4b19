"""Two processes x 4 CPU devices against one process x 8 devices, through the entry points.

The processes talk over localhost (JAX's distributed runtime, gloo collectives on CPU), as TPU
pod workers or SLURM tasks do over the network. With the same `data.streams` both runs train on
the same global batches, so they must give the same losses, kNN accuracy, final state and linear
probe: the pod's Shuffle BN permutation, sharded queue and gradient all-reduce cross the process
boundary here. Each run is a few subprocesses (~10 s of start-up each), so the module runs the
pretraining once per layout and checks everything on those two runs.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from jaxcontrast.run import checkpoint
from test_data_helpers import prepared_fashion_dir

ROOT = epath.Path(__file__).parent.parent
STEPS = 4
# The pod configuration: Shuffle BN and the sharded queue, both across processes, and the
# photometric augmentation in the step (uint8 views from tf.data).
# 8 images per device: BatchNorm over 2 (tiny's batch 16 on 8 devices) has an analytically
# zero input gradient, left as rounding noise that differs with the all-reduce order.
OVERRIDES = {"global_batch_size": 64, "queue.size": 128, "data.streams": 2,
             "data.train_split": "train[:256]", "data.eval_split": "test[:48]",
             "total_steps": STEPS, "checkpoint_every": STEPS, "bn.mode": "shuffle",
             "queue.mode": "sharded", "queue.store_ids": True, "knn_every": STEPS,
             "knn.num_train": 64, "knn.k": 5, "knn.batch_size": 16, "data.threadpool_size": 0,
             "data.augment_on": "device"}
PROBE = ("encoder=target", "protocol=full_batch", "train_split=train[:64]",
         "test_split=test[:48]", "batch_size=16", "full_batch.l2_grid=(0.01,)",
         "full_batch.max_iter=30")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(module: str, args: list[str], *, processes: int, log_dir: epath.Path,
            timeout: int = 240) -> list[str]:
  """Runs `python -m module args` as `processes` processes of 8 / processes CPU devices each;
  returns their outputs (stdout + stderr). Fails the test with the logs if one fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={8 // processes} "
                        "--xla_backend_optimization_level=0"))
  extra = [[]]
  if processes > 1:
    port = _free_port()
    extra = [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}", "--distributed_timeout=60"] for i in range(processes)]
  logs = [log_dir / f"{module.split('.')[-1]}_{processes}x{8 // processes}_{i}.log"
          for i in range(len(extra))]
  procs = [subprocess.Popen([sys.executable, "-m", module, *args, *more], cwd=str(ROOT), env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
           for more, log in zip(extra, logs)]
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text() for log in logs]
  if any(codes):
    pytest.fail(f"{module} exited {codes}:\n" + "\n".join(o[-3000:] for o in outputs))
  return outputs


def _reference(workdir, data_dir):
  """1 process x 8 devices: this test process, through what the entry points call."""
  from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import linear_probe  # pylint: disable=g-import-not-at-top
  from jaxcontrast.run import pretrain  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.update_from_flattened_dict(dict(OVERRIDES, **{"data.data_dir": data_dir}))
  pretrain.train_and_evaluate(config, workdir)
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # The probe's command line, parsed as its entry point does, then what its main runs.
  argv = ["probe", f"--config.data_dir={data_dir}", *(f"--config.{o}" for o in PROBE)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", linear_probe.config_lib.default_probe_config(),
                                  flag_values=fv, sys_argv=argv)
  fv(argv)
  linear_probe.run_probes(workdir, fv.config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{processes: (workdir, main's outputs, probe's outputs)} for 1 x 8 (in this process) and
  2 x 4 (`python -m` subprocesses), each pretrained, then probed."""
  data_dir = prepared_fashion_dir(tmp_path_factory)
  one = epath.Path(tmp_path_factory.mktemp("run_1x8"))
  _reference(one, data_dir)
  two = epath.Path(tmp_path_factory.mktemp("run_2x4"))
  args = ["--config", "configs/moco_fashion_mnist.py:tiny", "--workdir", str(two),
          f"--config.data.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  logs = _launch("jaxcontrast.main", args, processes=2, log_dir=two)
  probe = _launch("jaxcontrast.eval.linear_probe",
                  ["--workdir", str(two), f"--config.data_dir={data_dir}",
                   *(f"--config.{o}" for o in PROBE)], processes=2, log_dir=two)
  return {1: (one, None, None), 2: (two, logs, probe)}


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _final_state(workdir):
  run = checkpoint.load_run(workdir, step=STEPS)   # on this process's 8 devices
  ckpt = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  data, _ = ckpt.saved_json(STEPS)
  ckpt.close()
  return jax.tree.map(np.asarray, run.state), data


def test_two_processes_train_like_one(runs):
  one, two = runs[1][0], runs[2][0]
  m1, m2 = _metrics(one), _metrics(two)
  assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, STEPS + 1))
  assert not (two / "metrics.jsonl.process1").exists()
  for a, b in zip(m1, m2):
    # Same batches, same programs on the same 8 devices; the all-reduces run over gloo instead
    # of in-process, so the sums may round differently: float32-level agreement.
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, err_msg=f"step {a['step']}")
    if "knn/top1" in a:
      # Features a rounding apart can flip a near-tie: at most one of the 48 test images (equal
      # in every run so far).
      assert abs(a["knn/top1"] - b["knn/top1"]) <= 1 / 48 + 1e-9
  assert sum("knn/top1" in r for r in m2) == 1
  s1, d1 = _final_state(one)
  s2, d2 = _final_state(two)
  # The optimizer's momentum sums 4 steps of gradients whose all-reduce order differs: its
  # small entries differ most. Measured worst: 2.7e-4 of a leaf's largest entry (a BN bias'
  # momentum); tolerance 2e-3 of it.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree.leaves(s2)):
    if np.issubdtype(a.dtype, np.floating):
      scale = float(np.max(np.abs(a), initial=0.0))
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 + 2e-3 * scale,
                                 err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # The queue holds the same examples in the same rows: each process fed its own ids.
  np.testing.assert_array_equal(s1.queue.ids, s2.queue.ids)
  assert d1["examples_per_stream"] == d2["examples_per_stream"] == STEPS * 64 // 2
  assert (d1["process_count"], d2["process_count"]) == (1, 2)


def test_only_process_zero_reports(runs):
  """Process 0 writes config.json, metrics and TensorBoard (the files exist: the other process
  cannot be told apart by its files in a shared workdir, so its output is checked instead) and
  draws the progress; process 1 says only that it trains."""
  workdir, logs, _ = runs[2]
  assert (workdir / "config.json").exists() and (workdir / "tensorboard").exists()
  assert all("(global batch 64, 8 devices, 2 processes)" in log for log in logs)
  assert f"step {STEPS}/{STEPS} loss" in logs[0] and "kNN" in logs[0]
  assert "/4 loss" not in logs[1] and "kNN" not in logs[1]


def test_two_processes_probe_like_one(runs):
  results = {}
  for processes, (workdir, _, printed) in runs.items():
    outputs = list(workdir.glob("linear_probe*.json"))
    assert len(outputs) == 1, outputs
    results[processes] = json.loads(outputs[0].read_text())
    if printed:
      assert "top1" in printed[0] and "top1" not in printed[1]   # process 0 prints
  # As for kNN: at most one of the 48 test images may flip (equal in every run so far).
  assert abs(results[1]["top1"] - results[2]["top1"]) <= 1 / 48 + 1e-9
  assert results[1]["num_train"] == 64 and results[1]["num_test"] == 48
