#!/usr/bin/env bash
# The main job: set up (idempotent), pretrain MoCo v2 on Fashion-MNIST on the CPU, then the same
# linear probe on the trained encoder, on the same encoder randomly initialised and on raw pixels
# (these two beside the pretraining, once its first checkpoint exists).
#
#   bash launch/local.sh                                  # MoCo v2 (docs/results.md: time and results)
#   bash launch/local.sh --workdir /tmp/run               # another workdir (default below)
#   bash launch/local.sh --method sce                     # another method at the same budget
#   bash launch/local.sh --config configs/sce_fashion_mnist.py:cpu    # any config spec
#   bash launch/local.sh --long                           # MoCo v2, 12 epochs: beats raw pixels
#   bash launch/local.sh --config.queue.size=8192         # any config override passes through
#
# Recipe: configs/moco_fashion_mnist_cpu.py; measurements: docs/results.md. Other arguments go to
# `python -m jaxcontrast.main`. Running the same command again resumes: pretraining from the
# workdir's latest checkpoint, and probes whose result is already there are not redone.
# Output: WORKDIR/{checkpoints,metrics.jsonl,tensorboard,config.json,linear_probe*.json,
# linear_probe_baselines.log}.
# The console shows this script's lines, the progress, the results and real warnings; the
# libraries' logs (TensorFlow, JAX, Orbax, pip) are hidden: JAXCONTRAST_VERBOSE=1 shows them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

config="" method="" workdir="" long=0 pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --method) method="$2"; shift 2 ;;
    --method=*) method="${1#*=}"; shift ;;
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#*=}"; shift ;;
    --workdir) workdir="$2"; shift 2 ;;
    --workdir=*) workdir="${1#*=}"; shift ;;
    --long) long=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;      # --config.KEY=VALUE and any other flag of jaxcontrast.main
  esac
done
bash "$root/launch/setup.sh"
cd "$root"
py=.venv/bin/python
# On CPU, XLA's own convolutions instead of YNNPACK's (2-6x faster on these shapes with jax
# 0.10: docs/performance.md, CPU advice). Only when JAX will run on the CPU (JAX_PLATFORMS says
# so, or the machine has no GPU or TPU device), and a value already in XLA_FLAGS wins.
on_cpu() {
  case "${JAX_PLATFORMS:-}" in
    cpu*) return 0 ;;
    ?*) return 1 ;;
  esac
  ! compgen -G "/dev/nvidia[0-9]*" >/dev/null && ! compgen -G "/dev/accel[0-9]*" >/dev/null &&
    ! compgen -G "/dev/vfio/[0-9]*" >/dev/null && ! [ -e /dev/kfd ]
}
if on_cpu && [[ "${XLA_FLAGS:-}" != *--xla_cpu_experimental_ynn_fusion_type=* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_experimental_ynn_fusion_type="
fi
if [ -n "$method" ] && [ -n "$config" ]; then
  echo "[local] give --method or --config, not both" >&2; exit 2
fi
if [ -z "$config" ]; then
  case "${method:-moco}" in
    moco) config=configs/moco_fashion_mnist_cpu.py ;;
    co2|xmoco|sce|fnc|sepp) config="configs/${method}_fashion_mnist.py:cpu" ;;
    *) echo "[local] unknown --method '$method'; known: moco co2 xmoco sce fnc sepp" >&2; exit 2 ;;
  esac
  if [ "$long" = 1 ]; then
    if [ "${method:-moco}" != moco ]; then
      echo "[local] --long is MoCo v2's longer run (configs/moco_fashion_mnist_cpu.py:long)" >&2
      exit 2
    fi
    config="$config:long"
  fi
elif [ "$long" = 1 ]; then
  echo "[local] --long goes with the default config; with --config name a variant" >&2
  exit 2
