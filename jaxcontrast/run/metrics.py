"""Metric files of a run: WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tensorboard.

TensorBoard files are written with TensorFlow's core summary op (`tf.summary.write` with the
scalars plugin's metadata), so the `tensorboard` package is only needed to view them.

Written by process 0 only, through `etils.epath` / `tf.summary` (so gs:// works). One JSON
object per logged step: {"step": ..., name: float, ...}.

Resume: lines logged after the checkpoint the run resumes from are dropped (they are logged
again by the resumed run), so each step appears once. Object stores (gs://) cannot append to a
file, so there the whole file is rewritten at each write (small: one line per `log_every`
steps); local files are appended to.

Why not clu's metric writers: clu's TensorBoard writer imports the `tensorboard` package (for its
hparams plugin; tensorboard then brings grpcio, werkzeug, markdown and tensorboard-data-server),
which the core summary op above avoids, and clu has no JSON-lines writer, so metrics.jsonl
(resume truncation, rewrite on object stores) would stay here anyway.
"""
from __future__ import annotations

import json
import math
from typing import Mapping, Optional

import jax
import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _scalar(value) -> Optional[float]:
  a = np.asarray(value)
  return float(a) if a.size == 1 else None


class MetricWriter:
  """metrics.jsonl + TensorBoard scalars; no-op on processes other than 0."""

  def __init__(self, workdir: epath.Path, *, resume_step: int = 0, tensorboard: bool = True,
               append: Optional[bool] = None):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / METRICS_FILE
    self._append = _is_local(self.path) if append is None else append
    self._lines: list[str] = []
    self._tb = None
    if not self.active:
      return
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      # Keep what the resumed state had already logged; drop lines of steps that will be run
      # again (a run killed after its last checkpoint).
      for line in self.path.read_text().splitlines():
        if line.strip() and json.loads(line).get("step", 0) <= resume_step:
          self._lines.append(line)
    self.path.write_text("".join(line + "\n" for line in self._lines))
    if tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      # tf.summary.scalar needs the tensorboard package (not a dependency): write the same
      # record with the core op, tagged for TensorBoard's scalars plugin.
      self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
      ).SerializeToString()
      self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, float]) -> dict:
    """Logs host scalars under `step`; returns the dict written (non-scalars left out)."""
    row = {"step": int(step)}
    for name, value in metrics.items():
      v = _scalar(value)
      if v is not None:
        row[name] = v
    if not self.active:
      return row
    line = json.dumps(row, allow_nan=True)
    self._lines.append(line)
    if self._append:
      with self.path.open("a") as f:
        f.write(line + "\n")
    else:
      self.path.write_text("".join(l + "\n" for l in self._lines))
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for name, value in row.items():
          if name != "step" and math.isfinite(value):
            self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                                   metadata=self._scalar_metadata)
      self._tb.flush()
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl."""
  path = epath.Path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
