"""The collectives of the compiled train step, read from its optimized HLO, next to the formulas
docs/distributed.md's communication section uses (not a test: prints numbers).

  .venv/bin/python benchmarks/collectives.py                       # MoCo v2 (Shuffle BN), K sharded
  .venv/bin/python benchmarks/collectives.py --method sce --queue_mode replicated
  .venv/bin/python benchmarks/collectives.py --arch resnet50 --width 1 --image_size 224

Compiles the step on 8 simulated CPU devices (a small model by default: ResNet-50 at width 1/4,
32 px, global batch 64) and sums the result bytes of every all-reduce, all-gather, all-to-all,
reduce-scatter and collective-permute in the optimized HLO (tuples: every element). The formula
side, per step, with P parameters, B global batch, D embedding width, image H x W x 3:
  gradients        all-reduce of P float32                       4 P bytes
  Shuffle BN       the key batch permuted across devices         4 B H W 3 bytes (images)
                   (and the keys permuted back)                  + 4 B D
  sharded queue    the queries gathered to every block           4 B D (per direction)
  replicated queue the step's keys gathered to every device      4 B D (per enqueued view)
  SyncBN           per BN layer, mean and variance               small (2 C floats per layer)
XLA may fuse or split these (e.g. an all-gather as an all-reduce of a zero-padded buffer), so the
comparison is by total bytes per kind, printed side by side.
"""
import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--method", default="moco")
parser.add_argument("--arch", default="resnet50")
parser.add_argument("--width", type=float, default=0.25)
parser.add_argument("--image_size", type=int, default=32)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--queue_size", type=int, default=65536)
parser.add_argument("--queue_mode", default="sharded", choices=["replicated", "sharded"])
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--augment_on", default="host", choices=["host", "device"],
                    help="device: uint8 views + params, finished in the step")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402

from jaxcontrast import config_lib  # noqa: E402
from jaxcontrast.bench import step as step_lib  # noqa: E402

from jaxcontrast.bench.profile import hlo_collectives  # noqa: E402


def main():
  c = config_lib.load_config(f"configs/{args.method}_imagenet2012.py")
  with c.unlocked():
    c.model.update(arch=args.arch, width=args.width)
    if args.width < 1:
      c.model.proj_hidden_dims = tuple(int(d * args.width) for d in c.model.proj_hidden_dims)
      if c.model.pred_dim:
        c.model.pred_hidden_dims = tuple(int(d * args.width) for d in c.model.pred_hidden_dims)
    c.data.image_size = args.image_size
    c.global_batch_size = args.batch
    c.queue.size, c.queue.mode = args.queue_size, args.queue_mode
    c.data.augment_on = args.augment_on
  _, _, jitted, state, batch = step_lib.build(c, devices=args.devices)
  hlo = jitted.lower(state, batch).compile().as_text()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  b, d, s = args.batch, int(c.model.proj_dim), args.image_size
  directions = 2 if c.objective.symmetric else 1
  formula = {
      "gradients (all-reduce, 4 P)": 4 * params,
      "Shuffle BN images (4 B H W 3)": 4 * b * s * s * 3 * directions if c.bn.mode == "shuffle"
      else 0,
      "keys / queries (4 B D per direction)": 4 * b * d * directions,
  }
  print(f"{args.method}, {args.arch} x{args.width}, {s} px, batch {b}, K {args.queue_size} "
        f"({args.queue_mode}), bn {c.bn.mode}, {args.devices} devices; P = {params:,} params")
  print("compiled HLO (result bytes per step, summed over ops):")
  for kind, (count, nbytes) in sorted(hlo_collectives(hlo).items()):
    print(f"  {kind:<20} {count:4d} ops  {nbytes / 2**20:10.2f} MiB")
  print("formulas:")
  for name, nbytes in formula.items():
    print(f"  {name:<40} {nbytes / 2**20:10.2f} MiB")


if __name__ == "__main__":
  main()
