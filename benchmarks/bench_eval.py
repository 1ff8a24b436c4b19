"""Benchmark the evaluation code on Fashion-MNIST-shaped features: full-batch probe and kNN.

Not a test: prints numbers, never fails on timing. Features: 512-D ReLU random projections of the
real Fashion-MNIST pixels (60,000 train, 10,000 test), i.e. the shape of a ResNet-18's pooled
features, so the solver and kNN costs are those of a real probe (the encoder's forward pass is
not included: see the probe JSON's "seconds.features" for that).

  .venv/bin/python benchmarks/bench_eval.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/bench_eval.py

Prints, with wall and process CPU seconds: the held-out L2 choice (all grid values at once),
the refit on 60k rows, test top-1; the kNN monitor's vote for 10k queries over a 60k memory
split over the mesh (k = 200, T = 0.1), first call (compile) and second call.
"""
import argparse
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast.data.fashion_mnist import load_fashion_mnist_numpy
from jaxcontrast.eval import knn, logistic
from jaxcontrast.eval.config import default_probe_config
from jaxcontrast.sharding import make_mesh


def timed(fn):
  w, c = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - w, time.process_time() - c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--skip_probe", action="store_true")
  parser.add_argument("--skip_knn", action="store_true")
  parser.add_argument("--max_iter", type=int, default=None)
  args = parser.parse_args()
  x, y = load_fashion_mnist_numpy("train")
  xt, yt = load_fashion_mnist_numpy("test")
  proj = np.random.default_rng(0).normal(size=(784, args.dim)).astype(np.float32) / 28
  feats = lambda a: np.maximum(a.reshape(len(a), -1).astype(np.float32) / 255 @ proj, 0)
  x, xt = feats(x), feats(xt)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; features {x.shape}, "
        f"{xt.shape}")
  if not args.skip_probe:
    fb = default_probe_config().full_batch
    if args.max_iter:
      fb.max_iter = args.max_iter
    sel, w, c = timed(lambda: logistic.select_l2(
        x, y, num_classes=10, l2_grid=fb.l2_grid, held_out_fraction=fb.held_out_fraction,
        max_iter=fb.max_iter, tol=fb.tol))
    print(f"probe: L2 choice over {len(fb.l2_grid)} values on {len(y) - sel['held_out_size']} "
          f"rows: {w:.1f} s wall, {c:.1f} s CPU; chose {sel['l2']:g} (held-out top-1 "
          f"{sel['held_out_top1']:.4f}); iterations {[g['iterations'] for g in sel['grid']]}")
    std = logistic.Standardizer.fit(x)
    (params, info), w2, c2 = timed(lambda: logistic.fit_logistic(
        std(x), y, num_classes=10, l2=sel["l2"], max_iter=fb.max_iter, tol=fb.tol,
        init=sel["params"]))
    top1 = logistic.accuracy(logistic.predict_scores(params, std(xt)), yt)
    print(f"probe: refit on 60000 rows: {w2:.1f} s wall, {c2:.1f} s CPU, {info}; test top-1 "
          f"{top1:.4f}; total solver {w + w2:.1f} s wall")
  if not args.skip_knn:
    mesh = make_mesh()
    rows = NamedSharding(mesh, P("data"))
    n = len(x) // mesh.devices.size * mesh.devices.size
    memory = jax.device_put(np.asarray(knn.l2_normalize(x[:n])), rows)
    labels = jax.device_put(y[:n].astype(np.int32), rows)
    score = jax.jit(lambda q, m, l: knn.knn_scores(q, m, l, k=200, temperature=0.1,
                                                     num_classes=10, mesh=mesh))

    def run():
      correct = 0
      for s in range(0, len(xt), 256):
        q = xt[s:s + 256]
        pad = 256 - len(q)
        q = np.concatenate([q, np.ones((pad, q.shape[1]), np.float32)]) if pad else q
        pred = np.asarray(score(q, memory, labels)).argmax(1)[:256 - pad]
        correct += int((pred == yt[s:s + 256]).sum())
      return correct / len(yt)
    for name in ("first (compile)", "second"):
      top1, w, c = timed(run)
      print(f"kNN {name}: {len(yt)} queries x {n} memory: {w:.1f} s wall, {c:.1f} s CPU, "
            f"top-1 {top1:.4f}")


if __name__ == "__main__":
  main()
