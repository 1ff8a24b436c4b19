"""Training throughput of ResNet-18 with conv_impl "xla" vs "matmul" (not a test).

Times one forward + backward pass (train-mode BatchNorm, gradient of a scalar function of the
pooled features with respect to all parameters) after compilation, and prints images/s. On CPU
XLA's convolution weight-gradient is slow, which is what the "matmul" implementation
(patches + einsum, see jaxcontrast/models/conv.py) avoids.

  .venv/bin/python benchmarks/bench_conv.py                       # widths 0.25 and 1.0
  .venv/bin/python benchmarks/bench_conv.py --widths 0.25 --iters 5 --stem imagenet
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcontrast.models import build_resnet


def bench(width: float, impl: str, *, batch: int, size: int, stem: str, dtype: str,
          iters: int) -> tuple[float, float]:
  """Returns (images per second, compile seconds) of a jitted forward+backward step."""
  net = build_resnet("resnet18", stem=stem, width=width, conv_impl=impl,
                     dtype=jnp.dtype(dtype))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x)

  @jax.jit
  def step(params, batch_stats, x):
    def loss(params):
      y, upd = net.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                         mutable=["batch_stats"])
      return jnp.mean(jnp.square(y.astype(jnp.float32))), upd["batch_stats"]
    return jax.grad(loss, has_aux=True)(params)

  t0 = time.perf_counter()
  jax.block_until_ready(step(variables["params"], variables["batch_stats"], x))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    out = step(variables["params"], variables["batch_stats"], x)
  jax.block_until_ready(out)
  return batch * iters / (time.perf_counter() - t0), compile_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
  parser.add_argument("--impls", nargs="+", default=["xla", "matmul"])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--stem", default="cifar", choices=["cifar", "cifar_s2", "imagenet"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; ResNet-18 {args.stem} "
        f"stem, {args.size}x{args.size}x3, batch {args.batch}, {args.dtype}, fwd+bwd")
  for width in args.widths:
    for impl in args.impls:
      ips, compile_s = bench(width, impl, batch=args.batch, size=args.size, stem=args.stem,
                             dtype=args.dtype, iters=args.iters)
      print(f"width {width:<5} conv_impl {impl:<7} {ips:9.1f} images/s "
            f"(compile {compile_s:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
