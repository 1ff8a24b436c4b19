#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: tpu_pod.sh sends this file to every worker of the slice
# with each `gcloud ... ssh --worker=all` and runs one action there. Not meant to be run by hand.
#
#   setup COMMIT INSTALL_STAMP [PYTHON]   unpack ~/jaxcontrast.tar.gz into ~/jaxcontrast/code
#       unless that commit is there already; build ~/jaxcontrast/.venv unless INSTALL_STAMP
#       (a hash of the constraints and the package metadata) matches the one that built it
#       (PYTHON: use that interpreter's environment instead of building one); print the
#       worker's VERSIONS line and RUNNING if its trainer is running (then nothing changes).
#   start COMMIT COORDINATOR WORKERS -- ARGS...   start `python -m jaxcontrast.main ARGS`
#       detached from the SSH session (own session, SIGHUP ignored, no terminal, output
#       appended to ~/jaxcontrast/train.log); COORDINATOR (host:port, or - for JAX's TPU
#       auto-detection) with WORKERS adds --coordinator_address/--num_processes/--process_id.
#   status                      whether the trainer runs, and the log's last line
#   stop TIMEOUT                SIGTERM to the trainer (it saves a checkpoint and exits); waits
#                               up to TIMEOUT seconds for it to end
#   follow                      worker 0's log, until its trainer ends
#
# Files in ~/jaxcontrast: code/ (the shipped tree), .venv/, code.stamp, install.stamp, versions,
# train.log (every start appends), train.pid (the trainer's session id), train.exit (its exit
# status). Nothing here deletes train.log or a workdir; code/ holds no logs.
set -euo pipefail
home="$HOME/jaxcontrast"
mkdir -p "$home"
cd "$home"
# The worker number: GKE sets TPU_WORKER_ID; a TPU VM tells it through its metadata server.
worker="${TPU_WORKER_ID:-$(curl -s -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}"

trainer_pid() {   # the running trainer's session id, or nothing
  local pid
  pid="$(cat train.pid 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    grep -q jaxcontrast.main "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
  return 0
}

last_line() {     # the log's last line (a progress bar's carriage returns cut)
  [ -f train.log ] && tail -n 1 train.log | tr '\r' '\n' | grep -v '^$' | tail -n 1
  return 0
}

action="$1"; shift
case "$action" in
  setup)
    commit="$1" stamp="$2" python="${3:-}"
    pid="$(trainer_pid)"
    if [ -n "$pid" ]; then
      echo "RUNNING worker $worker pid $pid"
    else
      if [ "$(cat code.stamp 2>/dev/null || true)" = "$commit" ]; then
        echo "[worker $worker] code: $commit already there"
      else
        rm -rf code.new && mkdir code.new
        tar xzf "$HOME/jaxcontrast.tar.gz" -C code.new
        rm -rf code && mv code.new code
        echo "$commit" > code.stamp
        echo "[worker $worker] code: unpacked $commit"
      fi
      if [ "$(cat install.stamp 2>/dev/null || true)" = "$stamp" ] && [ -x .venv/bin/python ]; then
        echo "[worker $worker] environment: .venv already built for $stamp"
      else
        rm -rf .venv install.stamp versions
        if [ -n "$python" ]; then
          mkdir -p .venv/bin
          printf '#!/bin/sh\nexec %q "$@"\n' "$python" > .venv/bin/python
          chmod +x .venv/bin/python
        else
          python3 -m venv .venv
          .venv/bin/pip install -q --upgrade pip
          .venv/bin/pip install -q -c code/launch/constraints.txt -e 'code[train,tpu]'
        fi
        (cd code && ../.venv/bin/python -c '
import importlib.metadata as m, jax, jaxlib
def version(name):
  try:
    return m.version(name)
  except m.PackageNotFoundError:
    return "none"
print("VERSIONS", jax.__version__, jaxlib.__version__, version("libtpu"), jax.device_count())
') > versions
        echo "$stamp" > install.stamp
        echo "[worker $worker] environment: built .venv for $stamp"
      fi
    fi
    cat versions 2>/dev/null || echo "VERSIONS unknown"
    ;;
  start)
    commit="$1" coordinator="$2" workers="$3"; shift 4   # the 4th is --
    [ -z "$(trainer_pid)" ] || { echo "[worker $worker] a trainer is running already" >&2; exit 1; }
    args=("$@")
    if [ "$coordinator" != - ]; then
      args+=("--coordinator_address=$coordinator" "--num_processes=$workers"
             "--process_id=$worker")
    fi
    echo "[tpu_pod] $(date -u '+%Y-%m-%d %H:%M:%S') worker $worker starts $commit:" \
         "python -m jaxcontrast.main ${args[*]}" >> train.log
    rm -f train.pid train.exit
    # setsid: a session of its own, out of reach of the SSH session's SIGHUP; nohup: SIGHUP
    # ignored as well; stdin from /dev/null and output to the log, so that no pipe to the SSH
    # client is left open. The shell stays to record the exit status; `trap : TERM` keeps it
    # alive through --stop's SIGTERM to the session (Python saves, then exits).
    cd code
    PYTHONUNBUFFERED=1 setsid nohup bash -c '
      echo $$ > "$HOME/jaxcontrast/train.pid"
      trap : TERM INT
      status=0
      ../.venv/bin/python -m jaxcontrast.main "$@" || status=$?
      echo "$status" > "$HOME/jaxcontrast/train.exit"
      echo "[tpu_pod] $(date -u "+%Y-%m-%d %H:%M:%S") worker '"$worker"' trainer exited $status"
    ' jaxcontrast_trainer "${args[@]}" >> "$home/train.log" 2>&1 < /dev/null &
    cd "$home"
    for _ in $(seq 100); do [ -s train.pid ] && break; sleep 0.1; done
    echo "[worker $worker] started: session $(cat train.pid), log ~/jaxcontrast/train.log"
    ;;
  status)
    pid="$(trainer_pid)"
    if [ -n "$pid" ]; then state="running (session $pid)"
    elif [ -f train.exit ]; then state="exited $(cat train.exit)"
    elif [ -f train.log ]; then state="not running"
    else state="never started"; fi
    echo "worker $worker: $state | $(last_line)"
    ;;
  stop)
    timeout="$1"
    pid="$(trainer_pid)"
    if [ -z "$pid" ]; then
      echo "worker $worker: no trainer running | $(last_line)"
      exit 0
    fi
    kill -TERM -- "-$pid"
    for _ in $(seq "$((timeout * 2))"); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "worker $worker: still running ${timeout}s after SIGTERM | $(last_line)"
      exit 1
    fi
    echo "worker $worker: exited $(cat train.exit 2>/dev/null || echo '?') | $(last_line)"
    ;;
  follow)
    pid="$(trainer_pid)"
    # From the last start on.
    from="$(grep -n '^\[tpu_pod\] .* starts ' train.log 2>/dev/null | tail -n 1 | cut -d: -f1)"
    if [ -n "$pid" ]; then
      tail -n "+${from:-1}" -F --pid="$pid" train.log 2>/dev/null
    else
      tail -n "+${from:-1}" train.log 2>/dev/null || echo "[worker $worker] no log yet"
    fi
    ;;
  *) echo "tpu_worker.sh: unknown action $action" >&2; exit 2 ;;
esac
