"""The cluster launchers, executed: launch/tpu_pod.sh and launch/gpu_slurm.sh run for real
against fakes of `gcloud` and of SLURM (tests/fakes/) whose workers / tasks are local processes.

Each launcher trains 2 workers x 4 CPU devices on the tiny config, is interrupted the way a pod
or a cluster interrupts it, and is run again: it must resume. The fakes stand in only for what
needs Google Cloud or a cluster (creating the VMs, SSH, the scheduler, installing the TPU
wheels: the workers use this test's Python); shipping the code, setting up the workers,
starting, detaching, stopping and resuming the trainers run as they do on a pod. Each scenario
is one sequence of multi-process runs shared by the tests of its module fixture.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_data_helpers import prepared_fashion_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"
STEPS = 200   # never reached: every run here is stopped by a signal
# The pod configuration of tests/test_multiprocess.py, one line of progress per step.
OVERRIDES = ["--config.global_batch_size=64", "--config.queue.size=128",
             "--config.data.streams=2", "--config.data.train_split=train[:256]",
             f"--config.total_steps={STEPS}", f"--config.checkpoint_every={STEPS}",
             "--config.knn_every=0", "--config.log_every=1", "--config.bn.mode=shuffle",
             "--config.queue.mode=sharded", "--config.data.threadpool_size=0",
             "--config.data.augment_on=device"]
WAIT = 300   # seconds for any one phase (a loaded machine: start-up is most of it)


def _env(fake_root_var, fake_root):
  """The caller's environment for a launcher: the fakes first on PATH, CPU JAX with 4 devices
  per process (each worker inherits it through the fake)."""
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)   # the workers import the code the launcher shipped / cd'd to
  # Without the suite's persistent compilation cache: 2-process runs of this scenario that
  # loaded their train step from a populated cache failed at the first step in 3 of 4 tries
  # (gloo: "Gloo context initialization failed: ... GetKeyValue() timed out"); none of those
  # that compiled it did.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 env.get("XLA_FLAGS", ""))
  env.update(PATH=f"{FAKES}{os.pathsep}{env['PATH']}", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(),
             **{fake_root_var: str(fake_root)})
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(what, predicate, timeout=WAIT, logs=()):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.5)
  tails = "\n".join(f"--- {p}:\n{_read(p)[-4000:]}" for p in logs)
  pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


def _read(path) -> str:
  try:
    return pathlib.Path(path).read_text(errors="replace")
  except FileNotFoundError:
    return ""


def _since_last_start(log: str, pattern: str) -> str:
  """The part of a log from the last match of `pattern` (a launcher's start line) on."""
  starts = list(re.finditer(pattern, log))
  return log[starts[-1].start():] if starts else ""


def _last_step(text: str) -> int:
  steps = re.findall(rf"^step (\d+)/{STEPS} ", text, flags=re.M)
  return int(steps[-1]) if steps else 0


def _checkpoints(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _kill_sessions(pid_files):
  """Ends what a failed scenario left running (each pid file names a process group)."""
  for f in pid_files:
    for pid in _read(f).split():
      try:
        os.killpg(int(pid), signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# TPU pod: launch/tpu_pod.sh against tests/fakes/gcloud.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpu(tmp_path_factory):
  """start --follow -> SSH dropped -> same command again (running: nothing started) -> --status
  -> --stop -> same command again (resumes) -> --stop. Returns what each phase showed."""
  data_dir = prepared_fashion_dir(tmp_path_factory)
  base = tmp_path_factory.mktemp("tpu_pod")
  workdir = base / "workdir"
  env = _env("FAKE_GCLOUD_ROOT", base / "gcloud")
  slice_ = ["--name", "pod", "--zone", "us-central2-b"]
  start = ["bash", str(ROOT / "launch" / "tpu_pod.sh"), *slice_, "--accelerator", "v4-16",
           "--expect_devices", "4", "--python", sys.executable,
           "--coordinator_address", f"127.0.0.1:{_free_port()}", "--shared_fs",
           "--config", "configs/moco_fashion_mnist.py:tiny", "--workdir", str(workdir),
           "--data_dir", data_dir, *OVERRIDES, "--distributed_timeout=120"]
  homes = [base / "gcloud" / "tpus" / "pod" / f"worker{w}" / "jaxcontrast" for w in (0, 1)]
  logs = [h / "train.log" for h in homes]

  def run(command):
    out = subprocess.run(command, env=env, cwd=base, capture_output=True, text=True,
                         timeout=2 * WAIT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout

  def ctl(*args):   # --status, --stop: the slice's name and zone are enough
    return run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), *slice_, *args])

  def current(w):   # worker w's log of its last start
    return _since_last_start(_read(logs[w]), r"\[tpu_pod\] \S+ \S+ worker \d+ starts ")

  def scenario():
    seen = {}
    # 1. Start, following worker 0's log as a user's terminal would.
    follow = subprocess.Popen([*start, "--follow"], env=env, cwd=base, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    printed = []
    threading.Thread(target=lambda: printed.extend(iter(follow.stdout.readline, "")),
                     daemon=True).start()
    try:
      _wait_for("training progress through --follow",
                lambda: _last_step("".join(printed)) >= 2, logs=logs)
    finally:
      # 2. The laptop goes away: the launcher, its gcloud ssh and all, killed at once.
      os.killpg(follow.pid, signal.SIGKILL)
      follow.wait()
    seen["followed"] = "".join(printed)
    seen["step_at_drop"] = _last_step(current(0))
    seen["pids"] = [int(_read(h / "train.pid")) for h in homes]
    seen["after_drop"] = _wait_for(
        "progress after the SSH session dropped",
        lambda: _last_step(current(0)) >= seen["step_at_drop"] + 2 and _last_step(current(0)),
        logs=logs)
    seen["alive_after_drop"] = [_alive(p) for p in seen["pids"]]
    seen["code_inode"] = [os.stat(h / "code").st_ino for h in homes]
    seen["venv_mtime"] = [os.stat(h / ".venv" / "bin" / "python").st_mtime_ns for h in homes]
    # 3. The same command while training runs; then --status.
    seen["start_while_running"] = run(start)
    seen["status"] = ctl("--status")
    # 4. --stop: SIGTERM to every trainer; they save and exit.
    seen["stop"] = ctl("--stop", "--stop_timeout", str(WAIT))
    seen["first_run"] = [current(w) for w in (0, 1)]
    seen["exits"] = [_read(h / "train.exit").strip() for h in homes]
    seen["checkpoints_after_stop"] = _checkpoints(workdir)
    # 5. The same command again: resumes; then stopped once more.
    seen["restart"] = run(start)
    saved = seen["checkpoints_after_stop"][-1] if seen["checkpoints_after_stop"] else 0
    _wait_for("progress after the resume", lambda: _last_step(current(0)) >= saved + 2, logs=logs)
    seen["stop_again"] = ctl("--stop", "--stop_timeout", str(WAIT))
    seen["second_run"] = [current(w) for w in (0, 1)]
    seen["checkpoints_at_end"] = _checkpoints(workdir)
    seen["logs"] = [_read(p) for p in logs]
    seen["code_inode_at_end"] = [os.stat(h / "code").st_ino for h in homes]
    seen["venv_mtime_at_end"] = [os.stat(h / ".venv" / "bin" / "python").st_mtime_ns
                                 for h in homes]
    seen["calls"] = [line.split("\t")[3] for line in
                     _read(base / "gcloud" / "calls.log").splitlines()]
    return seen

  try:
    yield scenario()
  finally:
    _kill_sessions([h / "train.pid" for h in homes])


def test_tpu_training_survives_a_dropped_ssh_session(tpu):
  assert "step 1/" in tpu["followed"] and "step 2/" in tpu["followed"]
  assert tpu["alive_after_drop"] == [True, True]
  # Still training, steps after the drop, on both workers (a step is a collective of both).
  assert tpu["after_drop"] >= tpu["step_at_drop"] + 2


def test_tpu_same_command_while_running_starts_nothing(tpu):
  out = tpu["start_while_running"]
  assert "running on all 2 workers: nothing started" in out
  assert out.count("RUNNING worker") == 2
  # One trainer per worker: the first run's trainers were stopped by the one --stop.
  assert all(log.count("] training moco") == 1 for log in tpu["first_run"])


def test_tpu_status_shows_each_worker(tpu):
  lines = [l for l in tpu["status"].splitlines() if l.startswith("worker ")]
  assert sorted(l.split(":")[0] for l in lines) == ["worker 0", "worker 1"]
  for line in lines:
    assert ": running (session " in line
  # Worker 0's last log line is its latest progress line.
  w0 = next(l for l in lines if l.startswith("worker 0"))
  assert re.search(rf"\| step \d+/{STEPS} loss", w0), w0


def test_tpu_stop_saves_a_checkpoint_and_exits(tpu):
  assert tpu["exits"] == ["0", "0"]
  saved = tpu["checkpoints_after_stop"]
  assert len(saved) == 1 and 0 < saved[0] < STEPS
  for log in tpu["first_run"]:   # every worker saved that same step
    assert f"saved the checkpoint of step {saved[0]}" in log
  assert sorted(re.findall(r"^worker (\d): exited 0 ", tpu["stop"], flags=re.M)) == ["0", "1"]


def test_tpu_same_command_resumes_and_reuses_the_setup(tpu):
  first = tpu["checkpoints_after_stop"][-1]
  for log in tpu["second_run"]:
    assert f"at step {first} (input: example {first * 32} of each process)" in log
    assert "resumed from" in log
  assert tpu["checkpoints_at_end"][-1] > first
  assert _last_step(tpu["second_run"][0]) > first
  # The tree and the environment were set up once: same inode, same file.
  assert tpu["code_inode_at_end"] == tpu["code_inode"]
  assert tpu["venv_mtime_at_end"] == tpu["venv_mtime"]
  assert tpu["restart"].count("code: ") == 2 and tpu["restart"].count("already there") == 2
  assert tpu["restart"].count("environment: .venv already built") == 2
  # The slice was created once and then reused; the logs of every start were kept.
  assert tpu["calls"].count("create") == 1 and "delete" not in tpu["calls"]
  for log in tpu["logs"]:
    assert log.count("] training moco") == 2 and log.count(" starts ") == 2


def test_tpu_pod_dry_run_runs_nothing(tmp_path):
  """--dry-run prints the commands of a start, in order, and calls no gcloud."""
  env = _env("FAKE_GCLOUD_ROOT", tmp_path)
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--name", "pod1", "--zone", "z",
       "--accelerator", "v4-32", "--spot", "--config", "configs/moco_imagenet2012.py",
       "--workdir", "gs://bucket/runs/moco", "--config.num_epochs=3", "--dry-run"],
      env=env, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / "calls.log").exists()
  steps = ["tpu-vm describe pod1", "tpu-vm create pod1", "git -C", "tpu-vm scp",
           "worker.sh setup", "worker.sh start"]
  lines = [l for l in out.stdout.splitlines() if l.startswith("+ ")]
  assert [s for s, l in zip(steps, lines) if s in l] == steps, out.stdout
  assert "--spot" in lines[1] and "end in 16 devices" in out.stdout   # v4-32: 16 chips


