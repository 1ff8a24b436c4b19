#!/usr/bin/env bash
# Pretrain on a GPU cluster with SLURM: writes an sbatch script and submits it. One process per
# node driving all its GPUs (default), or one per GPU (--per_gpu); JAX reads the coordinator and
# the process ids from SLURM's environment (jax.distributed.initialize() in jaxcontrast.main).
#
#   bash launch/gpu_slurm.sh --nodes 2 --gpus_per_node 8 --config configs/moco_imagenet2012.py \
#       --workdir /shared/runs/moco --data_dir /shared/tfds [--per_gpu] [--partition P] \
#       [--time 48:00:00] [--account A] [--venv /shared/jaxcontrast/.venv] [--dry-run] \
#       [--config.KEY=VALUE ...]
#
# --dry-run prints the sbatch script and the sbatch command instead of submitting. Other
# arguments go to `python -m jaxcontrast.main`. Preemption and time limits: the job asks for
# --requeue and for SIGTERM to the batch shell 120 s before its end (--signal=B:TERM@120); the
# script passes SIGTERM on to srun, srun to every task, and the tasks save a checkpoint at the
# same step and exit (run/preemption.py). A requeued job runs the same script again with the
# same job id and the same --workdir, so it resumes from that checkpoint; its output is appended
# to the same log (--open-mode=append). Submitting the same command again also resumes. The
# workdir must be on storage all nodes share (or gs://).
# Devices: JAX's SLURM detection gives each process only the GPU numbered SLURM_LOCALID unless
# told otherwise, so with one process per node the script sets JAX_LOCAL_DEVICE_IDS to all the
# node's GPUs; with --per_gpu each task keeps JAX's choice, its own GPU.
# Set up .venv once on the shared filesystem: `bash launch/setup.sh` then
# `.venv/bin/pip install -c launch/constraints.txt -e ".[train,cuda]"`. Docs: docs/distributed.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nodes=1 gpus=8 per_gpu=0 partition="" time_limit="48:00:00" account="" dry=0
config="" workdir="" data_dir="" venv="$root/.venv" job="jaxcontrast" pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes|--gpus_per_node|--partition|--time|--account|--config|--workdir|--data_dir|--venv|--job_name)
      [ $# -ge 2 ] || { echo "[gpu_slurm] $1 needs a value" >&2; exit 2; }
      v="$2"
      case "$1" in
        --nodes) nodes="$v" ;; --gpus_per_node) gpus="$v" ;; --partition) partition="$v" ;;
        --time) time_limit="$v" ;; --account) account="$v" ;; --config) config="$v" ;;
        --workdir) workdir="$v" ;; --data_dir) data_dir="$v" ;; --venv) venv="$v" ;;
        --job_name) job="$v" ;;
      esac
      shift 2 ;;
    --per_gpu) per_gpu=1; shift ;;
    --dry-run|--dry_run) dry=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
[ -n "$config" ] && [ -n "$workdir" ] || { echo "[gpu_slurm] --config and --workdir are required" >&2; exit 2; }
for n in "$nodes" "$gpus"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "[gpu_slurm] --nodes / --gpus_per_node: positive ints" >&2; exit 2; }
done
tasks_per_node=1
[ "$per_gpu" = 1 ] && tasks_per_node="$gpus"

args=(--config="$config" --workdir="$workdir")
[ -n "$data_dir" ] && args+=(--config.data.data_dir="$data_dir")
args+=(${pass[@]+"${pass[@]}"})
main="$(printf ' %q' "$venv/bin/python" -m jaxcontrast.main "${args[@]}")"

script="$(mktemp "${TMPDIR:-/tmp}/jaxcontrast_sbatch.XXXXXX")"
trap 'rm -f "$script"' EXIT   # sbatch keeps its own copy of the script
{
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$job"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gpus-per-node=$gpus"
  echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --requeue"
  echo "#SBATCH --signal=B:TERM@120"
  echo "#SBATCH --output=$job-%j.out"
  echo "#SBATCH --open-mode=append"
  [ -n "$partition" ] && echo "#SBATCH --partition=$partition"
  [ -n "$account" ] && echo "#SBATCH --account=$account"
  echo "set -euo pipefail"
  echo "cd $(printf '%q' "$root")"
  echo "export PYTHONUNBUFFERED=1   # the log shows each line as it is printed"
  if [ "$per_gpu" = 0 ]; then   # one process drives all the node's GPUs
    echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))"
  fi
  echo 'echo "[gpu_slurm] $(date -u "+%Y-%m-%d %H:%M:%S") job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:+(restart $SLURM_RESTART_COUNT)}"'
  echo "# SIGTERM goes to the batch shell (B:); pass it on to every task, which saves and exits."
  echo "srun --kill-on-bad-exit=1$main &"
  echo 'pid=$!'
  echo 'trap "kill -TERM $pid" TERM'
  echo 'wait $pid || wait $pid'
} > "$script"

echo "# sbatch script:"
cat "$script"
echo "+ sbatch $script"
if [ "$dry" = 0 ]; then
  sbatch "$script"
  echo "[gpu_slurm] logs: $job-<jobid>.out; stop with a checkpoint: scancel --batch --signal=TERM <jobid>;" \
       "resume: SLURM's requeue, or this same command again"
fi
