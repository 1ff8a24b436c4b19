#!/usr/bin/env bash
# The CPU step benchmarks of docs/performance.md (2 cores), one JSON line each
# appended to OUT/results.jsonl, stderr in OUT/suite.log; then the Markdown tables.
#
#   bash benchmarks/cpu_step_suite.sh OUT [GROUP ...]   # groups: torch regularisers queue methods
#
# torch: the MoCo v2 step, ResNet-18 with the CIFAR stem, 32 px, batch 256, K 4096, float32,
#   against the PyTorch reference (eager, channels_last and NCHW; torch.compile), same process.
#   Needs torch importable (pip install -e ".[bench]", or PYTHONPATH pointing at a torch).
# regularisers: CO2, XMoCo and SCE's loss over the plain MoCo step at K 65,536 (ResNet-50 width
#   1/4, 32 px, batch 64), SCE's symmetric + predictor recipe and FNC apart.
# queue: 8 simulated devices, K 4,096 / 65,536 / 1,048,576, replicated and sharded.
# methods: the six methods' Fashion-MNIST presets at the budget of configs/*:cpu (1 device).
set -uo pipefail
out="${1:?usage: cpu_step_suite.sh OUT [GROUP ...]}"
shift
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(torch regularisers queue methods)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-.venv/bin/python}"
# A CPU benchmark: XLA's own convolutions instead of YNNPACK's, as launch/local.sh runs
# (docs/performance.md, CPU advice); a value already in XLA_FLAGS wins.
[[ "${XLA_FLAGS:-}" == *--xla_cpu_experimental_ynn_fusion_type=* ]] ||
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_experimental_ynn_fusion_type="
mkdir -p "$out"
tmp="$(mktemp -d)"

run() {   # name, then bench flags
  local name="$1"; shift
  echo "== $name: $*" | tee -a "$out/suite.log" >&2
  local t0=$SECONDS
  if "$py" -m jaxcontrast.bench "$@" > "$tmp/$name.json" 2> "$tmp/$name.log"; then
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); r['name']=sys.argv[2]; print(json.dumps(r))" \
      "$tmp/$name.json" "$name" >> "$out/results.jsonl"
    echo "   done in $((SECONDS - t0)) s" | tee -a "$out/suite.log" >&2
  else
    echo "   FAILED after $((SECONDS - t0)) s:" | tee -a "$out/suite.log" >&2
    tail -n 25 "$tmp/$name.log" | tee -a "$out/suite.log" >&2
  fi
}

small=(--config.model.width=0.25 --config.model.stem=cifar --config.data.image_size=32
       "--config.model.proj_hidden_dims=(128,)")
imagenet() { echo "configs/$1_imagenet2012.py"; }   # --config comes before its overrides
for group in "${groups[@]}"; do
  case "$group" in
    torch)
      cifar=(--config "$(imagenet moco)" --config.model.arch=resnet18 --config.model.stem=cifar
             --config.data.image_size=32 --config.global_batch_size=256 --config.queue.size=4096
             --config.model.dtype=float32 --steps 5 --warmup 2)
      run torch_channels_last "${cifar[@]}" --reference torch --torch_modes eager,compile
      run torch_nchw "${cifar[@]}" --reference torch --torch_modes eager \
          --notorch_channels_last ;;
    regularisers)
      reg=("${small[@]}" --config.global_batch_size=64 --config.queue.size=65536 --steps 10)
      run reg_moco --config "$(imagenet moco)" "${reg[@]}"
      run reg_co2 --config "$(imagenet co2)" "${reg[@]}"
      run reg_xmoco --config "$(imagenet xmoco)" "${reg[@]}"
      run reg_sce_loss --config "$(imagenet moco)" --config.objective.loss=sce "${reg[@]}"
      run reg_sce_recipe --config "$(imagenet sce)" "${reg[@]}" \
          "--config.model.pred_hidden_dims=(128,)"
      run reg_fnc_s2 --config "$(imagenet fnc)" --config.objective.fnc.num_support_views=2 \
          "${reg[@]}" ;;
    queue)
      for k in 4096 65536 1048576; do
        for mode in replicated sharded; do
          run "queue_${mode}_${k}" --config "$(imagenet moco)" "${small[@]}" \
              --config.global_batch_size=64 --devices 8 --config.queue.size="$k" \
              --config.queue.mode="$mode" --steps 10
        done
      done ;;
    methods)
      for m in moco co2 xmoco sce fnc sepp; do
        cfg="configs/${m}_fashion_mnist.py:cpu"
        [ "$m" = moco ] && cfg=configs/moco_fashion_mnist_cpu.py
        [ "$m" = sepp ] && cfg="configs/sepp_fashion_mnist.py:cpu,queue_ids"
        run "method_$m" --config "$cfg" --steps 10
      done ;;
    *) echo "unknown group $group" >&2; exit 2 ;;
  esac
done
"$py" benchmarks/bench_tables.py "$out/results.jsonl"