@pytest.mark.parametrize("accelerator,devices", [("v5litepod-64", 64), ("v5p-128", 64),
                                                 ("v3-8", 8)])
def test_tpu_pod_expected_device_count(accelerator, devices):
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--name", "p", "--zone", "z",
       "--accelerator", accelerator, "--config", "c.py", "--workdir", "gs://b/w", "--dry-run"],
      capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  assert f"end in {devices} devices" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--name", "p", "--zone", "z"], "missing --accelerator --config --workdir"),
    (["--name", "p", "--zone", "z", "--accelerator", "v4-8", "--config", "c.py",
      "--workdir", "/local/runs"], "give a gs:// path, or --shared_fs"),
    (["--name", "p", "--zone", "z", "--accelerator", "v4-8", "--config", "c.py",
      "--workdir", "runs", "--shared_fs"], "--workdir must be a gs:// path"),
    (["--name", "p", "--zone", "z", "--stop", "--stop_timeout", "0"], "--stop_timeout"),
    (["--zone", "z", "--status"], "missing --name"),
    (["--zone"], "--zone needs a value")])
def test_tpu_pod_rejects_bad_arguments(args, message, tmp_path):
  out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), *args],
                       env=_env("FAKE_GCLOUD_ROOT", tmp_path), capture_output=True, text=True,
                       timeout=60, check=False)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert not (tmp_path / "calls.log").exists()


