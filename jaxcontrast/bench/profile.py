"""Where the step's time goes: a `jax.profiler` trace of a few steps, its kernels summed by kind
(plain JSON, so no profiler UI is needed to read it).

The trace is JAX's Perfetto export (`create_perfetto_trace=True`, Chrome trace-event JSON). Device
kernels are the complete ("X") events of the processes whose name holds "GPU" or "TPU"; on CPU,
the events of XLA's compute threads ("tf_XLAEigen...") named after the compiled program's
instructions. Kinds: from the kernel names of XLA and cuDNN/cuBLAS on GPU — convolution (xmma /
implicit_gemm / conv / dgrad / wgrad / fprop), matmul (gemm / nvjet / cutlass / cublas / dot),
reduction (BatchNorm statistics, loss sums: "reduce"), transpose_copy (layout changes), other
(element-wise fusions: BN apply, ReLU, optimizer, EMA); on CPU, where fusions are named
"ynn_fusion.88", from what the instruction computes in the optimized HLO (`hlo_kinds`).
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

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


_OPCODE_KIND = (("convolution", "convolution"), ("dot", "matmul"), ("reduce", "reduction"),
                ("transpose", "transpose_copy"), ("copy", "transpose_copy"))
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """{instruction name: kind} for an optimized HLO module's text: an instruction's own opcode,
  or for a fusion the most telling opcode of the computation it calls (convolution > dot >
  reduce > transpose/copy > other)."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMPUTATION.match(line)
      current = m.group(1) if m else None
      if current:
        computations[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if m and current:
      calls = re.search(r"calls=%?([\w.\-]+)", m.group(3))
      computations[current].append((m.group(1), m.group(2), calls.group(1) if calls else None))

  def kind_of(opcodes):
    for needle, kind in _OPCODE_KIND:
      if any(op == needle or op.startswith(needle + "-") for op in opcodes):
        return kind
    return "other"

  def opcodes(name, seen=()):
    ops = set()
    for _, op, calls in computations.get(name, ()):
      ops.add(op)
      if calls and calls not in seen:
        ops |= opcodes(calls, seen + (name,))
    return ops

  kinds = {}
  for instructions in computations.values():
    for name, op, calls in instructions:
      kinds[name] = kind_of({op} | (opcodes(calls) if calls else set()))
  return kinds


def _is_cpu_kernel(name: str) -> bool:
  return not name.startswith(("ThunkExecutor", "SlinkyThreadPool", "$"))


def summarize_trace(trace: dict, *, steps: int, top: int = 15,
                    kinds: dict[str, str] | None = None) -> dict:
  """Per-step milliseconds by kind, and the `top` kernels by total time. `kinds` (from
  `hlo_kinds`) names the kind of CPU instructions; GPU/TPU kernels are told by their names."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process_names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread_names = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", ""))
                  for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {pid for pid, name in process_names.items()
                 if any(d in name for d in ("GPU", "TPU"))}
  kinds = kinds or {}

  def kernel(e):
    if e.get("ph") != "X":
      return False
    if device_pids:
      return e.get("pid") in device_pids
    return (thread_names.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLAEigen")
            and _is_cpu_kernel(e["name"]))

  by_kind = collections.Counter()
  by_name = collections.Counter()
  counts = collections.Counter()
  for e in events:
    if kernel(e):
      dur_ms = float(e.get("dur", 0.0)) / 1e3
      by_kind[kinds.get(e["name"]) or kernel_kind(e["name"])] += dur_ms
      by_name[e["name"]] += dur_ms
      counts[e["name"]] += 1
  total = sum(by_kind.values())
  if not total:
    return {"error": "no device kernels in the trace (CPU backend, or the profiler could not "
                     "read the device)"}
  return {
      "device": "accelerator" if device_pids else "cpu (XLA compute threads, summed)",
      "device_ms_per_step": round(total / steps, 3),
      "ms_per_step_by_kind": {k: round(v / steps, 3) for k, v in by_kind.most_common()},
      "share_by_kind": {k: round(v / total, 4) for k, v in by_kind.most_common()},
      "top_kernels": [{"name": n[:120], "kind": kinds.get(n) or kernel_kind(n),
                       "ms_per_step": round(v / steps, 3),
                       "calls_per_step": counts[n] / steps}
                      for n, v in by_name.most_common(top)],
  }


def profile_calls(call, *, steps: int, logdir: str, hlo_text: str | None = None) -> dict:
  """Runs `call()` `steps` times under the profiler, writing to `logdir`; returns the summary
  (`hlo_text`: the compiled program, to name the kinds of CPU instructions)."""
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
    summary = summarize_trace(json.load(f), steps=steps,
                              kinds=hlo_kinds(hlo_text) if hlo_text else None)
  summary["trace"] = str(files[-1])
  return summary


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1,
          "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|s32|u32|f16|pred|s8|u8|s64|u64|f64)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def hlo_collectives(hlo: str):
  """{kind: (count, bytes)} of the collectives in an optimized HLO module's text."""
  out = collections.defaultdict(lambda: [0, 0])
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    nbytes = 0
    for dtype, dims in _SHAPE.findall(m.group(1)):
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      nbytes += size * _BYTES[dtype]
    out[m.group(2)][0] += 1
    out[m.group(2)][1] += nbytes
  return {k: tuple(v) for k, v in out.items()}
