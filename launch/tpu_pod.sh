#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM pod slice: create (or reuse) the slice, ship this checkout, set up
# .venv with jax[tpu] on every worker, check that all workers agree on the jax / libtpu versions
# and the device count, then run `python -m jaxcontrast.main` on all workers (one process each;
# jax.distributed finds its peers on TPU VMs) and stream worker 0's log.
#
#   bash launch/tpu_pod.sh --name my-v4 --zone us-central2-b --accelerator v4-32 \
#       --config configs/moco_imagenet2012.py --workdir gs://BUCKET/runs/moco \
#       --data_dir gs://BUCKET/tfds [--spot] [--project P] [--runtime tpu-ubuntu2204-base] \
#       [--expect_devices N] [--dry-run] [--config.KEY=VALUE ...]
#
# --dry-run prints every command (gcloud, git archive) instead of running it. Other arguments
# go to `python -m jaxcontrast.main`. Re-running the same command resumes: the slice is reused
# if it exists (a preempted spot slice is recreated), the code re-shipped, and the run continues
# from the workdir's latest checkpoint (a worker sent SIGTERM saves first: run/preemption.py).
# Data: `tfds build imagenet2012 --data_dir gs://BUCKET/tfds` once, from
# any machine with the ImageNet tarballs (see the README, "Run on a TPU pod / GPU cluster").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

name="" zone="" accelerator="" runtime="tpu-ubuntu2204-base" project="" spot=0 dry=0
config="" workdir="" data_dir="" expect="" pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name|--zone|--accelerator|--runtime|--project|--config|--workdir|--data_dir|--expect_devices)
      [ $# -ge 2 ] || { echo "[tpu_pod] $1 needs a value" >&2; exit 2; }
      v="$2"
      case "$1" in
        --name) name="$v" ;; --zone) zone="$v" ;; --accelerator) accelerator="$v" ;;
        --runtime) runtime="$v" ;; --project) project="$v" ;; --config) config="$v" ;;
        --workdir) workdir="$v" ;; --data_dir) data_dir="$v" ;; --expect_devices) expect="$v" ;;
      esac
      shift 2 ;;
    --spot|--preemptible) spot=1; shift ;;
    --dry-run|--dry_run) dry=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
missing=()
for flag in name zone accelerator config workdir; do
  [ -n "${!flag}" ] || missing+=("--$flag")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[tpu_pod] missing ${missing[*]} (see --help)" >&2; exit 2
fi
case "$workdir" in
  gs://*) ;;
  *) echo "[tpu_pod] --workdir must be a gs:// path: every worker writes its checkpoint shards" \
          "there" >&2; exit 2 ;;
esac

# Devices jax reports on the slice: v4 / v5p count chips (2 TensorCores each, the number in the
# name is cores), v5e / v6e and v2 / v3 name the device count itself.
if [ -z "$expect" ]; then
  size="${accelerator##*-}"
  case "$accelerator" in
    v4-*|v5p-*) expect=$((size / 2)) ;;
    *) expect="$size" ;;
  esac
fi

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")
archive="/tmp/jaxcontrast-$name.tar.gz"
remote_dir="jaxcontrast"

show() {  # the command as a shell would read it: words with spaces or quotes in single quotes
  local out="+" a q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+~%-]+$ ]]; then out+=" $a"
    else out+=" '${a//$q/$q\\$q$q}'"; fi
  done
  echo "$out"
}
run() {   # prints the command; runs it unless --dry-run
  show "$@"
  [ "$dry" = 1 ] || "$@"
}
on_all() { run "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"; }

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

# 2. The code: HEAD of this checkout (commit first: uncommitted changes do not travel).
run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run "${gc[@]}" scp "$archive" "$name:~/jaxcontrast.tar.gz" "${where[@]}" --worker=all

# 3. Set up every worker: a fresh tree, .venv with the pinned versions and jax[tpu].
setup="rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir && tar xzf ~/jaxcontrast.tar.gz -C ~/$remote_dir"
setup+=" && cd ~/$remote_dir && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
setup+=" && .venv/bin/pip install -q -c launch/constraints.txt -e '.[train,tpu]'"
on_all "$setup"

# 4. Every worker must report the same versions and the slice's device count before training.
check="cd ~/$remote_dir && .venv/bin/python -c 'import jax, jaxlib, importlib.metadata as m;"
check+=" print(\"VERSIONS\", jax.__version__, jaxlib.__version__, m.version(\"libtpu\"),"
check+=" jax.device_count())'"
if [ "$dry" = 1 ]; then
  on_all "$check"
  echo "# then: every worker's VERSIONS line must be identical and end in $expect devices"
else
  report="$("${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command "$check" 2>&1 |
            grep '^VERSIONS' | sort | uniq -c)"
  echo "$report"
  if [ "$(echo "$report" | wc -l)" != 1 ] || [ "$(echo "$report" | awk '{print $NF}')" != "$expect" ]; then
    echo "[tpu_pod] workers disagree on versions, or not $expect devices: fix before training" >&2
    exit 1
  fi
fi

# 5. Train on every worker; worker 0's output streams here, the others' go to ~/train.log.
args=(--config="$config" --workdir="$workdir")
[ -n "$data_dir" ] && args+=(--config.data.data_dir="$data_dir")
args+=(${pass[@]+"${pass[@]}"})
train="cd ~/$remote_dir && .venv/bin/python -m jaxcontrast.main$(printf ' %q' "${args[@]}")"
worker='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
on_all "if [ \"$worker\" = 0 ]; then $train 2>&1 | tee ~/train.log; else $train > ~/train.log 2>&1; fi"

echo "[tpu_pod] resume: run this same command again (it reuses or recreates $name and continues"
echo "          from the latest checkpoint in $workdir)"
echo "[tpu_pod] delete: ${gc[*]} delete $name ${where[*]} --quiet"
