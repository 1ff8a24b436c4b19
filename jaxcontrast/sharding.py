"""Device mesh, shardings, and host-local -> global arrays.

One mesh axis, `data`, splits the batch (and, in `sharded` queue mode, the queue rows). Meshes use
`AxisType.Auto`: the default Explicit axes of recent JAX break host-side indexing of arrays.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis `data`."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch_from_local(mesh: Mesh, local_batch):
  """Host-local numpy batch (this process's rows) -> global arrays split on `data`.

  On one process this is a device_put; on many, each process contributes its own rows
  (`jax.make_array_from_process_local_data`), so the global batch is the concatenation of the
  processes' batches in process order.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, *, timeout_s: int = 300,
                                 heartbeat_s: int = 100) -> None:
  """`jax.distributed.initialize` when running as one of several processes.

  With no arguments, JAX auto-detects TPU pod workers and SLURM tasks; on a single plain process
  (nothing to detect) this is a no-op. With a coordinator, every process must connect within
  `timeout_s` seconds, else this raises (a missing or crashed process ends the others instead of
  leaving them waiting); later, a process silent for `heartbeat_s` seconds (dead) ends the others.
  """
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_s)
    return
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_s)
  except (ValueError, RuntimeError):
    pass  # Single process: nothing to coordinate with.


def define_distributed_flags(flag_values=None):
  """Defines the entry points' multi-process flags; returns `initialize()`, which checks them
  and calls `maybe_initialize_distributed`.

  --coordinator_address / --num_processes / --process_id (together) start one process of a run
  where nothing can be auto-detected (TPU VMs and SLURM need none of them); --distributed_timeout
  bounds the wait for the other processes at start-up, --heartbeat_timeout the silence of a
  dead one later.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, with --num_processes and "
      "--process_id.", flag_values=fv)
  num_processes = flags.DEFINE_integer("num_processes", None, "Processes in the run.",
                                       flag_values=fv)
  process_id = flags.DEFINE_integer("process_id", None,
                                    "This process, 0 .. num_processes - 1.", flag_values=fv)
  timeout = flags.DEFINE_integer(
      "distributed_timeout", 300, "Seconds to wait for every process at start-up; then fail "
      "(with the processes that did not connect named by JAX) instead of hanging.",
      flag_values=fv)
  heartbeat = flags.DEFINE_integer(
      "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as "
      "dead and JAX's coordination service ends the others.", flag_values=fv)

  def initialize() -> None:
    explicit = (coordinator.value, num_processes.value, process_id.value)
    if any(v is not None for v in explicit) and None in explicit:
      raise flags.ValidationError(
          "--coordinator_address, --num_processes and --process_id go together")
    maybe_initialize_distributed(*explicit, timeout_s=timeout.value,
                                 heartbeat_s=heartbeat.value)
  return initialize
