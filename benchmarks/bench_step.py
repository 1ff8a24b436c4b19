"""Time the compiled train step of every method on this machine (not a test).

  .venv/bin/python benchmarks/bench_step.py [--devices 1] [--steps 10] [--conv_impl matmul]
      [--queue_mode sharded] [--methods moco,sce]

ResNet-18 at width 1/4 (CIFAR stem), 32x32x3 inputs, global batch 64, K 4096, projector
128-128 (tiny but real), each method's small-dataset preset otherwise
(configs/<method>_fashion_mnist.py: MoCo's CIFAR-10 demo recipe, 8-group ghost BN). Prints
compile time and images/s (steps after compilation, timed with `block_until_ready`) per method.
"""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--conv_impl", default="xla", choices=["xla", "matmul"])
parser.add_argument("--queue_mode", default="replicated", choices=["replicated", "sharded"])
parser.add_argument("--methods", default="moco,co2,xmoco,sce,fnc,sepp")
args = parser.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxcontrast import config_lib, train  # noqa: E402
from jaxcontrast.sharding import global_batch_from_local, make_mesh  # noqa: E402


def bench(method):
  variant = ":queue_ids" if method == "sepp" else ""
  c = config_lib.load_config(f"configs/{method}_fashion_mnist.py{variant}")   # small-data preset
  c.model.update(width=0.25, proj_hidden_dims=(128,), proj_dim=128, conv_impl=args.conv_impl)
  if c.model.pred_dim:
    c.model.update(pred_hidden_dims=(128,), pred_dim=128)
  c.queue.size, c.global_batch_size = 4096, 64
  c.queue.mode = args.queue_mode
  mesh = make_mesh(args.devices)
  models = train.build_models(c, mesh)
  tx = optax.sgd(0.06, momentum=0.9)
  rng = np.random.RandomState(0)
  b = c.global_batch_size
  batch = {"view1": rng.rand(b, 32, 32, 3).astype(np.float32),
           "view2": rng.rand(b, 32, 32, 3).astype(np.float32),
           "id": np.arange(b, dtype=np.int32), "key_id": np.arange(b, dtype=np.int32)}
  if c.objective.fnc.num_support_views:
    batch["support"] = rng.rand(b, c.objective.fnc.num_support_views, 32, 32, 3).astype(np.float32)
  state, shardings = train.create_state(c, models=models, tx=tx, mesh=mesh,
                                        sample_images=jnp.zeros((2, 32, 32, 3)),
                                        rng=jax.random.key(0))
  step = train.jit_train_step(
      train.make_train_step(c, models=models, tx=tx, mesh=mesh, total_steps=1000,
                            base_rng=jax.random.key(1)), mesh=mesh, shardings=shardings)
  batch = global_batch_from_local(mesh, batch)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / args.steps
  extra = f" (+{c.objective.fnc.num_support_views} support views)" if method == "fnc" else ""
  print(f"{method:6s} compile {compile_s:6.1f} s   step {dt * 1e3:7.1f} ms   "
        f"{b / dt:7.1f} img/s{extra}   loss {float(m['loss']):.3f}", flush=True)


print(f"devices={args.devices} ({jax.devices()[0].platform}), conv_impl={args.conv_impl}, "
      f"queue {args.queue_mode}, ResNet-18 x1/4, 32x32, batch 64, K 4096, small-data presets "
      f"(ghost BN), {args.steps} timed steps")
for method in args.methods.split(","):
  bench(method)
