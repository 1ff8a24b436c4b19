#!/usr/bin/env bash
# The Fashion-MNIST results table of docs/results.md: the six methods at the main job's CPU budget
# (each `configs/<method>_fashion_mnist.py:cpu`), each through the same linear probe, next to the
# same encoder randomly initialised and raw pixels; and MoCo v2's kNN curve as a PNG.
#
#   bash benchmarks/fashion_mnist_results.sh                    # all six, then the table
#   bash benchmarks/fashion_mnist_results.sh moco sce           # some methods only
#   ROOT=/tmp/fm bash benchmarks/fashion_mnist_results.sh       # another results folder
#
# Unattended and resumable: a method whose linear_probe.json exists is skipped, an interrupted
# pretraining resumes from its last checkpoint (the run layer does this), so re-running the same
# command finishes what is left. Each method takes about as long as `bash launch/local.sh`
# (6-9 min on 2 idle cores, 2026-11-28). Output: ROOT/<method>/ (checkpoints, metrics.jsonl,
# linear_probe*.json), ROOT/results.md, docs/fashion_mnist_moco_knn.png (matplotlib, the
# optional `plot` extra, is installed into .venv if missing; without it the table is still
# written).
# SePP's semantic pairs are mined from raw pixels (its config's docstring), once, into ROOT.
set -euo pipefail
root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root_dir/launch/setup.sh"
cd "$root_dir"
py=.venv/bin/python
# A CPU benchmark: XLA's own convolutions instead of YNNPACK's, as launch/local.sh runs
# (docs/performance.md, CPU advice); a value already in XLA_FLAGS wins.
[[ "${XLA_FLAGS:-}" == *--xla_cpu_experimental_ynn_fusion_type=* ]] ||
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_experimental_ynn_fusion_type="
# The PNG needs matplotlib (the optional `plot` extra); without it only the table is written.
"$py" -c "import matplotlib" 2>/dev/null || "$py" -m pip install -q -e ".[plot]" ||
  echo "[results] warning: could not install matplotlib; no kNN curve PNG" >&2
ROOT="${ROOT:-workdirs/fashion_mnist_cpu}"
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(moco co2 xmoco sce fnc sepp)
mkdir -p "$ROOT"

probe() {  # probe WORKDIR ENCODER: the same full-batch probe for every row of the table
  local out=linear_probe.json
  [ "$2" = target ] || out="linear_probe_$2.json"
  if [ ! -f "$1/$out" ]; then
    "$py" -m jaxcontrast.eval.linear_probe --workdir "$1" --config.encoder="$2"
  fi
}

for method in "${methods[@]}"; do
  workdir="$ROOT/$method"
  if [ -f "$workdir/linear_probe.json" ]; then
    echo "[results] $method: done ($workdir/linear_probe.json)"
    continue
  fi
  extra=()
  if [ "$method" = sepp ]; then
    pairs="$ROOT/sepp_pairs_pixels.npz"
    [ -f "$pairs" ] || "$py" -m jaxcontrast.semantic_pairs --dataset fashion_mnist \
        --embedding pixels --threshold 0.9 --top_k 10 --out "$pairs"
    extra=(--config.data.semantic_pairs="$pairs")
  fi
  echo "[results] $method: pretraining into $workdir ($(date -u +%H:%M:%S) UTC)"
  start=$(date +%s)
  config="configs/${method}_fashion_mnist.py:cpu"
  # The main job's run, with the kNN monitor after every epoch (the curve's points).
  [ "$method" = moco ] && config=configs/moco_fashion_mnist_cpu.py:knn
  "$py" -m jaxcontrast.main --config "$config" \
      --workdir "$workdir" "${extra[@]}"
  echo "[results] $method: pretraining took $(( $(date +%s) - start )) s"
  probe "$workdir" target
done
# Baselines: the backbone is the same for every method at this budget, so one random
# initialisation and one raw-pixel probe (in MoCo's workdir, or the first method's) serve all.
base="$ROOT/${methods[0]}"
[ -d "$ROOT/moco" ] && base="$ROOT/moco"
probe "$base" random
probe "$base" pixels
"$py" benchmarks/fashion_mnist_report.py --root "$ROOT" --png docs/fashion_mnist_moco_knn.png
