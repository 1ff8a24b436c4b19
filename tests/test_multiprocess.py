"""Two processes x 4 CPU devices against one process x 8 devices, through the entry points;
preemption of a multi-process job launched by launch/gpu_slurm.sh; resume on another process and
device count.

The processes talk over localhost (JAX's distributed runtime, gloo collectives on CPU), as TPU
pod workers or SLURM tasks do over the network. With the same `data.streams` both layouts train
on the same global batches, so they must give the same losses, kNN accuracy, final state and
linear probe: the pod's Shuffle BN permutation, sharded queue and gradient all-reduce cross the
process boundary here. Each multi-process run is a few subprocesses (~20 s of CPU each for
imports, the input pipeline and compiling), so the module runs the pretraining once per layout
and checks everything on those runs: the 2 x 4 run is a SLURM job (fakes of sbatch / srun /
scontrol in tests/fakes/ run its tasks as local processes), preempted (SIGTERM to both tasks)
and requeued, and must still end where the uninterrupted 1 x 8 run ends; its step-4 checkpoint
is resumed as 2 x 2 and as 1 x 8. A SIGTERM to one process of two is tested with the TPU launcher
(tests/test_launchers.py).
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from etils import epath

import pod_helpers
from jaxcontrast.run import checkpoint
from test_data_helpers import prepared_fashion_dir
from test_run_units import truncate_array_data

ROOT = epath.Path(__file__).parent.parent
STEPS = 8
# The pod configuration: Shuffle BN and the sharded queue, both across processes, and the
# photometric augmentation in the step (uint8 views from tf.data).
# 8 images per device: BatchNorm over 2 (tiny's batch 16 on 8 devices) has an analytically
# zero input gradient, left as rounding noise that differs with the all-reduce order.
QUEUE = 128
OVERRIDES = {"global_batch_size": 64, "queue.size": QUEUE, "data.streams": 2,
             "data.train_split": "train[:256]", "data.eval_split": "test[:48]",
             "total_steps": STEPS, "checkpoint_every": 4, "keep_checkpoints": 3,
             "bn.mode": "shuffle",
             "queue.mode": "sharded", "queue.store_ids": True, "knn_every": STEPS,
             "knn.num_train": 64, "knn.k": 5, "knn.batch_size": 16, "data.threadpool_size": 0,
             "data.augment_on": "device"}
LATE_S = 35     # > gloo's 30 s (see `_task_python`)
PROBE = ("encoder=target", "protocol=full_batch", "train_split=train[:64]",
         "test_split=test[:48]", "batch_size=16", "full_batch.l2_grid=(0.01,)",
         "full_batch.max_iter=30")


def _start(module: str, args: list[str], *, processes: int, log_dir: epath.Path,
           devices: int = 8):
  """Starts `python -m module args` as `processes` processes of `devices / processes` CPU
  devices each; returns (Popen objects, their log files: stdout + stderr)."""
  env = dict(pod_helpers.separate_compile_cache(os.environ), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT),
             XLA_FLAGS=pod_helpers.process_xla_flags(devices // processes))
  extra = [[]]
  if processes > 1:
    port = pod_helpers.free_port()
    extra = [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}", "--distributed_timeout=60"] for i in range(processes)]
  logs = [log_dir / f"{module.split('.')[-1]}_{processes}x{devices // processes}_{i}.log"
          for i in range(len(extra))]
  procs = [subprocess.Popen([sys.executable, "-m", module, *args, *more], cwd=str(ROOT), env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
           for more, log in zip(extra, logs)]
  return procs, logs


def _wait(module: str, procs, logs, *, timeout: int = 900) -> list[str]:
  """The outputs of `procs`; fails the test with the logs if one fails or runs past `timeout`."""
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


def _launch(module: str, args: list[str], *, processes: int, log_dir: epath.Path,
            timeout: int = 900, **kw) -> list[str]:
  """Runs `python -m module args` as `processes` processes (see `_start`); their outputs."""
  procs, logs = _start(module, args, processes=processes, log_dir=log_dir, **kw)
  return _wait(module, procs, logs, timeout=timeout)


def _main_args(workdir, data_dir, **changes) -> list[str]:
  return ["--config", "configs/moco_fashion_mnist.py:tiny", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in dict(OVERRIDES, **changes).items())]


def _reference(workdir, data_dir, **changes):
  """1 process x 8 devices: this test process, through what the entry points call."""
  from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
  from jaxcontrast.run import pretrain  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.update_from_flattened_dict(dict(OVERRIDES, **{"data.data_dir": data_dir}, **changes))
  pretrain.train_and_evaluate(config, workdir)


def _probe(workdir, data_dir):
  """The probe's command line, parsed as its entry point does, then what its main runs."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from jaxcontrast.eval import linear_probe  # pylint: disable=g-import-not-at-top
  argv = ["probe", f"--config.data_dir={data_dir}", *(f"--config.{o}" for o in PROBE)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", linear_probe.config_lib.default_probe_config(),
                                  flag_values=fv, sys_argv=argv)
  fv(argv)
  linear_probe.run_probes(workdir, fv.config)


