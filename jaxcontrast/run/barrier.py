"""Waiting for every process of a multi-process run without a device collective.

A barrier of JAX's coordination service (through Orbax's public `multihost.get_barrier_sync_fn`)
instead of `multihost_utils.sync_global_devices`: a device collective's first run connects the
processes' devices, and CPU collectives (gloo) wait only 30 s for a peer there, so processes
arriving further apart fail; the coordination service waits as long as it is told.
"""
from __future__ import annotations

import itertools

import jax

# Long enough for a slow compile or restore on the slowest process of a pod.
DEFAULT_TIMEOUT_S = 1800
_barriers = itertools.count()   # a fresh barrier name per call, the same on every process


def wait_for_every_process(name: str, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Returns once every process has called this with `name` (at once on one process); fails
  after `timeout_s`. Every process must make the same sequence of calls."""
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
    multihost.get_barrier_sync_fn()(key=f"{name}_{next(_barriers)}", timeout_ms=timeout_s * 1000)
