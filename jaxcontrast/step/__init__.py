"""The compiled train step and everything inside it (model code: pure functions and pytrees).

  train_step.py   builds the one `jax.jit` step of every method from a config
  state.py        the TrainState pytree (params, EMA params, BN statistics, optimizer, queue)
  queue.py        the negative queue: layout (replicated / sharded), FIFO writes, valid rows
  ema.py          the target network's momentum schedule and update
  bn_shuffle.py   the key-batch permutation of Shuffle BN
  objectives.py   each method's objective over queries, keys and the queue (uses losses/)
  diagnostics.py  false-negative diagnostics from class labels (metrics only)
  optim.py        optimizers and learning-rate schedules
"""
from jaxcontrast import _extras

_extras.require("jaxcontrast.step")
