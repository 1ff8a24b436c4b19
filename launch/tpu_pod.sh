#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM pod slice. Training runs detached on every worker: closing the
# laptop or losing the SSH connection does not stop it.
#
#   bash launch/tpu_pod.sh --name my-v4 --zone us-central2-b --accelerator v4-32 \
#       --config configs/moco_imagenet2012.py --workdir gs://BUCKET/runs/moco \
#       --data_dir gs://BUCKET/tfds [--spot] [--project P] [--runtime tpu-ubuntu2204-base] \
#       [--expect_devices N] [--follow] [--dry-run] [--config.KEY=VALUE ...]
#   bash launch/tpu_pod.sh --name my-v4 --zone us-central2-b --status   # each worker's last log line
#   bash launch/tpu_pod.sh --name my-v4 --zone us-central2-b --follow   # worker 0's log
#   bash launch/tpu_pod.sh --name my-v4 --zone us-central2-b --stop     # SIGTERM: save, exit
#
# Start: creates the slice (or reuses it when READY; a preempted spot slice is recreated), ships
# HEAD of this checkout (`git archive`: commit first), sets up ~/jaxcontrast on every worker
# (the code unpacked only when the commit changed, .venv with the pinned versions and jax[tpu]
# built only when launch/constraints.txt or the package metadata changed), refuses to train
# unless every worker reports the same jax / jaxlib / libtpu versions and the slice's device
# count, then starts `python -m jaxcontrast.main` on every worker in a session of its own
# (setsid, nohup), logging to ~/jaxcontrast/train.log on each worker. --follow then shows worker
# 0's log until its trainer ends (Ctrl-C or a dropped connection leave training running).
# Re-running the same command resumes from the workdir's latest checkpoint; while the trainers
# run it starts nothing (with --follow it follows them). --stop sends SIGTERM to every trainer:
# they save a checkpoint at the same step and exit (run/preemption.py); --stop_timeout S (300)
# bounds the wait. Other arguments go to `python -m jaxcontrast.main`. --dry-run prints the
# commands instead of running them.
# --python PATH: use that interpreter's environment on every worker instead of building .venv
# (an image with the environment installed). --coordinator_address HOST:PORT: pass JAX the
# coordinator and process ids explicitly instead of its TPU auto-detection (the tests' fake
# slice). --shared_fs: allow a --workdir that is not gs://, on a filesystem every worker mounts.
# Data: `tfds build imagenet2012 --data_dir gs://BUCKET/tfds` once, from any machine with the
# ImageNet tarballs. Docs: docs/distributed.md, "Launchers".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

name="" zone="" accelerator="" runtime="tpu-ubuntu2204-base" project="" spot=0 dry=0
config="" workdir="" data_dir="" expect="" python="" coordinator="" shared_fs=0
action=start follow=0 stop_timeout=300 pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name|--zone|--accelerator|--runtime|--project|--config|--workdir|--data_dir|\
    --expect_devices|--python|--coordinator_address|--stop_timeout)
      [ $# -ge 2 ] || { echo "[tpu_pod] $1 needs a value" >&2; exit 2; }
      v="$2"
      case "$1" in
        --name) name="$v" ;; --zone) zone="$v" ;; --accelerator) accelerator="$v" ;;
        --runtime) runtime="$v" ;; --project) project="$v" ;; --config) config="$v" ;;
        --workdir) workdir="$v" ;; --data_dir) data_dir="$v" ;; --expect_devices) expect="$v" ;;
        --python) python="$v" ;; --coordinator_address) coordinator="$v" ;;
        --stop_timeout) stop_timeout="$v" ;;
      esac
      shift 2 ;;
    --spot|--preemptible) spot=1; shift ;;
    --dry-run|--dry_run) dry=1; shift ;;
    --follow) follow=1; shift ;;
    --status) action=status; shift ;;
    --stop) action=stop; shift ;;
    --shared_fs) shared_fs=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
