"""Cost of normalising the negative queue inside the losses.

`moco_infonce` (forward + gradient w.r.t. the query, jitted) on a K x D queue with the queue
rows used as given (`normalize_queue=False`) against L2-normalised inside the loss
(`normalize_queue=True`, the default), timed interleaved A/B in one process.

  python benchmarks/bench_queue_normalize.py [--batch 256] [--size 65536] [--dim 128] [--reps 20]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcontrast import losses


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size", type=int, default=65536)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--reps", type=int, default=20)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(args.batch, args.dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(args.batch, args.dim)), jnp.float32)
  queue = losses.l2_normalize(jnp.asarray(rng.normal(size=(args.size, args.dim)), jnp.float32))

  def make(normalize):
    f = lambda q, k, Q: losses.moco_infonce(q, k, Q, normalize_queue=normalize)[0]
    return jax.jit(jax.value_and_grad(f))

  fns = {"as_given": make(False), "normalized_inside": make(True)}
  for f in fns.values():
    jax.block_until_ready(f(q, k, queue))
  times = {name: [] for name in fns}
  for _ in range(args.reps):
    for name, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(q, k, queue))
      times[name].append(time.perf_counter() - t)
  med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
  print(json.dumps({"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "jax": jax.__version__, "batch": args.batch, "size": args.size,
                    "dim": args.dim, "median_ms": med,
                    "overhead": med["normalized_inside"] / med["as_given"] - 1.0}))


if __name__ == "__main__":
  main()
