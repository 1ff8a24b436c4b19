#!/usr/bin/env python3
"""Fake SLURM (`sbatch`, `srun`, `scontrol requeue`, `scancel`) for tests/test_launchers.py:
the job's nodes are local processes.

State lives under $FAKE_SLURM_ROOT (required): `jobs/ID/` holds the submitted script (copied at
submission, as SLURM does), `spec.json`, `state` (RUNNING, COMPLETED, FAILED, REQUEUED),
`batch.pid`, `tasks.pids`, `exit` and `restarts`; `nodeN/tmp` is node N's TMPDIR.

  sbatch SCRIPT     reads the #SBATCH lines (--job-name, --nodes, --ntasks-per-node,
                    --gpus-per-node, --time, --requeue, --signal, --output, --open-mode,
                    --partition, --account); prints `Submitted batch job ID` and runs the script
                    in the background, in the submission directory, with the submitting
                    environment plus the batch step's SLURM_* variables; output to --output
                    (%j: job id, %x: job name), truncated unless --open-mode=append.
  srun [--kill-on-bad-exit[=1]] CMD...   inside a job: one task per node x task per node, each
                    a process in a session of its own (a real task runs under slurmd, not in the
                    batch shell's process group), with SLURM_PROCID, SLURM_LOCALID,
                    SLURM_NODEID, SLURM_NTASKS, SLURM_STEP_NODELIST, SLURM_STEP_NUM_NODES,
                    SLURM_STEP_ID, SLURMD_NODENAME, TMPDIR per node; SIGTERM, SIGINT, SIGHUP,
                    SIGUSR1 and SIGUSR2 are passed on to every task; with --kill-on-bad-exit a
                    task failing kills the others. Exits with the highest task status.
  scontrol requeue ID   a preemption of a --requeue job: SIGTERM to the batch shell (what
                    --signal=B:TERM and the grace period give), SIGKILL to what is left after
                    $FAKE_SLURM_GRACE seconds (120), then the same job again: same ID, same
                    script, SLURM_RESTART_COUNT + 1.
  scancel [--batch] [--signal=SIG] ID   --batch --signal=TERM: the signal to the batch shell
                    only (what --signal=B:TERM@120 sends before the time limit); plain: SIGTERM
                    to the batch shell and every task, SIGKILL after the grace period.

Nodes are named 127.0.0.1, 127.0.0.2, ... (`SLURM_JOB_NODELIST=127.0.0.[1-N]`, SLURM's hostlist
form): all loopback addresses of this machine, so JAX's SLURM detection finds the coordinator
on the first node at its usual port, SLURM_JOB_ID % 4096 + 61440. Job ids are chosen so that
port is free.
"""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "HUP": signal.SIGHUP,
           "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2, "KILL": signal.SIGKILL}


def fail(tool, message, code=1):
  print(f"{tool}: error: {message}", file=sys.stderr)
  sys.exit(code)


def root(tool):
  r = os.environ.get("FAKE_SLURM_ROOT")
  if not r:
    fail(tool, "FAKE_SLURM_ROOT is not set (this is the test fake of SLURM)", 2)
  os.makedirs(os.path.join(r, "jobs"), exist_ok=True)
  return r


def job_dir(r, job_id):
  return os.path.join(r, "jobs", str(job_id))


def write(path, text):
  with open(path, "w") as f:
    f.write(str(text))


def read(path, default=""):
  try:
    with open(path) as f:
      return f.read().strip()
  except FileNotFoundError:
    return default


def port_free(port):
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def nodelist(nodes):
  return "127.0.0.1" if nodes == 1 else f"127.0.0.[1-{nodes}]"


SBATCH_OPTIONS = {"--job-name": "job_name", "-J": "job_name", "--nodes": "nodes", "-N": "nodes",
                  "--ntasks-per-node": "tasks_per_node", "--gpus-per-node": None,
                  "--time": None, "-t": None, "--signal": "signal", "--output": "output",
                  "-o": "output", "--open-mode": "open_mode", "--partition": None, "-p": None,
                  "--account": None, "-A": None}


def parse_sbatch(lines, spec):
  for line in lines:
    for word in shlex.split(line):
      if word == "--requeue":
        spec["requeue"] = True
        continue
      name, eq, value = word.partition("=")
      if name not in SBATCH_OPTIONS or not eq:
        fail("sbatch", f"option not faked: {word}", 2)
      if SBATCH_OPTIONS[name]:
        spec[SBATCH_OPTIONS[name]] = value


