"""Stop requests: SIGTERM, SIGINT or SIGHUP -> finish the current step, save, exit cleanly.

What each signal means to a run:

* SIGTERM: a preemption notice (GCE maintenance, spot VMs, SLURM's time limit and `scancel`,
  `launch/tpu_pod.sh --stop`): save and stop.
* SIGINT (Ctrl-C): the user wants to stop; the work so far is kept, so it is treated as SIGTERM.
  A second Ctrl-C on a single-process run stops at once (KeyboardInterrupt), for when the save
  itself hangs.
* SIGHUP: the terminal went away (a dropped SSH session); a run still attached to it would be
  killed without a checkpoint, so it saves and stops too, and the same command resumes it.
A signal that was ignored when the run started (`nohup` ignores SIGHUP, a shell's background job
SIGINT) stays ignored: a detached run is meant to survive its terminal.

Several processes must stop at the same step (a save is collective: a process that stopped alone
would leave the others waiting forever). With several processes we therefore ask JAX's preemption
sync point: `jax.distributed` installs a notifier that listens to SIGTERM only, tells the other
processes through the coordination service, and Orbax's `CheckpointManager.reached_preemption`
becomes True on every process at the same step (one past the furthest step any process had
reached), so a signal to one process stops them all. SIGINT and SIGHUP are forwarded to that
notifier as a SIGTERM to the process itself. A single process has no sync point: it catches the
signals itself and stops after the step in flight.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger("jaxcontrast")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class PreemptionWatcher:
  """`reached(step)`: True once the run should save and stop after `step` (every process must
  call it after every step)."""

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._multi = jax.process_count() > 1
    self.signalled = None     # name of the first stop signal this process caught
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return                  # Python delivers signals to the main thread only.
    for sig in STOP_SIGNALS:
      if self._multi and sig == signal.SIGTERM:
        continue              # JAX's notifier has it.
      if signal.getsignal(sig) == signal.SIG_IGN:
        continue              # Detached on purpose (nohup, background job).
      self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signalled is not None and signum == signal.SIGINT and not self._multi:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    if self.signalled is None:
      self.signalled = name
      log.warning("%s: saving a checkpoint after the current step, then stopping", name)
    if self._multi:
      # Only a SIGTERM reaches the sync point's notifier.
      os.kill(os.getpid(), signal.SIGTERM)

  def begin(self, step: int) -> bool:
    """Called once before the first step of a run that starts at `step`; True when a stop was
    asked for during start-up (then every process returns True).

    JAX's sync point compares the step numbers the processes report, which start at 0: a notice
    that arrives before any report (during a resumed run's start-up) sets the sync point to 1,
    which a run resumed past step 1 would never reach. Reporting step 1, then the start step,
    catches that case and leaves later notices to sync one past the start step.
    """
    if not self._multi:
      return self.signalled is not None
    if step == 0:
      return False
    early = bool(self._checkpointer.reached_preemption(1))
    self._checkpointer.reached_preemption(step)
    return early

  def reached(self, step: int) -> bool:
    if self._multi:
      return bool(self._checkpointer.reached_preemption(step))
    return self.signalled is not None

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
