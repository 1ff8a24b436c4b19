"""Batch permutations for the key branch that keep BatchNorm from leaking the positive pair.

MoCo's "Shuffle BN": if a query and its key are normalised with statistics of the same samples,
the network can cheat on the pretext task. Two ways to avoid that:

* `ghost` (one device, MoCo CIFAR demo / SCE CIFAR): BN statistics per group of G samples,
  strided (group s = samples s, s+G, s+2G, ...). The key batch is permuted so that no key lands in
  the group index its query had, and each key group draws from all the other query groups.
* `shuffle` (many devices, MoCo ImageNet): per-device statistics (contiguous groups, one per
  device) with the key batch randomly permuted across the whole global batch.

`perm[p]` is the image placed at position p of the key batch; encode `x[perm]`, then undo with
`unpermute`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ghost_permutation(rng: jax.Array, batch: int, groups: int) -> jax.Array:
  """A random permutation with `perm[p] % groups != p % groups` for every p.

  Position p sits in group h = p % G at slot j = p // G. Slots are relabelled at random (r), the
  position takes an image of group g = (h + 1 + r mod (G-1)) mod G, which differs from h and cycles
  through the G-1 other groups as r varies; within group g images are drawn in a random order.
  For each slot the map h -> g is a bijection, so every image is used exactly once.
  """
  if groups < 2:
    raise ValueError(f"ghost BN permutation needs at least 2 groups, got {groups}")
  if batch % groups:
    raise ValueError(f"batch {batch} is not divisible by the {groups} BN groups")
  per_group = batch // groups
  slot_rng, image_rng = jax.random.split(rng)
  positions = jnp.arange(batch)
  h, slot = positions % groups, positions // groups
  r = jax.random.permutation(slot_rng, per_group)[slot]
  g = (h + 1 + r % (groups - 1)) % groups
  order = jax.vmap(lambda k: jax.random.permutation(k, per_group))(
      jax.random.split(image_rng, groups))                     # (G, per_group)
  return g + groups * order[g, r]


def shuffle_permutation(rng: jax.Array, batch: int) -> jax.Array:
  """A uniformly random permutation of the global batch (MoCo's cross-device shuffle)."""
  return jax.random.permutation(rng, batch)


def unpermute(x: jax.Array, perm: jax.Array) -> jax.Array:
  """Inverse of `x_perm = x[perm]`: returns y with y[perm] = x_perm."""
  return jnp.zeros_like(x).at[perm].set(x, unique_indices=True)
