"""Benchmark SePP pair mining: throughput and same-label rate on Fashion-MNIST train (60,000).

Not a test: prints numbers, never fails on timing. Embedding = raw pixels (784-D, L2-normalised),
the `--embedding pixels` baseline of `python -m jaxcontrast.semantic_pairs`.

  .venv/bin/python benchmarks/bench_semantic_pairs.py                  # default device
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_semantic_pairs.py --n 20000

What it prints:
1. a block/chunk size sweep on a subset (throughput only);
2. the full mining run at --top_k/--threshold via the CLI's embed_fn + batches path: embedding
   time, mining time, images/s (first block's compile included), pairs, coverage, same-label
   rate;
3. same-label rate and coverage over a grid of (top_k, threshold), read off one run at
   max top_k with no threshold (rows are sorted, so every smaller setting is a prefix + filter).
"""
import argparse
import logging
import time

import jax
import numpy as np

from jaxcontrast.data import pairs as pairs_lib
from jaxcontrast.data.fashion_mnist import load_fashion_mnist_numpy
from jaxcontrast.eval import mining


def restrict(pairs: pairs_lib.SemanticPairs, top_k: int, threshold: float
             ) -> pairs_lib.SemanticPairs:
  """The pairs a run with (top_k, threshold) would give, from a run at larger k, lower t."""
  keep = pairs.similarities[:, :top_k] > threshold
  return pairs_lib.SemanticPairs(np.where(keep, pairs.indices[:, :top_k], -1).astype(np.int32),
                                 np.where(keep, pairs.similarities[:, :top_k], -np.inf
                                   ).astype(np.float32))


def timed_mine(embeddings, **kwargs):
  start = time.perf_counter()
  pairs = mining.mine_semantic_pairs(embeddings, log_every_s=0, **kwargs)
  return pairs, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=60_000)
  parser.add_argument("--top_k", type=int, default=10)
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--block_size", type=int, default=1024)
  parser.add_argument("--chunk_size", type=int, default=None)
  parser.add_argument("--sweep_n", type=int, default=10_000)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)

  images, labels = load_fashion_mnist_numpy("train")
  images, labels = images[:args.n], labels[:args.n]
  n = len(images)
  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind}; jax {jax.__version__}; N={n}, D=784")

  # 1. Block-size sweep on a subset (compile excluded: second call of each shape).
  pixels = images.reshape(n, -1).astype(np.float32)
  sub = pixels[:args.sweep_n]
  print(f"\nblock/chunk sweep on {len(sub)} images (top_k={args.top_k}, "
        f"threshold={args.threshold}, compile excluded):")
  for block, chunk in [(256, 256), (512, 512), (1024, 1024), (1024, 4096), (2048, 2048),
                       (4096, 4096)]:
    kw = dict(threshold=args.threshold, top_k=args.top_k, block_size=block, chunk_size=chunk)
    timed_mine(sub, **kw)
    _, seconds = timed_mine(sub, **kw)
    print(f"  block {block:5d} chunk {chunk:5d}: {len(sub) / seconds:9.0f} images/s")

  # 2. The full run, as the CLI does it.
  batches = mining.numpy_batches(images, labels, batch_size=1024)
  embed_fn = jax.jit(mining.pixel_embed_fn)
  start = time.perf_counter()
  embeddings, batch_labels = mining.embed_dataset(embed_fn, batches)
  embed_s = time.perf_counter() - start
  pairs, mine_s = timed_mine(embeddings, labels=batch_labels, threshold=args.threshold,
                             top_k=args.top_k, block_size=args.block_size,
                             chunk_size=args.chunk_size)
  m = pairs.metadata
  print(f"\nfull run: top_k={args.top_k} threshold={args.threshold} block={m['block_size']} "
        f"chunk={m['chunk_size']}")
  print(f"  embedding: {embed_s:.2f} s ({n / embed_s:.0f} images/s)")
  print(f"  mining:    {mine_s:.2f} s ({n / mine_s:.0f} images/s, "
        f"{2 * n * n * 784 / mine_s / 1e9:.0f} GFLOP/s in similarity matmuls)")
  print(f"  pairs {m['num_pairs']}, coverage {m['coverage']:.3f}, mean partners "
        f"{m['mean_partners']:.2f}, same-label rate {m['same_label_rate']:.4f} "
        f"(chance {m['chance_same_label_rate']:.4f})")

  # 3. Same-label rate over a grid, from one run with no threshold.
  ks, ts = (1, 5, 10, 20, 50), (0.0, 0.8, 0.85, 0.9, 0.95)
  wide, wide_s = timed_mine(embeddings, threshold=-np.inf, top_k=max(ks),
                            block_size=args.block_size, chunk_size=args.chunk_size)
  print(f"\nsame-label rate / coverage grid (one top_k={max(ks)} run, {n / wide_s:.0f} "
        f"images/s):")
  print("  top_k \\ threshold " + "".join(f"{t:>16}" for t in ts))
  for k in ks:
    cells = []
    for t in ts:
      p = restrict(wide, k, t)
      cells.append(f"{pairs_lib.same_label_rate(p, labels):.3f} / {pairs_lib.coverage(p):.2f}")
    print(f"  {k:>18} " + "".join(f"{c:>16}" for c in cells))
  check = restrict(wide, args.top_k, args.threshold)
  agree = np.mean(check.indices == pairs.indices)
  print(f"\n(consistency: restricted grid run vs direct run, fraction of equal ids {agree:.5f})")


if __name__ == "__main__":
  main()
