"""One pytree holds everything a step reads and writes, so one Orbax save captures a run:
step, online params, EMA (target) params, both BatchNorm statistics, optimizer state, queue.

The modules and the optimizer are not in it (they are static and live in the step's closure),
so the state is arrays only: it shards, donates and checkpoints as is.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast.sharding import DATA_AXIS
from jaxcontrast.step import queue as queue_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  batch_stats: Any
  ema_batch_stats: Any
  opt_state: Any
  queue: Optional[queue_lib.QueueState]


def init_train_state(rng: jax.Array, *, model, tx: optax.GradientTransformation,
                     sample_images: jax.Array, queue_size: int, queue_dim: int,
                     ema_init: str = "copy", queue_blocks: int = 1) -> TrainState:
  """Initialise all parts. `ema_init="copy"` starts the target as a copy of the online network
  (MoCo); "independent" initialises it separately (CEA-LIST/SCE, FNC). `queue_blocks`: the
  number of devices of a sharded queue (see `queue.init_queue`)."""
  model_rng, ema_rng, queue_rng = jax.random.split(rng, 3)
  variables = model.init(model_rng, sample_images, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if ema_init == "copy":
    ema_params, ema_batch_stats = params, batch_stats
  elif ema_init == "independent":
    ema_variables = model.init(ema_rng, sample_images, train=False)
    ema_params, ema_batch_stats = ema_variables["params"], ema_variables.get("batch_stats", {})
  else:
    raise ValueError(f"ema.init must be 'copy' or 'independent', got {ema_init!r}")
  queue = queue_lib.init_queue(queue_rng, queue_size, queue_dim, queue_blocks) if queue_size > 0 else None
  # Copies, not aliases: the state is donated leaf by leaf.
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=copy(ema_params),
                    batch_stats=batch_stats, ema_batch_stats=copy(ema_batch_stats),
                    opt_state=tx.init(params), queue=queue)


def state_shardings(state_shape: TrainState, mesh, queue_mode: str) -> TrainState:
  """Everything replicated, except the queue rows (keys, ids, labels) in `sharded` mode (split
  over `data`)."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, state_shape)
  if state_shape.queue is not None and queue_mode == "sharded":
    rows = NamedSharding(mesh, P(DATA_AXIS))
    shardings = shardings.replace(queue=shardings.queue.replace(keys=rows, ids=rows, labels=rows))
  return shardings
