"""The convolutions of a ResNet-18 with the CIFAR stem, one at a time: XLA against PyTorch.

For each 3x3 convolution shape of the network (batch 256, float32, NHWC), the median ms of the
forward, the input gradient and the filter gradient as XLA compiles them, and, when torch is
installed, PyTorch's channels_last forward and its backward (input + filter gradients together,
timed as forward-and-backward minus forward). Then one large matrix product in both, for the
machine's matmul rate. One JSON object per line on stdout.

`--alternatives` also times two other JAX formulations, each checked against XLA's result: the
input gradient of the stride-2 convolutions as four stride-1 convolutions with the kernel's
sub-grids (polyphase), and the stride-1 forward as Winograd F(2x2, 3x3). Neither is used by the
library (docs/performance.md, "CPU step against PyTorch").

  python benchmarks/bench_conv_kernels.py [--batch 256] [--repeats 5] [--alternatives]

XLA_FLAGS get `--xla_cpu_experimental_ynn_fusion_type=` (XLA's own convolutions), as
launch/local.sh runs on CPU (docs/performance.md, CPU advice), so this measures the kernels a
CPU training run uses; set `--xla_cpu_experimental_ynn_fusion_type=...` yourself to compare
YNNPACK's.
"""
import argparse
import json
import os
import statistics

from jaxcontrast.bench.step import time_calls

# (spatial size, input channels, output channels, stride) of the 3x3 convolutions.
SHAPES = ((32, 64, 64, 1), (16, 128, 128, 1), (8, 256, 256, 1), (4, 512, 512, 1),
          (32, 64, 128, 2), (16, 128, 256, 2), (8, 256, 512, 2))
MATMUL = (16384, 2304, 256)   # the (8, 256, 256) convolution's im2col product


def _median_ms(fn, repeats):
  """Median wall ms of `repeats` calls after one warm-up; `fn()` must block until done."""
  return round(statistics.median(time_calls(fn, steps=repeats, warmup=1)) * 1e3, 1)


def _gflop(batch, size, cin, cout, stride):
  out = size // stride
  return 2 * batch * out * out * cin * cout * 9 / 1e9