# Without a config, --follow alone only follows.
[ "$action" = start ] && [ "$follow" = 1 ] && [ -z "$config" ] && [ -z "$workdir" ] &&
  [ ${#pass[@]} -eq 0 ] && action=follow
required=(name zone)
[ "$action" = start ] && required+=(accelerator config workdir)
missing=()
for flag in "${required[@]}"; do
  [ -n "${!flag}" ] || missing+=("--$flag")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[tpu_pod] missing ${missing[*]} (see --help)" >&2; exit 2
fi
[[ "$stop_timeout" =~ ^[1-9][0-9]*$ ]] ||
  { echo "[tpu_pod] --stop_timeout: a positive number of seconds, got '$stop_timeout'" >&2; exit 2; }
if [ "$action" = start ]; then
  case "$workdir" in
    gs://*) ;;
    /*) [ "$shared_fs" = 1 ] || {
          echo "[tpu_pod] --workdir $workdir: every worker writes its checkpoint shards there;" \
               "give a gs:// path, or --shared_fs if every worker mounts it" >&2; exit 2; } ;;
    *) echo "[tpu_pod] --workdir must be a gs:// path (or an absolute path with --shared_fs)," \
            "got '$workdir'" >&2; exit 2 ;;
  esac
  if [ -n "$coordinator" ] && ! [[ "$coordinator" =~ ^[^:]+:[0-9]+$ ]]; then
    echo "[tpu_pod] --coordinator_address: HOST:PORT, got '$coordinator'" >&2; exit 2
  fi
fi

# Devices jax reports on the slice: v4 / v5p count chips (2 TensorCores each, the number in the
# name is cores), v5e / v6e and v2 / v3 name the device count itself.
if [ -z "$expect" ] && [ -n "$accelerator" ]; then
  size="${accelerator##*-}"
  case "$accelerator" in
    v4-*|v5p-*) expect=$((size / 2)) ;;
    *) expect="$size" ;;
  esac
fi

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

# Every ssh carries launch/tpu_worker.sh (the worker side) inline, so each action finds the
# current one on every worker, a freshly created slice included.
worker_b64="$(base64 -w0 < "$here/tpu_worker.sh")"
worker_cmd() {   # the remote command running `tpu_worker.sh ACTION ARGS...`
  echo "mkdir -p ~/jaxcontrast && echo $worker_b64 | base64 -d > ~/jaxcontrast/worker.sh" \
       "&& bash ~/jaxcontrast/worker.sh$(printf ' %q' "$@")"
}
show() {  # the command as a shell would read it: words with spaces or quotes in single quotes
  local out="+" a q="'"
  for a in "$@"; do
    a="${a//$worker_b64/<base64 of launch/tpu_worker.sh>}"
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+~%-]+$ ]]; then out+=" $a"
    else out+=" '${a//$q/$q\\$q$q}'"; fi
  done
  echo "$out"
}
run() {   # prints the command; runs it unless --dry-run
  show "$@"
  [ "$dry" = 1 ] || "$@"
}
on_workers() {   # on_workers all|0 ACTION ARGS...: tpu_worker.sh on those workers
  local which="$1"; shift
  run "${gc[@]}" ssh "$name" "${where[@]}" "--worker=$which" --command "$(worker_cmd "$@")"
}

case "$action" in
  status) on_workers all status; exit ;;
  stop)   on_workers all stop "$stop_timeout"; exit ;;
  follow) on_workers 0 follow; exit ;;
esac

# 1. The slice: reuse it when it exists and is READY, else (re)create it.
state=""
if [ "$dry" = 0 ]; then
  state="$("${gc[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true)"
else
  echo "+ ${gc[*]} describe $name ${where[*]} --format='value(state)'   # reuse if READY"
fi
if [ "$state" != READY ]; then
  if [ -n "$state" ]; then   # e.g. PREEMPTED: a spot slice has to be recreated
    run "${gc[@]}" delete "$name" "${where[@]}" --quiet
  fi
  create=("${gc[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator"
          --version "$runtime")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi

# 2. The code: HEAD of this checkout. The install stamp names what .venv is built from.
commit="$(git -C "$root" rev-parse --short=12 HEAD)"
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  echo "[tpu_pod] note: uncommitted changes stay here; the workers get $commit" >&2
fi
stamp="$( { git -C "$root" show HEAD:launch/constraints.txt HEAD:setup.cfg HEAD:pyproject.toml \
             2>/dev/null || true; echo "python=$python"; } | sha256sum | cut -c1-16)"
archive="${TMPDIR:-/tmp}/jaxcontrast-$name-$commit.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run "${gc[@]}" scp "$archive" "$name:~/jaxcontrast.tar.gz" "${where[@]}" --worker=all
[ "$dry" = 1 ] || rm -f "$archive"   # the workers have their copy; none is left in TMPDIR

# 3. Set up every worker (idempotent); each reports its versions and whether it is training.
if [ "$dry" = 1 ]; then
  on_workers all setup "$commit" "$stamp" ${python:+"$python"}
  echo "# then: every worker's VERSIONS line must be identical and end in $expect devices"
  workers="N"
else
  out="$(on_workers all setup "$commit" "$stamp" ${python:+"$python"} 2>&1)" ||
    { echo "$out" >&2; echo "[tpu_pod] set-up failed on a worker (above)" >&2; exit 1; }
  echo "$out" | grep -v '^VERSIONS'
  versions="$(echo "$out" | grep '^VERSIONS' || true)"
  workers="$(echo "$versions" | grep -c . || true)"
  report="$(echo "$versions" | sort | uniq -c)"
  echo "$report"
  if [ "$(echo "$report" | wc -l)" != 1 ] || [ "$(echo "$report" | awk '{print $NF}')" != "$expect" ]; then
    echo "[tpu_pod] workers disagree on versions, or not $expect devices: fix before training" >&2
    exit 1
  fi
  running="$(echo "$out" | grep -c '^RUNNING' || true)"
  if [ "$running" = "$workers" ]; then
    echo "[tpu_pod] the trainers are running on all $workers workers: nothing started" \
         "(--stop to stop them)"
    [ "$follow" = 1 ] && on_workers 0 follow
    exit 0
  elif [ "$running" != 0 ]; then
    echo "[tpu_pod] a trainer runs on $running of $workers workers only: run --stop, then" \
         "this command again" >&2
    exit 1
  fi
fi

# 4. Train on every worker, detached from this SSH session.
args=(--config="$config" --workdir="$workdir")
[ -n "$data_dir" ] && args+=(--config.data.data_dir="$data_dir")
args+=(${pass[@]+"${pass[@]}"})
on_workers all start "$commit" "${coordinator:--}" "$workers" -- "${args[@]}"

stop=(bash "$0" --name "$name" "${where[@]}")
if [ "$follow" = 1 ] && [ "$dry" = 0 ]; then
  on_workers 0 follow
  echo "[tpu_pod] worker 0's trainer ended; every worker:"
  on_workers all status
else
  echo "[tpu_pod] follow: ${stop[*]} --follow   status: --status   stop (saves): --stop"
fi
echo "[tpu_pod] resume: run this same command again (it continues from the latest checkpoint" \
     "in $workdir)"
echo "[tpu_pod] delete: ${gc[*]} delete $name ${where[*]} --quiet"
