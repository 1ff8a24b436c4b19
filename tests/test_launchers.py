"""The cluster launchers, executed: launch/tpu_pod.sh and launch/gpu_slurm.sh run for real
against fakes of `gcloud` and of SLURM (tests/fakes/) whose workers / tasks are local processes.

The TPU launcher trains 2 workers x 4 CPU devices on the tiny config, is interrupted the way a
pod interrupts it (the user's SSH session drops; a maintenance event signals one VM; `--stop`),
and is run again: it must resume. The fakes stand in only for what needs Google Cloud (creating
the VMs, SSH, installing the TPU wheels: the workers use this test's Python); shipping the code,
setting up the workers, starting, detaching, stopping and resuming the trainers run as they do on
a pod. The scenario is one sequence of multi-process runs shared by the tests of its module
fixture. The SLURM launcher's executed scenario (a preempted, requeued job that resumes and ends
where an uninterrupted run ends) is in tests/test_multiprocess.py, next to the run it is
compared with; its dry runs and argument checks are here.
"""
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from pod_helpers import (ROOT, WAIT, alive, checkpoints, fake_env, free_port, kill_sessions, last_step,
                         read, since_last_start, wait_for)
from test_data_helpers import prepared_fashion_dir

STEPS = 200   # never reached: every run here is stopped by a signal
# The pod configuration of tests/test_multiprocess.py, one line of progress per step, at the tiny
# config's batch (2 images per device: nothing is compared across layouts here, and every phase
# waits for steps, which a smaller batch makes quicker).
BATCH = 16
OVERRIDES = [f"--config.global_batch_size={BATCH}", "--config.queue.size=128",
             "--config.data.streams=2", "--config.data.train_split=train[:256]",
             f"--config.total_steps={STEPS}", f"--config.checkpoint_every={STEPS}",
             "--config.knn_every=0", "--config.log_every=1", "--config.bn.mode=shuffle",
             "--config.queue.mode=sharded", "--config.data.threadpool_size=0",
             "--config.data.augment_on=device"]


def _last_step(text: str) -> int:
  return last_step(text, STEPS)