def sbatch(args):
  r = root("sbatch")
  if len(args) != 1:
    fail("sbatch", "the fake takes just the script: put options in #SBATCH lines", 2)
  script = open(args[0]).read()
  lines = []
  for line in script.splitlines()[1:]:
    if line.startswith("#SBATCH"):
      lines.append(line[len("#SBATCH"):])
    elif line.strip() and not line.startswith("#"):
      break   # sbatch stops reading options at the first command
  spec = {"job_name": os.path.basename(args[0]), "nodes": "1", "tasks_per_node": "1",
          "output": "slurm-%j.out", "open_mode": "truncate", "requeue": False, "signal": ""}
  parse_sbatch(lines, spec)
  spec["nodes"], spec["tasks_per_node"] = int(spec["nodes"]), int(spec["tasks_per_node"])
  counter = os.path.join(r, "next_job_id")
  job_id = int(read(counter, str(1000 + os.getpid() % 3000)))
  while not port_free(job_id % 4096 + 61440) or os.path.exists(job_dir(r, job_id)):
    job_id += 1
  write(counter, job_id + 1)
  d = job_dir(r, job_id)
  os.makedirs(d)
  write(os.path.join(d, "script"), script)
  spec.update(cwd=os.getcwd(), env=dict(os.environ))
  write(os.path.join(d, "spec.json"), json.dumps(spec))
  write(os.path.join(d, "restarts"), 0)
  start_job(job_id)
  print(f"Submitted batch job {job_id}")


def start_job(job_id):
  write(os.path.join(job_dir(root("sbatch"), job_id), "state"), "RUNNING")
  subprocess.Popen([sys.executable, os.path.abspath(__file__), "__job__", str(job_id)],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, start_new_session=True)


def run_job(job_id):
  """The batch step on the first node."""
  r = root("sbatch")
  d = job_dir(r, job_id)
  spec = json.loads(read(os.path.join(d, "spec.json")))
  restarts = int(read(os.path.join(d, "restarts"), "0"))
  nodes, per_node = spec["nodes"], spec["tasks_per_node"]
  env = dict(spec["env"])
  env.update({
      "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id),
      "SLURM_JOB_NAME": spec["job_name"], "SLURM_JOB_NODELIST": nodelist(nodes),
      "SLURM_NODELIST": nodelist(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
      "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
      "SLURM_NPROCS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
      "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_SUBMIT_DIR": spec["cwd"],
      "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURMD_NODENAME": "127.0.0.1", "SLURM_CLUSTER_NAME": "fake",
      "FAKE_SLURM_JOB_DIR": d, "TMPDIR": node_tmp(d, 0)})
  if restarts:
    env["SLURM_RESTART_COUNT"] = str(restarts)
  output = spec["output"].replace("%j", str(job_id)).replace("%x", spec["job_name"])
  output = os.path.join(spec["cwd"], output)
  mode = "a" if spec["open_mode"] == "append" else "w"
  script = os.path.join(d, "script")
  with open(output, mode) as out:
    batch = subprocess.Popen(["bash", script], cwd=spec["cwd"], env=env,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
  write(os.path.join(d, "batch.pid"), batch.pid)
  code = batch.wait()
  if (read(os.path.join(d, "state")) == "REQUEUED" or
      int(read(os.path.join(d, "restarts"), "0")) != restarts):
    return   # requeued: the next run of the job records its own end
  write(os.path.join(d, "exit"), code if code >= 0 else 128 - code)
  write(os.path.join(d, "state"), "COMPLETED" if code == 0 else "FAILED")


def node_tmp(d, node):
  path = os.path.join(d, f"node{node}", "tmp")
  os.makedirs(path, exist_ok=True)
  return path


def srun(args):
  d = os.environ.get("FAKE_SLURM_JOB_DIR")
  if not d or "SLURM_JOB_ID" not in os.environ:
    fail("srun", "not inside a job (the fake does not allocate)", 2)
  kill_on_bad_exit = False
  while args and args[0].startswith("-"):
    if args[0] in ("--kill-on-bad-exit", "--kill-on-bad-exit=1", "-K", "-K1"):
      kill_on_bad_exit = True
    else:
      fail("srun", f"option not faked: {args[0]}", 2)
    args = args[1:]
  if not args:
    fail("srun", "no command", 2)
  nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
  per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
  steps = os.path.join(d, "steps")
  step = int(read(steps, "0"))
  write(steps, step + 1)
  tasks = []
  for t in range(nodes * per_node):
    node = t // per_node
    env = dict(os.environ)
    env.pop("FAKE_SLURM_JOB_DIR")
    env.update({
        "SLURM_PROCID": str(t), "SLURM_LOCALID": str(t % per_node), "SLURM_NODEID": str(node),
        "SLURMD_NODENAME": f"127.0.0.{node + 1}", "SLURM_STEP_ID": str(step),
        "SLURM_STEPID": str(step), "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"],
        "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", "TMPDIR": node_tmp(d, node)})
    tasks.append(subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                  start_new_session=True))
  write(os.path.join(d, "tasks.pids"), " ".join(str(p.pid) for p in tasks))

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in tasks:
      if p.poll() is None:
        p.send_signal(signum)

  for s in FORWARDED:
    signal.signal(s, forward)
  codes = {}
  while len(codes) < len(tasks):
    for i, p in enumerate(tasks):
      if i not in codes and p.poll() is not None:
        codes[i] = p.returncode if p.returncode >= 0 else 128 - p.returncode
        if codes[i] and kill_on_bad_exit:
          print(f"srun: error: task {i}: exited with status {codes[i]}; killing the others",
                file=sys.stderr, flush=True)
          for q in tasks:
            if q.poll() is None:
              q.kill()
    time.sleep(0.1)
  sys.exit(max(codes.values()))


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def ours(pid, d):
  for name in ("cmdline", "environ"):
    try:
      with open(f"/proc/{pid}/{name}", "rb") as f:
        if d.encode() in f.read():
          return True
    except OSError:
      pass
  return False


