"""What the multi-process tests share: the fakes of `gcloud` and SLURM on PATH, waiting on logs,
and reading what the launchers leave behind (tests/test_launchers.py, tests/test_multiprocess.py)."""
import os
import pathlib
import re
import signal
import socket
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"
WAIT = 300   # seconds for any one phase (a loaded machine: start-up is most of it)


def separate_compile_cache(env: dict) -> dict:
  """`env` with JAX's persistent compilation cache in a folder of its own inside the suite's,
  for multi-process runs: they load only what other multi-process runs compiled. 2-process
  TPU-launcher runs that loaded their programs from the suite's shared cache failed at the
  first step in 3 of 4 tries (gloo: "GetKeyValue() timed out"): a process that loads a program
  reaches its first collective long before one that compiles it, and gloo waits 30 s for a
  peer there. The train step is now waited for (`pretrain.compile_on_every_process`); the other
  programs' first runs (restore, kNN) are not, so the folders stay apart. Runs of one layout
  sharing the folder load what the first of them compiled."""
  env = dict(env)
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(env["JAX_COMPILATION_CACHE_DIR"],
                                                    "multiprocess")
  return env


def fake_env(fake_root_var, fake_root):
  """The caller's environment for a launcher: the fakes first on PATH, CPU JAX with 4 devices
  per process (each worker inherits it through the fake), the multi-process compilation cache."""
  env = separate_compile_cache(os.environ)
  env.pop("PYTHONPATH", None)   # the workers import the code the launcher shipped / cd'd to
  env.update(PATH=f"{FAKES}{os.pathsep}{env['PATH']}", JAX_PLATFORMS="cpu",
             XLA_FLAGS=process_xla_flags(4), **{fake_root_var: str(fake_root)})
  return env


def process_xla_flags(devices: int) -> str:
  """The suite's XLA_FLAGS (tests/conftest.py) with `devices` CPU devices per process. Runs that
  are compared must compile alike: the flags choose the CPU convolution kernels, whose rounding
  differs."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read(path) -> str:
  try:
    return pathlib.Path(path).read_text(errors="replace")
  except FileNotFoundError:
    return ""


def wait_for(what, predicate, timeout=WAIT, logs=()):
  """predicate()'s first true value, polled; fails the test with the logs' tails on timeout."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.5)
  tails = "\n".join(f"--- {p}:\n{read(p)[-4000:]}" for p in logs)
  pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


def since_last_start(log: str, pattern: str) -> str:
  """The part of a log from the last match of `pattern` (a launcher's start line) on."""
  starts = list(re.finditer(pattern, log))
  return log[starts[-1].start():] if starts else ""


def last_step(text: str, total: int) -> int:
  steps = re.findall(rf"^step (\d+)/{total} ", text, flags=re.M)
  return int(steps[-1]) if steps else 0


def checkpoints(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def started_under(pid: int, marker: str) -> bool:
  """True when process `pid` names `marker` (a scenario's temporary folder) in its command line
  or environment: a pid file outlives its process, and pids are reused (pid_max is 32,768 on
  the test VMs), so a recorded pid alone may now be another program's."""
  for name in ("cmdline", "environ"):
    try:
      if marker.encode() in pathlib.Path(f"/proc/{pid}/{name}").read_bytes():
        return True
    except OSError:
      pass
  return False


def kill_sessions(pid_files, *, marker):
  """Ends what a failed scenario left running: each pid file names process groups, killed only
  while their leader is still the scenario's (`started_under(pid, marker)`). Killing a stale
  pid's group ended the test runner's own shell once."""
  for f in pid_files:
    for pid in read(f).split():
      if not started_under(int(pid), str(marker)):
        continue
      try:
        os.killpg(int(pid), signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