fi
if [ -z "$workdir" ]; then   # workdirs/<config file name>[_<variants>]
  name="$(basename "${config%%:*}" .py)"
  case "$config" in *:*) name="${name}_$(echo "${config#*:}" | tr ',' '_')" ;; esac
  workdir="workdirs/$name"
fi
if [ "$method" = sepp ] || [[ "$config" == *sepp* ]]; then
  if [[ " ${pass[*]-} " != *"data.semantic_pairs"* ]]; then
    pairs="$workdir.pairs_pixels.npz"   # SePP's partners mined from raw pixels (its config)
    mkdir -p "$(dirname "$workdir")"
    [ -f "$pairs" ] || "$py" -m jaxcontrast.semantic_pairs --config.dataset=fashion_mnist \
        --config.embedding=pixels --config.threshold=0.9 --config.top_k=10 --config.out="$pairs"
    pass+=("--config.data.semantic_pairs=$pairs")
  fi
fi

# The random-init and pixel baselines do not depend on the training (never redone once there).
# Pretraining keeps only about one of two CPU cores busy, so they run beside it, in the
# background, as soon as its first checkpoint exists (the probe reads the run's config from it).
baselines=()
for encoder in random pixels; do
  [ -f "$workdir/linear_probe_$encoder.json" ] || baselines+=("$encoder")
done
baseline_pid=""
if [ ${#baselines[@]} -gt 0 ]; then
  mkdir -p "$workdir"
  baseline_log="$workdir/linear_probe_baselines.log"
  encoders="$(IFS=,; echo "${baselines[*]}")"
  echo "[local] linear probes $encoders: beside pretraining, after its first checkpoint" \
       "(log: $baseline_log)"
  (
    # A finished checkpoint is a directory named by its step (Orbax renames it when complete).
    until compgen -G "$workdir/checkpoints/[0-9]*" | grep -qE '/[0-9]+$'; do
      kill -0 $$ 2>/dev/null || exit 1     # the launcher is gone: nothing to wait for
      sleep 5
    done
    exec "$py" -m jaxcontrast.eval.linear_probe --workdir="$workdir" --config.encoder="$encoders"
  ) > "$baseline_log" 2>&1 &
  baseline_pid=$!
  trap '[ -n "$baseline_pid" ] && kill "$baseline_pid" 2>/dev/null; true' EXIT
fi

echo "[local] pretraining: $config -> $workdir"
"$py" -m jaxcontrast.main --config="$config" --workdir="$workdir" ${pass[@]+"${pass[@]}"}

if [ -n "$baseline_pid" ]; then
  echo "[local] waiting for the baseline probes ($encoders)"
  if ! wait "$baseline_pid"; then
    baseline_pid=""
    echo "[local] the baseline probes failed; the end of $baseline_log:" >&2
    tail -n 20 "$baseline_log" >&2
    exit 1
  fi
  baseline_pid=""
fi

# The remaining probes in one process; the target's result is redone only when it is older
# than the last checkpoint.
todo=()
for encoder in target random pixels; do
  result="$workdir/linear_probe_$encoder.json"
  [ "$encoder" = target ] && result="$workdir/linear_probe.json"
  if [ -f "$result" ] && { [ "$encoder" != target ] || [ "$result" -nt "$workdir/checkpoints" ]; }
  then continue; fi
  todo+=("$encoder")
done
if [ ${#todo[@]} -gt 0 ]; then
  encoders="$(IFS=,; echo "${todo[*]}")"
  echo "[local] linear probes: $encoders"
  "$py" -m jaxcontrast.eval.linear_probe --workdir="$workdir" --config.encoder="$encoders"
fi

"$py" - "$workdir" <<'PY'
import json, pathlib, sys
workdir = pathlib.Path(sys.argv[1])
read = lambda name: json.loads((workdir / name).read_text())
target = read("linear_probe.json")
rows = [("pretrained encoder (target, step %d)" % target["step"], target),
        ("same encoder, random initialisation", read("linear_probe_random.json")),
        ("raw pixels", read("linear_probe_pixels.json"))]
print(f"\n{target.get('method')} on {target.get('dataset')}: linear probe top-1 on the "
      f"{target.get('test_split') or 'test'} split")
for name, result in rows:
  print(f"  {name:<40} {100 * result['top1']:6.2f}%")
print(f"workdir: {workdir.resolve()}")
PY