def _task_python(venv: pathlib.Path, late_s: float) -> None:
  """`venv/bin/python`, the cluster's shared environment: this test's Python, except that task 1
  of the job's first start runs through tests/late_compile.py and reaches its first train step
  `late_s` seconds late (it prints a line saying so). That is longer than gloo waits for a peer
  at the first collective (30 s): the run passes only because every process waits for the
  others after compiling (`pretrain.compile_on_every_process`); without that wait process 0
  fails at its first step ("GetKeyValue() timed out" in gloo's set-up)."""
  (venv / "bin").mkdir(parents=True)
  python = venv / "bin" / "python"
  late = ROOT / "tests" / "late_compile.py"
  python.write_text(
      "#!/bin/sh\n"
      'if [ "$SLURM_PROCID" = 1 ] && [ -z "$SLURM_RESTART_COUNT" ] && [ "$1" = -m ]; then\n'
      "  shift\n"
      f'  PYTHONPATH="{ROOT}" exec "{sys.executable}" "{late}" {late_s} "$@"\n'
      "fi\n"
      f'exec "{sys.executable}" "$@"\n')
  python.chmod(0o755)


def _slurm_scenario(base: pathlib.Path, workdir: pathlib.Path, data_dir: str) -> dict:
  """The 2 x 4 run as a SLURM job through launch/gpu_slurm.sh (2 nodes x 1 task of 4 devices;
  the fakes set the `SLURM_*` variables JAX's cluster detection reads): preempted once process 0
  has logged step 1 (`scontrol requeue`: SIGTERM to the batch shell, which forwards it to both
  tasks, as SLURM signals every task), then queued again with the same job id: the restart
  resumes and runs to the end. Returns what the scenario showed."""
  env = pod_helpers.fake_env("FAKE_SLURM_ROOT", base / "slurm")
  env["FAKE_SLURM_GRACE"] = str(pod_helpers.WAIT)
  # JAX logs the devices each process drives ("visible devices: ...") at INFO, which the entry
  # point hides unless asked.
  env["JAXCONTRAST_VERBOSE"] = "1"
  _task_python(base / "venv", LATE_S)
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "gpu_slurm.sh"), "--nodes", "2", "--gpus_per_node", "4",
       "--venv", str(base / "venv"), "--config", "configs/moco_fashion_mnist.py:tiny",
       "--workdir", str(workdir), "--data_dir", data_dir,
       *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), "--distributed_timeout=120"],
      env=env, cwd=str(base), capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
  log = base / f"jaxcontrast-{job}.out"
  jobdir = base / "slurm" / "jobs" / job

  def current():
    return pod_helpers.since_last_start(pod_helpers.read(log),
                                        r"\[gpu_slurm\] \S+ \S+ job \d+ start")

  seen = {}
  try:
    pod_helpers.wait_for("training progress",
                         lambda: pod_helpers.last_step(current(), STEPS) >= 1, logs=[log])
    requeue = subprocess.run(["scontrol", "requeue", job], env=env, cwd=str(base),
                             capture_output=True, text=True, timeout=pod_helpers.WAIT + 60,
                             check=False)
    assert requeue.returncode == 0, requeue.stdout + requeue.stderr
    seen["checkpoints_after_requeue"] = pod_helpers.checkpoints(workdir)
    pod_helpers.wait_for(
        "the requeued job's end",
        lambda: pod_helpers.read(jobdir / "state") in ("COMPLETED", "FAILED"), logs=[log])
  finally:
    pod_helpers.kill_sessions([jobdir / "batch.pid", jobdir / "tasks.pids"], marker=base)
  seen["state"], seen["exit"] = pod_helpers.read(jobdir / "state"), pod_helpers.read(jobdir / "exit")
  seen["log"] = pod_helpers.read(log)
  return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{processes: (workdir, what the run showed, the probe's outputs)} for 1 x 8 (in this
  process) and 2 x 4 (the SLURM job of `_slurm_scenario`), each pretrained, then probed;
  "data_dir": the data."""
  data_dir = prepared_fashion_dir()
  one = epath.Path(tmp_path_factory.mktemp("run_1x8"))
  base = pathlib.Path(tmp_path_factory.mktemp("slurm"))
  two = epath.Path(base / "workdir")   # the job's workdir
  # The job's tasks import and compile on both cores, then task 1 sleeps for LATE_S while task 0
  # waits for it: this process trains and probes the reference during that sleep.
  outcome = {}

  def job():
    try:
      outcome["seen"] = _slurm_scenario(base, base / "workdir", data_dir)
    except BaseException as e:  # pylint: disable=broad-exception-caught
      outcome["error"] = e      # pytest.fail's exception too: raised again in this thread

  thread = threading.Thread(target=job)
  thread.start()
  try:
    pod_helpers.wait_for("the late task's sleep", lambda: not thread.is_alive() or any(
        "late_compile:" in pod_helpers.read(p) for p in base.glob("jaxcontrast-*.out")))
    if "error" not in outcome:
      _reference(one, data_dir)
      _probe(one, data_dir)
  finally:
    thread.join()
  if "error" in outcome:
    raise outcome["error"]
  probe = _launch("jaxcontrast.eval.linear_probe",
                  ["--workdir", str(two), f"--config.data_dir={data_dir}",
                   *(f"--config.{o}" for o in PROBE)], processes=2, log_dir=two)
  return {1: (one, None, None), 2: (two, outcome["seen"], probe), "data_dir": data_dir}


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _final_state(workdir, step=STEPS):
  run = checkpoint.load_run(workdir, step=step)   # on this process's 8 devices
  ckpt = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  data, _ = ckpt.saved_json(step)
  ckpt.close()
  return jax.tree.map(np.asarray, run.state), data


def _assert_states_close(s1, s2, *, rel=2e-3):
  """Every float leaf within 1e-6 + `rel` x its largest entry; the rest equal."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree.leaves(s2)):
    if np.issubdtype(a.dtype, np.floating):
      scale = float(np.max(np.abs(a), initial=0.0))
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 + rel * scale,
                                 err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_two_processes_train_like_one(runs):
  """The 2 x 4 job, preempted and requeued, ends where the uninterrupted 1 x 8 run ends."""
  one, two = runs[1][0], runs[2][0]
  m1, m2 = _metrics(one), _metrics(two)
  assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, STEPS + 1))
  assert not (two / "metrics.jsonl.process1").exists()
  for a, b in zip(m1, m2):
    # Same batches, same programs on the same 8 devices; the all-reduces run over gloo instead
    # of in-process, so the sums may round differently: float32-level agreement (measured
    # 2026-12-03: at most 2.1e-7 relative over the 8 steps).
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, err_msg=f"step {a['step']}")
  assert sum("knn/top1" in r for r in m2) == 1
  for a, b in zip(m1, m2):
    if "knn/top1" in a:
      # Features a rounding apart can flip a near-tie: at most one of the 48 test images (equal
      # in every run so far).
      assert abs(a["knn/top1"] - b["knn/top1"]) <= 1 / 48 + 1e-9
  s1, d1 = _final_state(one)
  s2, d2 = _final_state(two)
  # Measured worst at step 8 (2026-12-03): 7e-7 of a leaf's largest entry (the optimizer's
  # momentum, which sums the steps' gradients whose all-reduce order differs).
  _assert_states_close(s1, s2, rel=2e-3)
  # The queue holds the same examples in the same rows: each process fed its own ids.
  np.testing.assert_array_equal(s1.queue.ids, s2.queue.ids)
  assert d1["examples_per_stream"] == d2["examples_per_stream"] == STEPS * 64 // 2
  assert (d1["process_count"], d2["process_count"]) == (1, 2)


