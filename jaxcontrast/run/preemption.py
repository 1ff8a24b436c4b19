"""Preemption: SIGTERM -> finish the current step, save, exit cleanly.

Several processes must stop at the same step (a save is collective: a process that stopped
alone would leave the others waiting forever). With several processes we therefore ask JAX's
preemption sync point (`jax.distributed` installs a SIGTERM notifier; Orbax's
`CheckpointManager.reached_preemption(step)` becomes True on every process at the same step).
A single process has no sync point, so it catches SIGTERM itself and stops after the step in
flight.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("jaxcontrast")


class PreemptionWatcher:
  """`reached(step)`: True once the run should save and stop after `step`."""

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._multi = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    # Only a flag: the step in flight finishes and the loop saves at the next step boundary.
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return bool(self._checkpointer.reached_preemption(step))
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