def end_job(d, grace):
  """Waits for the batch shell up to `grace` seconds, then SIGKILLs it and every task."""
  batch = int(read(os.path.join(d, "batch.pid"), "0"))
  deadline = time.time() + grace
  while batch and alive(batch) and time.time() < deadline:
    time.sleep(0.2)
  pids = [batch] + [int(p) for p in read(os.path.join(d, "tasks.pids")).split()]
  for pid in pids:
    # Still this job's (its command line or environment names the job's folder), not a
    # process that reused the pid.
    if pid and alive(pid) and ours(pid, d):
      try:
        os.killpg(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def signal_batch(d, signum):
  batch = int(read(os.path.join(d, "batch.pid"), "0"))
  if batch and alive(batch):
    os.kill(batch, signum)


def scontrol(args):
  r = root("scontrol")
  if len(args) != 2 or args[0] != "requeue":
    fail("scontrol", "the fake knows only `scontrol requeue ID`", 2)
  d = job_dir(r, args[1])
  spec = json.loads(read(os.path.join(d, "spec.json"), "{}") or "{}")
  if not spec:
    fail("scontrol", f"Invalid job id specified: {args[1]}")
  if not spec.get("requeue"):
    fail("scontrol", f"job {args[1]} was not submitted with --requeue")
  write(os.path.join(d, "state"), "REQUEUED")
  signal_batch(d, signal.SIGTERM)
  end_job(d, float(os.environ.get("FAKE_SLURM_GRACE", "120")))
  write(os.path.join(d, "restarts"), int(read(os.path.join(d, "restarts"), "0")) + 1)
  start_job(int(args[1]))


def scancel(args):
  r = root("scancel")
  batch_only, signum = False, None
  rest = []
  for a in args:
    if a in ("--batch", "-b"):
      batch_only = True
    elif a.startswith("--signal="):
      signum = SIGNALS[a.split("=", 1)[1].removeprefix("SIG")]
    else:
      rest.append(a)
  if len(rest) != 1:
    fail("scancel", "give one job id", 2)
  d = job_dir(r, rest[0])
  if not os.path.isdir(d):
    fail("scancel", f"Invalid job id specified: {rest[0]}")
  if batch_only or signum is not None:
    if not batch_only:
      fail("scancel", "the fake sends --signal only with --batch", 2)
    signal_batch(d, signum or signal.SIGKILL)
    return
  signal_batch(d, signal.SIGTERM)
  for pid in read(os.path.join(d, "tasks.pids")).split():
    if alive(int(pid)):
      os.kill(int(pid), signal.SIGTERM)
  end_job(d, float(os.environ.get("FAKE_SLURM_GRACE", "120")))


def main():
  tool, args = sys.argv[1], sys.argv[2:]
  if tool == "__job__":
    run_job(int(args[0]))
  else:
    {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel}[tool](args)


if __name__ == "__main__":
  main()