def bench_xla(batch, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for size, cin, cout, stride in SHAPES:
    x = jax.device_put(rng.standard_normal((batch, size, size, cin), np.float32))
    w = jax.device_put(0.05 * rng.standard_normal((3, 3, cin, cout), np.float32))
    g = jax.device_put(rng.standard_normal((batch, size // stride, size // stride, cout),
                                           np.float32))

    def conv(x, w, stride=stride):
      return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    row = {"impl": "xla", "shape": [size, cin, cout, stride],
           "gflop_forward": round(_gflop(batch, size, cin, cout, stride), 2),
           "forward_ms": _median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
           "input_grad_ms": _median_ms(lambda: dx(x, w, g).block_until_ready(), repeats),
           "filter_grad_ms": _median_ms(lambda: dw(x, w, g).block_until_ready(), repeats)}
    print(json.dumps(row), flush=True)
  m, k, n = MATMUL
  a = jax.device_put(rng.standard_normal((m, k), np.float32))
  b = jax.device_put(rng.standard_normal((k, n), np.float32))
  mm = jax.jit(lambda a, b: a @ b)
  ms = _median_ms(lambda: mm(a, b).block_until_ready(), repeats)
  print(json.dumps({"impl": "xla", "matmul": list(MATMUL), "ms": ms,
                    "gflop_per_s": round(2 * m * k * n / ms / 1e6)}), flush=True)


def _polyphase_input_grad(g, w):
  """Input gradient of a 3x3, stride-2, padding-1 convolution over an even-sized input, from
  its output gradient `g` (B, h, w, D): output row 2a of the input gradient gets kernel row 1
  at gradient row a; row 2a+1 gets kernel row 2 at a and kernel row 0 at a+1 (the same for
  columns). Four stride-1 convolutions, interleaved."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  wt = jnp.swapaxes(w, 2, 3)   # (3, 3, D, C): gradient channels -> input channels
  taps = {0: ([1], (0, 0)), 1: ([2, 0], (0, 1))}   # parity -> kernel taps, padding
  rows = []
  for row_parity in (0, 1):
    row_taps, row_pad = taps[row_parity]
    cols = []
    for col_parity in (0, 1):
      col_taps, col_pad = taps[col_parity]
      kernel = wt[jnp.array(row_taps)][:, jnp.array(col_taps)]
      cols.append(jax.lax.conv_general_dilated(g, kernel, (1, 1), (row_pad, col_pad),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")))
    rows.append(jnp.stack(cols, axis=3))   # (B, h, w, 2, C)
  out = jnp.stack(rows, axis=2)            # (B, h, 2, w, 2, C)
  b, h, _, w_, _, c = out.shape
  return out.reshape(b, 2 * h, 2 * w_, c)


_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINO_G = ((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(matrix, items):
  """[sum_j matrix[i][j] * items[j] for each row i], skipping zero coefficients."""
  out = []
  for row in matrix:
    terms = [c * item for c, item in zip(row, items) if c]
    out.append(sum(terms[1:], terms[0]))
  return out


def _winograd_forward(x, w):
  """3x3, stride-1, padding-1 convolution as Winograd F(2x2, 3x3): Y = A^T [(G w G^T) . (B^T d
  B)] A per 4x4 input tile d and 2x2 output tile, the 16 tile products as one batched matmul."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, h, w_, c = x.shape
  d_out = w.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h2, w2 = h // 2, w_ // 2
  d = [[xp[:, i:i + 2 * h2:2, j:j + 2 * w2:2, :] for j in range(4)] for i in range(4)]
  t = [_combine(_WINO_BT, [d[i][j] for i in range(4)]) for j in range(4)]
  v = [_combine(_WINO_BT, [t[j][u] for j in range(4)]) for u in range(4)]
  v = jnp.stack([v[u][k] for u in range(4) for k in range(4)]).reshape(16, b * h2 * w2, c)
  g = jnp.asarray(_WINO_G, x.dtype)
  u_ = jnp.einsum("ua,abcd,vb->uvcd", g, w, g).reshape(16, c, d_out)
  m = jnp.einsum("pnc,pcd->pnd", v, u_).reshape(4, 4, b, h2, w2, d_out)
  r = [_combine(_WINO_AT, [m[u][k] for u in range(4)]) for k in range(4)]
  y = [[_combine(_WINO_AT, [r[k][i] for k in range(4)])[j] for j in range(2)]
       for i in range(2)]
  y = jnp.stack([jnp.stack(y[i], axis=3) for i in range(2)], axis=2)   # (B, h2, 2, w2, 2, D)
  return y.reshape(b, h, w_, d_out)


def bench_alternatives(batch, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for size, cin, cout, stride in SHAPES:
    x = jax.device_put(rng.standard_normal((batch, size, size, cin), np.float32))
    w = jax.device_put(0.05 * rng.standard_normal((3, 3, cin, cout), np.float32))
    conv = lambda x, w, stride=stride: jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if stride == 2:
      g = jax.device_put(rng.standard_normal((batch, size // 2, size // 2, cout), np.float32))
      xla = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
      alt = jax.jit(lambda x, w, g: _polyphase_input_grad(g, w))
      args, name = (x, w, g), "polyphase_input_grad"
    else:
      xla, alt = jax.jit(conv), jax.jit(_winograd_forward)
      args, name = (x, w), "winograd_forward"
    want, got = np.asarray(xla(*args)), np.asarray(alt(*args))
    print(json.dumps({
        "impl": name, "shape": [size, cin, cout, stride],
        "xla_ms": _median_ms(lambda: xla(*args).block_until_ready(), repeats),
        "alternative_ms": _median_ms(lambda: alt(*args).block_until_ready(), repeats),
        "max_abs_diff": float(np.max(np.abs(want - got))),
        "max_abs": float(np.max(np.abs(want)))}), flush=True)


def bench_torch(batch, repeats, threads):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(json.dumps({"impl": "torch", "skipped": f"torch not installed ({e})"}))
    return
  torch.set_num_threads(threads)
  channels_last = torch.channels_last
  for size, cin, cout, stride in SHAPES:
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=channels_last)
    w = (0.05 * torch.randn(cout, cin, 3, 3)).contiguous(memory_format=channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    conv = lambda x=x, w=w, stride=stride: torch.nn.functional.conv2d(x, w, stride=stride,
                                                                       padding=1)
    g = torch.randn_like(conv())

    def forward(conv=conv):
      with torch.no_grad():
        conv()
    both = lambda conv=conv, x=x, w=w, g=g: torch.autograd.grad(conv(), (x, w), g)
    forward_ms = _median_ms(forward, repeats)
    total_ms = _median_ms(both, repeats)
    print(json.dumps({"impl": "torch_channels_last", "shape": [size, cin, cout, stride],
                      "forward_ms": forward_ms,
                      "backward_ms": round(total_ms - forward_ms, 1)}), flush=True)
  m, k, n = MATMUL
  a, b = torch.randn(m, k), torch.randn(k, n)
  ms = _median_ms(lambda: a @ b, repeats)
  print(json.dumps({"impl": "torch", "matmul": list(MATMUL), "ms": ms,
                    "gflop_per_s": round(2 * m * k * n / ms / 1e6)}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--alternatives", action="store_true",
                      help="also time the polyphase input gradient and Winograd forward")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch.set_num_threads (0: the CPU count, as XLA uses)")
  args = parser.parse_args()
  # Before the first JAX computation: XLA reads XLA_FLAGS when its CPU backend starts.
  if "--xla_cpu_experimental_ynn_fusion_type=" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_experimental_ynn_fusion_type=").strip()
  bench_xla(args.batch, args.repeats)
  if args.alternatives:
    bench_alternatives(args.batch, args.repeats)
  bench_torch(args.batch, args.repeats, args.torch_threads or os.cpu_count())


if __name__ == "__main__":
  main()