# ---------------------------------------------------------------------------------------------
# SLURM: launch/gpu_slurm.sh against tests/fakes/{sbatch,srun,scontrol,scancel}.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  """sbatch (2 nodes x 1 task) -> preempted and requeued (scontrol requeue) -> resumes ->
  SIGTERM to the batch shell before the time limit (scancel --batch --signal=TERM)."""
  data_dir = prepared_fashion_dir(tmp_path_factory)
  base = tmp_path_factory.mktemp("slurm")
  workdir = base / "workdir"
  env = _env("FAKE_SLURM_ROOT", base / "slurm")
  env["FAKE_SLURM_GRACE"] = str(WAIT)
  # JAX logs the devices each process drives ("visible devices: ...") at INFO, which the entry
  # point hides unless asked.
  env["JAXCONTRAST_VERBOSE"] = "1"
  venv = base / "venv" / "bin"   # the cluster's shared environment: this test's Python
  venv.mkdir(parents=True)
  (venv / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (venv / "python").chmod(0o755)
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "gpu_slurm.sh"), "--nodes", "2", "--gpus_per_node", "4",
       "--venv", str(venv.parent), "--config", "configs/moco_fashion_mnist.py:tiny",
       "--workdir", str(workdir), "--data_dir", data_dir, *OVERRIDES,
       "--distributed_timeout=120"],
      env=env, cwd=base, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
  log = base / f"jaxcontrast-{job}.out"
  jobdir = base / "slurm" / "jobs" / job

  def ctl(*args):
    done = subprocess.run(list(args), env=env, cwd=base, capture_output=True, text=True,
                          timeout=WAIT + 60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

  def current():
    return _since_last_start(_read(log), r"\[gpu_slurm\] \S+ \S+ job \d+ start")

  def scenario():
    seen = {}
    _wait_for("training progress", lambda: _last_step(current()) >= 2, logs=[log])
    # Preempted: SIGTERM to the batch shell, then the job runs again (same id).
    ctl("scontrol", "requeue", job)
    seen["checkpoints_after_requeue"] = _checkpoints(workdir)
    saved = seen["checkpoints_after_requeue"][-1] if seen["checkpoints_after_requeue"] else 0
    _wait_for("progress after the requeue",
              lambda: "(restart 1)" in current() and _last_step(current()) >= saved + 2,
              logs=[log])
    # Near the time limit: SIGTERM to the batch shell (--signal=B:TERM@120); the job ends.
    ctl("scancel", "--batch", "--signal=TERM", job)
    _wait_for("the job's end", lambda: _read(jobdir / "state") in ("COMPLETED", "FAILED"),
              logs=[log])
    seen["state"], seen["exit"] = _read(jobdir / "state"), _read(jobdir / "exit")
    seen["log"] = _read(log)
    seen["checkpoints_at_end"] = _checkpoints(workdir)
    return seen

  try:
    yield scenario()
  finally:
    _kill_sessions([jobdir / "batch.pid", jobdir / "tasks.pids"])


def test_slurm_tasks_find_each_other_and_their_gpus(slurm):
  starts = slurm["log"].split("[gpu_slurm] ")[1:]
  assert len(starts) == 2 and "(restart 1)" in starts[1]
  for run in starts:
    # Both tasks joined one run through JAX's SLURM detection (no coordinator flags passed).
    assert "(global batch 64, 8 devices, 2 processes)" in run
    # Each task was given all of its node's 4 GPUs (JAX's SLURM default would be one).
    assert run.count("visible devices: 0,1,2,3") == 2, run[-3000:]


def test_slurm_requeued_job_resumes(slurm):
  first = slurm["checkpoints_after_requeue"]
  assert len(first) == 1 and 0 < first[0] < STEPS
  before, after = slurm["log"].split("(restart 1)")
  assert before.count(f"saved the checkpoint of step {first[0]}") == 2
  assert after.count(f"at step {first[0]} (input: example {first[0] * 32} of each process)") == 2
  last = slurm["checkpoints_at_end"][-1]
  assert last > first[0]
  assert after.count(f"saved the checkpoint of step {last}") == 2
  assert (slurm["state"], slurm["exit"]) == ("COMPLETED", "0")


def test_gpu_slurm_dry_run_submits_nothing(tmp_path):
  env = _env("FAKE_SLURM_ROOT", tmp_path)
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "gpu_slurm.sh"), "--nodes", "4", "--gpus_per_node", "8",
       "--partition", "gpu", "--config", "configs/sce_imagenet2012.py", "--workdir",
       "/shared/runs/sce", "--data_dir", "/shared/tfds", "--config.global_batch_size=4096",
       "--dry-run"], env=env, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / "jobs").exists() or not list((tmp_path / "jobs").iterdir())
  srun = next(l for l in out.stdout.splitlines() if l.startswith("srun "))
  for arg in ("--config=configs/sce_imagenet2012.py", "--workdir=/shared/runs/sce",
              "--config.data.data_dir=/shared/tfds", "--config.global_batch_size=4096"):
    assert arg in srun, arg
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out.stdout.splitlines()
  # One process per GPU: JAX's SLURM detection picks GPU SLURM_LOCALID in each task itself
  # (a CUDA_VISIBLE_DEVICES set in the batch shell would be the same for every task).
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "gpu_slurm.sh"), "--nodes", "2", "--gpus_per_node", "4",
       "--per_gpu", "--config", "c.py", "--workdir", "/w", "--dry-run"],
      env=env, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  assert "#SBATCH --ntasks-per-node=4" in out.stdout.splitlines()
  assert "JAX_LOCAL_DEVICE_IDS" not in out.stdout and "CUDA_VISIBLE_DEVICES" not in out.stdout


def test_gpu_slurm_rejects_bad_arguments():
  def run(*args):
    return subprocess.run(["bash", str(ROOT / "launch" / "gpu_slurm.sh"), *args],
                          capture_output=True, text=True, timeout=60, check=False)
  out = run("--nodes", "0", "--config", "c.py", "--workdir", "/w", "--dry-run")
  assert out.returncode == 2 and "positive ints" in out.stderr
  out = run("--nodes", "1", "--dry-run")
  assert out.returncode == 2 and "--config and --workdir are required" in out.stderr