# ---------------------------------------------------------------------------------------------
# TPU pod: launch/tpu_pod.sh against tests/fakes/gcloud.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpu(tmp_path_factory):
  """start --follow -> SSH dropped -> same command again (running: nothing started) -> --status
  -> SIGTERM to worker 1 alone -> same command again (resumes) -> --stop. Returns what each phase
  showed."""
  data_dir = prepared_fashion_dir()
  base = tmp_path_factory.mktemp("tpu_pod")
  workdir = base / "workdir"
  env = fake_env("FAKE_GCLOUD_ROOT", base / "gcloud")
  env["TMPDIR"] = str(base / "tmp")   # where the launcher packs the code for `scp`
  (base / "tmp").mkdir()
  slice_ = ["--name", "pod", "--zone", "us-central2-b"]
  start = ["bash", str(ROOT / "launch" / "tpu_pod.sh"), *slice_, "--accelerator", "v4-16",
           "--expect_devices", "4", "--python", sys.executable,
           "--coordinator_address", f"127.0.0.1:{free_port()}", "--shared_fs",
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
    return since_last_start(read(logs[w]), r"\[tpu_pod\] \S+ \S+ worker \d+ starts ")

  def scenario():
    seen = {}
    # 1. Start, following worker 0's log as a user's terminal would.
    follow = subprocess.Popen([*start, "--follow"], env=env, cwd=base, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    printed = []
    threading.Thread(target=lambda: printed.extend(iter(follow.stdout.readline, "")),
                     daemon=True).start()
    try:
      wait_for("training progress through --follow",
                lambda: _last_step("".join(printed)) >= 2, logs=logs)
    finally:
      # 2. The laptop goes away: the launcher, its gcloud ssh and all, killed at once.
      os.killpg(follow.pid, signal.SIGKILL)
      follow.wait()
    seen["followed"] = "".join(printed)
    seen["step_at_drop"] = _last_step(current(0))
    seen["pids"] = [int(read(h / "train.pid")) for h in homes]
    seen["after_drop"] = wait_for(
        "progress after the SSH session dropped",
        lambda: _last_step(current(0)) >= seen["step_at_drop"] + 2 and _last_step(current(0)),
        logs=logs)
    seen["alive_after_drop"] = [alive(p) for p in seen["pids"]]
    seen["code_inode"] = [os.stat(h / "code").st_ino for h in homes]
    seen["venv_mtime"] = [os.stat(h / ".venv" / "bin" / "python").st_mtime_ns for h in homes]
    # 3. The same command while training runs; then --status.
    seen["start_while_running"] = run(start)
    seen["status"] = ctl("--status")
    # 4. A maintenance event on worker 1's VM: SIGTERM to its trainer alone (GCE signals one VM
    # of a slice). Both trainers save and exit.
    os.killpg(seen["pids"][1], signal.SIGTERM)
    seen["exits"] = wait_for("both trainers' exit", lambda: all(
        read(h / "train.exit").strip() for h in homes) and [
            read(h / "train.exit").strip() for h in homes], logs=logs)
    seen["first_run"] = [current(w) for w in (0, 1)]
    seen["checkpoints_after_signal"] = checkpoints(workdir)
    # 5. The same command again: resumes; then --stop (SIGTERM to every trainer).
    seen["restart"] = run(start)
    saved = seen["checkpoints_after_signal"][-1] if seen["checkpoints_after_signal"] else 0
    wait_for("progress after the resume", lambda: _last_step(current(0)) >= saved + 2, logs=logs)
    seen["stop"] = ctl("--stop", "--stop_timeout", str(WAIT))
    seen["exits_after_stop"] = [read(h / "train.exit").strip() for h in homes]
    seen["second_run"] = [current(w) for w in (0, 1)]
    seen["checkpoints_at_end"] = checkpoints(workdir)
    seen["logs"] = [read(p) for p in logs]
    seen["code_inode_at_end"] = [os.stat(h / "code").st_ino for h in homes]
    seen["venv_mtime_at_end"] = [os.stat(h / ".venv" / "bin" / "python").st_mtime_ns
                                 for h in homes]
    seen["archives_left"] = sorted(p.name for p in (base / "tmp").glob("*.tar.gz"))
    seen["calls"] = [line.split("\t")[3] for line in
                     read(base / "gcloud" / "calls.log").splitlines()]
    return seen

  try:
    yield scenario()
  finally:
    kill_sessions([h / "train.pid" for h in homes], marker=base)


def test_tpu_training_survives_a_dropped_ssh_session(tpu):
  assert "step 1/" in tpu["followed"] and "step 2/" in tpu["followed"]
  assert tpu["alive_after_drop"] == [True, True]
  # Still training, steps after the drop, on both workers (a step is a collective of both).
  assert tpu["after_drop"] >= tpu["step_at_drop"] + 2


def test_tpu_same_command_while_running_starts_nothing(tpu):
  out = tpu["start_while_running"]
  assert "running on all 2 workers: nothing started" in out
  assert out.count("RUNNING worker") == 2
  # One trainer per worker: the first run's trainers were stopped by the one signal.
  assert all(log.count("] training moco") == 1 for log in tpu["first_run"])


def test_tpu_status_shows_each_worker(tpu):
  lines = [l for l in tpu["status"].splitlines() if l.startswith("worker ")]
  assert sorted(l.split(":")[0] for l in lines) == ["worker 0", "worker 1"]
  for line in lines:
    assert ": running (session " in line
  # Worker 0's last log line is its latest progress line.
  w0 = next(l for l in lines if l.startswith("worker 0"))
  assert re.search(rf"\| step \d+/{STEPS} loss", w0), w0


def test_tpu_one_signalled_worker_stops_both_at_one_saved_step(tpu):
  """A SIGTERM to one worker's trainer: both processes stop at the same step (JAX's preemption
  sync point), save it once, together, and exit 0."""
  assert tpu["exits"] == ["0", "0"]
  saved = tpu["checkpoints_after_signal"]
  assert len(saved) == 1 and 0 < saved[0] < STEPS
  for log in tpu["first_run"]:
    assert f"saved the checkpoint of step {saved[0]}" in log
    assert re.findall(r"stopped by .*, at step (\d+)", log) == [str(saved[0])]


def test_tpu_stop_saves_a_checkpoint_and_exits(tpu):
  assert tpu["exits_after_stop"] == ["0", "0"]
  last = tpu["checkpoints_at_end"][-1]
  assert last > tpu["checkpoints_after_signal"][-1]
  for log in tpu["second_run"]:   # every worker saved that same step
    assert f"saved the checkpoint of step {last}" in log
  assert sorted(re.findall(r"^worker (\d): exited 0 ", tpu["stop"], flags=re.M)) == ["0", "1"]


def test_tpu_same_command_resumes_and_reuses_the_setup(tpu):
  first = tpu["checkpoints_after_signal"][-1]
  for log in tpu["second_run"]:
    assert f"at step {first} (input: example {first * BATCH // 2} of each process)" in log
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
  assert tpu["archives_left"] == []   # each start removed the code archive it copied
  for log in tpu["logs"]:
    assert log.count("] training moco") == 2 and log.count(" starts ") == 2


def test_tpu_pod_dry_run_runs_nothing(tmp_path):
  """--dry-run prints the commands of a start, in order, and calls no gcloud."""
  env = fake_env("FAKE_GCLOUD_ROOT", tmp_path)
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
                       env=fake_env("FAKE_GCLOUD_ROOT", tmp_path), capture_output=True, text=True,
                       timeout=60, check=False)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert not (tmp_path / "calls.log").exists()


# ---------------------------------------------------------------------------------------------
# SLURM: launch/gpu_slurm.sh against tests/fakes/{sbatch,srun,scontrol,scancel}.
# ---------------------------------------------------------------------------------------------


def test_gpu_slurm_dry_run_submits_nothing(tmp_path):
  env = dict(fake_env("FAKE_SLURM_ROOT", tmp_path / "slurm"), TMPDIR=str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "gpu_slurm.sh"), "--nodes", "4", "--gpus_per_node", "8",
       "--partition", "gpu", "--config", "configs/sce_imagenet2012.py", "--workdir",
       "/shared/runs/sce", "--data_dir", "/shared/tfds", "--config.global_batch_size=4096",
       "--dry-run"], env=env, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / "slurm" / "jobs").exists()
  assert not list((tmp_path / "tmp").iterdir())   # the script written for sbatch is removed
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


def test_cleanup_kills_only_the_scenarios_processes(tmp_path):
  """The scenarios' clean-up reads pid files after their processes may have ended; a pid the
  system has since given to another program (another session here) must survive it."""
  stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
  ours = subprocess.Popen(["sleep", "60"], start_new_session=True,
                          env=dict(os.environ, SCENARIO=str(tmp_path)))
  try:
    (tmp_path / "a.pid").write_text(str(stranger.pid))
    (tmp_path / "b.pids").write_text(f"{ours.pid}\n")
    kill_sessions([tmp_path / "a.pid", tmp_path / "b.pids"], marker=tmp_path)
    assert ours.wait(timeout=10) == -signal.SIGKILL
    assert stranger.poll() is None
  finally:
    stranger.kill()
    ours.kill()