def test_only_process_zero_reports(runs, resumed):
  """Process 0 writes config.json, metrics and TensorBoard (the files exist: the other process
  cannot be told apart by its files in a shared workdir, so its output is checked instead) and
  draws the progress and the kNN line; process 1 says only that it trains (the 2 x 2 resume,
  which logs each process to its own file and ends with the kNN monitor)."""
  workdir = runs[2][0]
  assert (workdir / "config.json").exists() and (workdir / "tensorboard").exists()
  _, logs = resumed
  assert all("(global batch 64, 4 devices, 2 processes)" in log for log in logs)
  assert "step 5/5 loss" in logs[0] and "kNN" in logs[0]
  assert "/5 loss" not in logs[1] and "kNN" not in logs[1]


def test_two_processes_probe_like_one(runs):
  results = {}
  for processes in (1, 2):
    workdir, _, printed = runs[processes]
    outputs = list(workdir.glob("linear_probe*.json"))
    assert len(outputs) == 1, outputs
    results[processes] = json.loads(outputs[0].read_text())
    if printed:
      assert "top1" in printed[0] and "top1" not in printed[1]   # process 0 prints
  # As for kNN: at most one of the 48 test images may flip (equal in every run so far).
  assert abs(results[1]["top1"] - results[2]["top1"]) <= 1 / 48 + 1e-9
  assert results[1]["num_train"] == 64 and results[1]["num_test"] == 48


