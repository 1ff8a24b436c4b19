"""Markdown tables from the JSON lines of `python -m jaxcontrast.bench` runs (the step suites).

  python benchmarks/bench_tables.py OUT/results.jsonl

One row per run: its name, the settings that differ between runs, compile seconds, step
milliseconds, images/s, FLOPs per image, achieved TFLOP/s (and MFU where a peak was given), per-
device state and peak memory, and for runs with a PyTorch reference its images/s and our ratio.
Plain Python (no jax) so it runs anywhere.
"""
import json
import sys

SETTINGS = ("method", "loss", "arch", "width", "image_size", "batch", "queue_size",
            "queue_mode", "devices", "dtype", "symmetric", "support_views")


def _mb(x):
  return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def table(rows):
  varying = [k for k in SETTINGS if len({json.dumps(r.get(k)) for r in rows}) > 1]
  head = ["run", *varying, "compile s", "step ms", "images/s", "GFLOP/image", "TFLOP/s",
          "state/device", "peak memory"]
  with_mfu = any("mfu" in r for r in rows)
  with_ref = any("reference" in r for r in rows)
  if with_mfu:
    head.append("MFU")
  if with_ref:
    head += ["PyTorch images/s", "ratio"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r.get("name", "?"), *(str(r.get(k)) for k in varying), f"{r['compile_s']:.1f}",
             f"{r['step_ms_median']:,.1f}", f"{r['images_per_s']:,.1f}",
             f"{r['flops_per_image'] / 1e9:.2f}", f"{r['achieved_tflops']:.2f}",
             _mb(r.get("state_bytes_per_device")), _mb(r.get("peak_memory_bytes"))]
    if with_mfu:
      cells.append(f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-")
    if with_ref:
      ref = r.get("reference") or {}
      modes = [m for m in ("eager", "compile") if m in ref]
      layout = "channels_last" if ref.get("channels_last") else "NCHW"
      cells.append(", ".join(f"{m} ({layout}) {ref[m]['images_per_s']:,.1f}" for m in modes)
                   or ref.get("skipped", "-"))
      cells.append(", ".join(f"{r[f'ratio_vs_torch_{m}']:.2f}x {m}" for m in modes) or "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(path):
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  machine = sorted({f"{r['device_kind']} x{r['devices']} ({r['platform']}), jax "
                    f"{r['jax_version']}" for r in rows})
  print(f"{len(rows)} runs on: {'; '.join(machine)}\n")
  print(table(rows))


if __name__ == "__main__":
  main(sys.argv[1])
