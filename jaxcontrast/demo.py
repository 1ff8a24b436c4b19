"""A short demo of the loss library: every loss on the same embeddings, then the K-sharded MoCo
loss on 8 (simulated) devices checked against the single-device value.

  python -m jaxcontrast.demo
"""
import argparse


def main(argv=None):
  # Takes no options; --help describes the demo instead of running it.
  argparse.ArgumentParser(prog="python -m jaxcontrast.demo", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  # On a CPU backend, 8 simulated devices for the sharded check (a JAX option read by the CPU
  # backend only, set in main: importing this module changes nothing); GPUs and TPUs use theirs.
  jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jaxcontrast import losses  # pylint: disable=g-import-not-at-top

  rng = jax.random.split(jax.random.key(0), 4)
  batch, queue_size, dim, support = 16, 64, 32, 4
  query = jax.random.normal(rng[0], (batch, dim))
  key = query + 0.5 * jax.random.normal(rng[1], (batch, dim))        # a noisy positive
  queue = losses.l2_normalize(jax.random.normal(rng[2], (queue_size, dim)))
  queue = queue.at[:8].set(losses.l2_normalize(key[:8] + 0.1))         # plant false negatives
  support_keys = key[:, None] + 0.2 * jax.random.normal(rng[3], (batch, support, dim))
  rows = {
      "moco_infonce": losses.moco_infonce(query, key, queue, temperature=0.2),
      "moco_infonce (in-batch)": losses.moco_infonce(query, key, None, temperature=0.2),
      "sce": losses.sce(query, key, queue),
      "co2_consistency": losses.co2_consistency(query, key, queue),
      "xmoco_cross_consistency": losses.xmoco_cross_consistency(query, key),
      "xmoco_negative_uniformity": losses.xmoco_negative_uniformity(query, queue),
      "fnc (attraction)": losses.fnc(query, key, queue, support_keys=support_keys, threshold=0.5),
      "fnc (elimination)": losses.fnc(query, key, queue, support_keys=support_keys,
                                      threshold=0.5, mode="elimination"),
  }
  print(f"{'loss':28s} {'value':>8s}  metrics")
  for name, (value, metrics) in rows.items():
    shown = ", ".join(f"{k}={float(v):.3f}" for k, v in sorted(metrics.items()))
    print(f"{name:28s} {float(value):8.4f}  {shown}")

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.shard_map(
      lambda q, k, Q: losses.moco_infonce(q, k, Q, temperature=0.2, axis_name="data")[0],
      mesh=mesh, in_specs=(jax.P("data"),) * 3, out_specs=jax.P())
  single = rows["moco_infonce"][0]
  value = sharded(query, key, queue)
  grad_gap = jnp.max(jnp.abs(
      jax.grad(lambda q: sharded(q, key, queue))(query) -
      jax.grad(lambda q: losses.moco_infonce(q, key, queue, temperature=0.2)[0])(query)))
  print(f"\nK-sharded moco_infonce on {jax.device_count()} devices (each holds "
        f"{queue_size // jax.device_count()} queue rows): {float(value):.6f} vs single device "
        f"{float(single):.6f}; max gradient difference {float(grad_gap):.1e}")


if __name__ == "__main__":
  main()
