"""Training progress on stdout: a one-line bar on a terminal, plain lines otherwise.

TTY: `step 120/1000 [=====>      ] 12% loss 5.1234 812 img/s ETA 0:01:48`, redrawn in place
(at most 10 times a second). Not a TTY (a log file, a batch job): one such line (without the
bar) every `log_every` steps. Images per second are counted from the end of the first step, so
compilation is left out; between log points the loss shown is the last one pulled from the
device (the loop pulls metrics only every `log_every` steps).

Why not a library: without a terminal, tqdm writes its carriage-return frames into the log file
(a 200-step loop: 202 frames on one line) where this prints one line per log point, and on a
terminal it would only draw the bar: the images/s counted from the end of the compiling step,
the ETA from them and the loss would still be computed here. clu's `ReportProgress` reports
steps/s and ETA through absl logging and work-unit notes, without the loss or images/s.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _duration(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Progress of steps [start, total); `update` every step, `log` at log points."""

  def __init__(self, *, total: int, start: int, global_batch: int,
               stream: Optional[TextIO] = None, interactive: Optional[bool] = None,
               enabled: bool = True, width: int = 24, clock=time.perf_counter):
    self.total, self.global_batch, self.width = total, global_batch, width
    self.stream = sys.stdout if stream is None else stream
    isatty = getattr(self.stream, "isatty", lambda: False)
    self.interactive = isatty() if interactive is None else interactive
    self.enabled = enabled
    self._clock = clock
    self._t0: Optional[float] = None   # time at the end of the first (compiling) step
    self._step0 = start
    self._loss: Optional[float] = None
    self._last_draw = -1.0
    self._drawn = False

  def started(self, step: int) -> None:
    """The first step of this process (compilation included) finished at `step`."""
    self._t0, self._step0 = self._clock(), step

  def rate(self, step: int) -> float:
    """Images per second since `started` (nan before)."""
    if self._t0 is None or step <= self._step0:
      return float("nan")
    return (step - self._step0) * self.global_batch / max(self._clock() - self._t0, 1e-9)

  def line(self, step: int, bar: bool) -> str:
    rate = self.rate(step)
    eta = (self.total - step) * self.global_batch / rate if rate == rate and rate > 0 else (
        float("nan"))
    parts = [f"step {step}/{self.total}"]
    if bar:
      done = int(self.width * step / max(self.total, 1))
      arrow = ">" if done < self.width else ""
      parts.append(f"[{'=' * done}{arrow}{' ' * (self.width - done - len(arrow))}]"
                   f" {100 * step // max(self.total, 1):3d}%")
    parts.append(f"loss {self._loss:.4f}" if self._loss is not None else "loss ?")
    parts.append(f"{rate:.1f} img/s" if rate == rate else "? img/s")
    parts.append(f"ETA {_duration(eta)}")
    return " ".join(parts)

  def update(self, step: int) -> None:
    """Every step (host-side only): redraws the bar on a TTY."""
    if not (self.enabled and self.interactive):
      return
    now = self._clock()
    if now - self._last_draw < 0.1 and step < self.total:
      return
    self._last_draw = now
    self.stream.write("\r" + self.line(step, bar=True) + "\033[K")
    self.stream.flush()
    self._drawn = True

  def log(self, step: int, loss: Optional[float]) -> None:
    """At a log point, with the loss just pulled from the device."""
    self._loss = loss
    if not self.enabled:
      return
    if self.interactive:
      self._last_draw = -1.0
      self.update(step)
    else:
      self.stream.write(self.line(step, bar=False) + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.interactive and self._drawn:
      self.stream.write("\n")
      self.stream.flush()
      self._drawn = False