def _queue_at(workdir, step, devices):
  """The sharded queue saved at `step`, as numpy, restored on `devices` devices of this process
  (the layout it was saved in when that is the saving run's device count)."""
  from jaxcontrast.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray,
                      checkpoint.load_run(workdir, step=step, mesh=make_mesh(devices)).state.queue)


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
  """The 2 x 4 run's step-4 checkpoint, alone in a fresh workdir, resumed for one step as 2 x 2
  (subprocesses: re-blocks the sharded queue from 8 to 4 devices across processes) and as 1 x 8
  (this process: both input streams in one process). The 2 x 2 workdir also holds the step-8
  checkpoint with its array data truncated (a partial copy): both processes must find it
  unreadable, set it aside and resume from step 4. Returns the workdirs and the 2 x 2 logs."""
  data_dir = runs["data_dir"]
  workdirs = {}
  for layout in ("2x2", "1x8"):
    workdirs[layout] = epath.Path(tmp_path_factory.mktemp(f"resume_{layout}"))
    shutil.copytree(runs[2][0] / "checkpoints" / "4", workdirs[layout] / "checkpoints" / "4")
  damaged = workdirs["2x2"] / "checkpoints" / str(STEPS)
  shutil.copytree(runs[2][0] / "checkpoints" / str(STEPS), damaged)
  truncate_array_data(damaged)
  procs, logs = _start("jaxcontrast.main", _main_args(workdirs["2x2"], data_dir, total_steps=5),
                       processes=2, devices=4, log_dir=workdirs["2x2"])
  try:
    _reference(workdirs["1x8"], data_dir, total_steps=5)
  finally:
    outputs = _wait("jaxcontrast.main", procs, logs)
  return workdirs, outputs


def _global_batch_ids(data_dir, step):
  """The image ids of the global batch of `step` (1-based), from the input pipeline read as one
  process reading both streams: what every layout with `data.streams=2` trains on."""
  from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
  from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.update_from_flattened_dict(dict(OVERRIDES, **{"data.data_dir": data_dir}))
  batches = pipeline.make_train_iterator(config.data, batch_size=64, seed=config.seed,
                                         process_index=0, process_count=1,
                                         start_example=(step - 1) * 64)
  return np.asarray(next(batches)["id"])


