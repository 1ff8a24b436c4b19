"""BatchNorm on XLA:CPU: the two-stage path (`models/norm.py`, what CPU programs run) against
plain BatchNorm (one reduction, implicit broadcasting: what GPU and TPU programs run), in the
whole compiled train step, A/B interleaved in one process (not a test: prints numbers).

  .venv/bin/python benchmarks/bench_batchnorm.py                          # tiny and :cpu steps
  .venv/bin/python benchmarks/bench_batchnorm.py --configs configs/moco_fashion_mnist_cpu.py \\
      --repeats 8 --steps 10

Both programs are compiled first, then each repeat times `--steps` steps of A, then of B (order
alternating between repeats), so a change of machine load hits both alike. Prints the median
step time of each and their ratio (wall time, and the process's CPU time, which a machine loaded
by other work disturbs less), and the largest difference of the loss and of the parameters
after the same steps from the same state.
"""
import argparse
import os
import statistics
import time

parser = argparse.ArgumentParser()
parser.add_argument("--configs", nargs="*", default=["configs/moco_fashion_mnist.py:tiny",
                                                    "configs/moco_fashion_mnist_cpu.py"])
parser.add_argument("--repeats", type=int, default=6)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--layer_shapes", nargs="*", default=["128,14,14,16", "256,32,32,64"],
                    help="also one BatchNorm layer's forward + backward on these (B,H,W,C)")
args = parser.parse_args()
# A CPU benchmark: XLA's own convolutions, as launch/local.sh runs (docs/performance.md, CPU
# advice); a value already in XLA_FLAGS wins.
if "--xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_experimental_ynn_fusion_type=").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcontrast import config_lib  # noqa: E402
from jaxcontrast.bench import step as step_lib  # noqa: E402
from jaxcontrast.models import norm  # noqa: E402

_TWO_STAGE = norm._by_platform  # pylint: disable=protected-access


def _plain(impl, *args):
  return impl(*args, two_stage=False)


def compiled_step(config, variant):
  """(compiled step, state, batch) with BatchNorm's train path forced to `variant`."""
  norm._by_platform = _TWO_STAGE if variant == "two-stage" else _plain  # pylint: disable=protected-access
  try:
    _, _, jitted, state, batch = step_lib.build(config, devices=1)
    lowered = jitted.lower(state, batch)
    compiled = lowered.compile()
  finally:
    norm._by_platform = _TWO_STAGE  # pylint: disable=protected-access
  return compiled, state, batch, lowered.as_text().count("optimization_barrier")


def bench_layer(shape):
  """One train-mode BatchNorm forward + backward (input and affine gradients), A/B."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  r = jnp.asarray(rng.normal(size=shape), jnp.float32)
  bn = norm.GroupedBatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  loss = lambda p, x, r: jnp.sum(bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                          mutable=["batch_stats"])[0] * r)
  fns = {}
  for variant in ("two-stage", "plain"):
    norm._by_platform = _TWO_STAGE if variant == "two-stage" else _plain  # pylint: disable=protected-access
    try:
      fns[variant] = jax.jit(jax.grad(loss, (0, 1))).lower(v["params"], x, r).compile()
    finally:
      norm._by_platform = _TWO_STAGE  # pylint: disable=protected-access
  times = {k: [] for k in fns}
  for i in range(args.repeats):
    for variant in (fns if i % 2 == 0 else list(fns)[::-1]):
      jax.block_until_ready(fns[variant](v["params"], x, r))
      c0 = time.process_time()
      for _ in range(args.steps):
        out = fns[variant](v["params"], x, r)
      jax.block_until_ready(out)
      times[variant].append((time.process_time() - c0) / args.steps)
  ratios = [p / s for p, s in zip(times["plain"], times["two-stage"])]
  print(f"  BatchNorm forward + backward {shape}: CPU time two-stage "
        f"{1e3 * statistics.median(times['two-stage']):.1f} ms, plain "
        f"{1e3 * statistics.median(times['plain']):.1f} ms, plain / two-stage median "
        f"{statistics.median(ratios):.2f} (per repeat {', '.join(f'{x:.2f}' for x in ratios)})")


def main():
  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
  for shape in args.layer_shapes:
    bench_layer(tuple(int(d) for d in shape.split(",")))
  for spec in args.configs:
    config = config_lib.load_config(spec)
    variants = ("two-stage", "plain")
    runs = {}
    for v in variants:
      t0 = time.perf_counter()
      compiled, state, batch, barriers = compiled_step(config, v)
      runs[v] = dict(compiled=compiled, state=state, batch=batch, times=[], cpu_times=[],
                     compile_s=time.perf_counter() - t0, barriers=barriers)
    # Same state, same batch: the two programs' results after `steps` steps.
    finals = {}
    for v in variants:
      r = runs[v]
      state = jax.tree.map(np.array, r["state"])
      for _ in range(args.steps):
        state, metrics = r["compiled"](state, r["batch"])
      finals[v] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params))
    for i in range(args.repeats):
      for v in (variants if i % 2 == 0 else variants[::-1]):
        r = runs[v]
        state = jax.tree.map(np.array, r["state"])
        state, metrics = r["compiled"](state, r["batch"])   # warm-up
        jax.block_until_ready(metrics["loss"])
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
          state, metrics = r["compiled"](state, r["batch"])
        jax.block_until_ready(metrics["loss"])
        r["times"].append((time.perf_counter() - t0) / args.steps)
        r["cpu_times"].append((time.process_time() - c0) / args.steps)
    b = config.global_batch_size
    print(f"\n{spec}: batch {b}, load average now {os.getloadavg()}")
    for v in variants:
      t = runs[v]["times"]
      print(f"  {v:<10} median {1e3 * statistics.median(t):8.1f} ms/step "
            f"({b / statistics.median(t):7.1f} images/s), min {1e3 * min(t):8.1f}, "
            f"max {1e3 * max(t):8.1f}; compile {runs[v]['compile_s']:.1f} s; "
            f"opt-barriers in the program: {runs[v]['barriers']}")
    for key, what in (("times", "wall"), ("cpu_times", "CPU (all threads of the process)")):
      ratios = [p / s for p, s in zip(runs["plain"][key], runs["two-stage"][key])]
      print(f"  plain / two-stage step time, {what}: median {statistics.median(ratios):.3f} "
            f"(per repeat {', '.join(f'{x:.2f}' for x in ratios)}); medians "
            f"{1e3 * statistics.median(runs['two-stage'][key]):.1f} / "
            f"{1e3 * statistics.median(runs['plain'][key]):.1f} ms")
    (loss_a, params_a), (loss_b, params_b) = finals["two-stage"], finals["plain"]
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)))
    print(f"  after {args.steps} steps: loss {loss_a:.6f} vs {loss_b:.6f}, "
          f"largest parameter difference {diff:.2e}")


if __name__ == "__main__":
  main()
