"""Where the step's device time goes: a `jax.profiler` trace of a few steps, its kernels summed
by kind (plain JSON, so no profiler UI is needed to read it).

The trace is JAX's Perfetto export (`create_perfetto_trace=True`, Chrome trace-event JSON). Device
kernels are the complete ("X") events of the processes whose name holds "GPU" or "TPU" (on CPU
there are none: the summary says so). Kinds, from the kernel names of XLA and cuDNN/cuBLAS:
convolution (cuDNN kernels: xmma / implicit_gemm / conv / dgrad / wgrad / fprop), matmul
(gemm / nvjet / cutlass / cublas / dot), reduction (BatchNorm statistics, loss sums: "reduce"),
transpose_copy (layout changes), other (element-wise fusions: BN apply, ReLU, optimizer, EMA).
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib

KINDS = (
    ("convolution", ("xmma", "implicit_gemm", "conv", "dgrad", "wgrad", "fprop", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "dot")),
    ("reduction", ("reduce", "reduction")),
    ("transpose_copy", ("transpose", "copy")),
)


def kernel_kind(name: str) -> str:
  lower = name.lower()
  for kind, needles in KINDS:
    if any(n in lower for n in needles):
      return kind
  return "other"


def summarize_trace(trace: dict, *, steps: int, top: int = 15) -> dict:
  """Per-step device milliseconds by kind, and the `top` kernels by total time."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and any(d in str(e.get("args", {}).get("name", "")) for d in ("GPU", "TPU"))}
  by_kind = collections.Counter()
  by_name = collections.Counter()
  counts = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      dur_ms = float(e.get("dur", 0.0)) / 1e3
      by_kind[kernel_kind(e["name"])] += dur_ms
      by_name[e["name"]] += dur_ms
      counts[e["name"]] += 1
  total = sum(by_kind.values())
  if not total:
    return {"error": "no device kernels in the trace (CPU backend, or the profiler could not "
                     "read the device)"}
  return {
      "device_ms_per_step": round(total / steps, 3),
      "ms_per_step_by_kind": {k: round(v / steps, 3) for k, v in by_kind.most_common()},
      "share_by_kind": {k: round(v / total, 4) for k, v in by_kind.most_common()},
      "top_kernels": [{"name": n[:120], "kind": kernel_kind(n), "ms_per_step": round(v / steps, 3),
                       "calls_per_step": counts[n] / steps}
                      for n, v in by_name.most_common(top)],
  }


def profile_calls(call, *, steps: int, logdir: str) -> dict:
  """Runs `call()` `steps` times under the profiler, writing to `logdir`; returns the summary."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        call()
  except Exception as e:  # pylint: disable=broad-except  (a profiler failure is a result)
    return {"error": f"profiler: {type(e).__name__}: {e}"}
  files = sorted(pathlib.Path(logdir).rglob("perfetto_trace.json.gz"))
  if not files:
    return {"error": f"no perfetto_trace.json.gz under {logdir}"}
  with gzip.open(files[-1], "rt") as f:
    summary = summarize_trace(json.load(f), steps=steps)
  summary["trace"] = str(files[-1])
  return summary