def test_resume_on_another_process_and_device_count(runs, resumed):
  """After one more step, every queue row that step did not write is the re-blocked saved
  queue (`reblock` of the gathered step-4 queue); the rows it wrote hold step 5's global batch
  in order (the input position is exact); the pointer moved by one step. The 1 x 8 resume
  computes step 5's loss as the uninterrupted run did."""
  from jaxcontrast.step import queue as queue_lib  # pylint: disable=g-import-not-at-top
  two, data_dir = runs[2][0], runs["data_dir"]
  resumed, _ = resumed   # the workdirs; the 2 x 2 logs are for the damaged-checkpoint test
  saved = _queue_at(two, 4, 8)
  # The reference ids are those the uninterrupted run pushed: after 8 steps of 8 rows into
  # blocks of 16, local rows 0-7 hold step 7 and rows 8-15 step 8, in global batch order.
  final = _queue_at(two, STEPS, 8).ids.reshape(8, 2, 8)
  np.testing.assert_array_equal(final[:, 0].reshape(-1), _global_batch_ids(data_dir, 7))
  np.testing.assert_array_equal(final[:, 1].reshape(-1), _global_batch_ids(data_dir, 8))
  step5_ids = _global_batch_ids(data_dir, 5)
  for layout, devices in (("2x2", 4), ("1x8", 8)):
    want = jax.tree.map(np.asarray, queue_lib.reblock(saved, 8, devices, batch=64, views=1))
    got = _queue_at(resumed[layout], 5, devices)
    per_device, block = 64 // devices, QUEUE // devices
    assert int(want.ptr) == (4 * per_device) % block
    written = (np.arange(QUEUE) % block - int(want.ptr)) % block < per_device
    np.testing.assert_array_equal(got.ids[written], step5_ids, err_msg=layout)
    np.testing.assert_array_equal(got.ids[~written], want.ids[~written], err_msg=layout)
    np.testing.assert_array_equal(got.keys[~written], want.keys[~written], err_msg=layout)
    assert int(got.ptr) == (int(want.ptr) + per_device) % block
    assert int(got.filled) == QUEUE
    if devices == 4:   # The layouts differ: the re-blocking moved rows.
      assert not np.array_equal(want.ids, saved.ids)
  (row,) = _metrics(resumed["1x8"])
  reference = {r["step"]: r for r in _metrics(two)}
  assert row["step"] == 5
  np.testing.assert_allclose(row["loss"], reference[5]["loss"], rtol=1e-5)
  for layout in resumed:
    ckpt = checkpoint.Checkpointer(resumed[layout], keep=None, read_only=True)
    data, _ = ckpt.saved_json(5)
    ckpt.close()
    assert data["examples_per_stream"] == 5 * 64 // 2, layout


def test_damaged_latest_checkpoint_is_set_aside_by_every_process(resumed):
  """The 2 x 2 resume found step 8 unreadable on both processes: process 0 warned naming it and
  moved it aside, both resumed from step 4 (with the exact input position) and saved step 5."""
  workdirs, logs = resumed
  workdir = workdirs["2x2"]
  assert f"skipping the damaged checkpoint {workdir / 'checkpoints' / str(STEPS)}" in logs[0]
  assert "resuming from the older checkpoint of step 4" in logs[0]
  for log in logs:
    assert "at step 4 (input: example 128 of each process)" in log, log[-3000:]
  assert [p.name for p in (workdir / "checkpoints_damaged").iterdir()] == [str(STEPS)]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [4, 5]


def test_slurm_tasks_find_each_other_and_their_devices(runs):
  seen = runs[2][1]
  starts = seen["log"].split("[gpu_slurm] ")[1:]
  assert len(starts) == 2 and "(restart 1)" in starts[1]
  for run in starts:
    # Both tasks joined one run through JAX's SLURM detection (no coordinator flags passed).
    assert "(global batch 64, 8 devices, 2 processes)" in run
    # Each task was given all of its node's 4 devices (JAX's SLURM default would be one).
    assert run.count("visible devices: 0,1,2,3") == 2, run[-3000:]
  # Task 1 of the first start reached its first step late (`_task_python`), the restart's not.
  assert starts[0].count("late_compile:") == 1 and "late_compile:" not in starts[1]


def test_preempted_tasks_save_the_same_step_and_the_requeued_job_resumes_exactly(runs):
  """SIGTERM to both tasks: both stop at one step, save it once, and exit 0; the requeued job
  resumes there with the exact input position and completes (its end state is compared with
  the uninterrupted 1 x 8 run in `test_two_processes_train_like_one`)."""
  seen = runs[2][1]
  saved = seen["checkpoints_after_requeue"]
  # The signal comes once step 1 is logged; on a busy machine the tasks may pass the scheduled
  # checkpoint of step 4 before they stop.
  stopped = saved[-1]
  assert 0 < stopped < STEPS and saved == [*range(4, stopped, 4), stopped], saved
  before, after = seen["log"].split("(restart 1)")
  assert re.findall(r"stopped by .*, at step (\d+)", before) == [str(stopped)] * 2, before[-3000:]
  assert before.count(f"saved the checkpoint of step {stopped}") == 2
  assert after.count(f"at step {stopped} (input: example {stopped * 32} of each process)") == 2
  assert (seen["state"], seen["exit"]) == ("COMPLETED", "0")
  # One process draws the progress, one prints the kNN line (which: `test_only_process_zero_
  # reports`), in the restart as well.
  assert after.count(f"step {STEPS}/{STEPS} loss") == 1 and after.count(" kNN ") == 1
