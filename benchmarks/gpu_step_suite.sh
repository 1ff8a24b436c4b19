#!/usr/bin/env bash
# The GPU step benchmarks of docs/performance.md, in priority order, one JSON line
# each appended to OUT/results.jsonl (so a run cut short keeps what finished), their stderr in
# OUT/suite.log.
#
#   bash benchmarks/gpu_step_suite.sh OUT [PYTHON]      # PYTHON: default python3
#
# ResNet-50, 224 px, bfloat16 compute, batch 256, K 65,536, synthetic inputs already on the GPU.
# H100 / H200 dense bf16 peak: 989 TFLOP/s (for `mfu`).
set -uo pipefail
out="${1:?usage: gpu_step_suite.sh OUT [PYTHON]}"
py="${2:-python3}"
mkdir -p "$out"
tmp="$(mktemp -d)"
# JAX takes 75% of the GPU's memory at start by default; the PyTorch reference runs in the same
# process after it and needs its share.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
# The step alone (float32 views, as the PyTorch reference gets them); moco_device_augment below
# adds the photometric ops in the step (data.augment_on=device, the default on GPU).
common=(--config.model.dtype=bfloat16 --config.global_batch_size=256 --config.queue.size=65536
        --peak_flops 989e12 --config.data.augment_on=host)
run() {   # name, method (configs/<method>_imagenet2012.py), then bench flags (later ones win)
  local name="$1" method="$2"; shift 2
  echo "== $name: $*" | tee -a "$out/suite.log" >&2
  local t0=$SECONDS
  if "$py" -m jaxcontrast.bench --config "configs/${method}_imagenet2012.py" "${common[@]}" "$@" > "$tmp/$name.json" 2> "$tmp/$name.log"; then
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r['name']=sys.argv[2]; print(json.dumps(r))" \
      "$tmp/$name.json" "$name" >> "$out/results.jsonl"
    echo "   done in $((SECONDS - t0)) s: $(grep -o '"images_per_s": [0-9.]*' "$tmp/$name.json" | head -1)" | tee -a "$out/suite.log" >&2
  else
    echo "   FAILED after $((SECONDS - t0)) s; end of its log:" | tee -a "$out/suite.log" >&2
    tail -n 25 "$tmp/$name.log" | tee -a "$out/suite.log" >&2
  fi
  grep -v '^[WI][0-9]' "$tmp/$name.log" | tail -n 5 >> "$out/suite.log"
}
run moco_vs_torch moco --reference torch --profile /tmp/profile_moco
run moco_device_augment moco --config.data.augment_on=device --steps 10
run moco_sce_loss moco --config.objective.loss=sce --steps 10
run co2 co2 --steps 10
run xmoco xmoco --steps 10
run fnc_s2 fnc --config.objective.fnc.num_support_views=2 --steps 10
run sce sce --steps 10
run fnc_s8 fnc --steps 10
