"""False-negative diagnostics from class labels, computed inside the train step.

Contrastive learning treats every queue row as a negative of every anchor. When the data has
labels, the step measures how often that is wrong ("class collision") and, for FNC, how well its
support-view detection finds the wrong ones (METHODS.md section 5, "Diagnostic beyond the paper").
Labels are used for nothing else: they never reach a loss.

Over the anchors i of the global batch and the queue rows j (all devices' rows):

    pairs = {(i, j) : label_i >= 0, qlabel_j >= 0, valid_j}     # unknown labels and noise rows
    same  = {(i, j) in pairs : label_i == qlabel_j}             #   (-1) take no part
    det   = {(i, j) in pairs : FNC detected row j for anchor i}  # losses.fnc_detect, as the loss
    diag/queue_same_label = |same| / |pairs|                    # class collision rate
    diag/fn_precision     = |det & same| / |det|                # detected rows truly same-class
    diag/fn_recall        = |det & same| / |same|               # same-class rows found

`valid_j` is `queue.valid_rows` when `queue.mask_unfilled` is on; without it the noise rows of a
fresh queue still take no part, since their labels are -1.

0/0 convention: a ratio whose denominator is 0 is reported as 0 (never NaN, so averages over
steps stay finite), and each denominator is reported too, as a count over the step's global batch
(float32): "diag/labeled_pairs" = |pairs|, "diag/same_label_pairs" = |same|, "diag/fn_detected" =
|det|. A 0 ratio with a 0 count means "nothing to measure" (e.g. the first step, whose queue is
all noise). With the symmetric loss, the FNC counts are averaged over the two directions (each
detects with its own key view) and the ratios are pooled: precision = sum |det & same| / sum |det|.

The anchor's label is the batch's "label" (the image view 1 and the support views are cut from).
A queue row's label is the label of the image its key view came from: the batch's "key_label"
when the input pipeline provides it (the SePP pipeline does: the key view may come from a
semantic partner of another class), else "label".
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxcontrast import losses


def _gather(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)


def label_pair_counts(anchor_labels: jax.Array, queue_labels: jax.Array, *,
                      queue_valid: Optional[jax.Array] = None,
                      detected: Optional[jax.Array] = None,
                      axis_name: Optional[str] = None) -> dict:
  """Pair counts of the formulas above, as float32 scalars.

  Args:
    anchor_labels: (Bg,) int labels of the whole global batch (-1: unknown).
    queue_labels: (K,) int labels of the queue rows (-1: noise or unknown); under `axis_name`,
      this device's K/n rows.
    queue_valid: optional (K,) bool, rows holding real keys (same layout as `queue_labels`).
    detected: optional (Bg, K) bool, FNC's detected rows (`losses.fnc_detect`).
    axis_name: inside `jax.shard_map` with the queue rows split over this mesh axis: the counts
      of each device's rows are summed (psum) over it.

  Returns:
    {"pairs": |pairs|, "same": |same|} and, with `detected`, "detected": |det| and
    "detected_same": |det & same|. Each row's count is an int32 (at most K); rows are summed in
    float32, so nothing overflows at any batch x queue size.
  """
  anchor_labels = jnp.asarray(anchor_labels)
  queue_labels = jnp.asarray(queue_labels)
  if anchor_labels.ndim != 1 or queue_labels.ndim != 1:
    raise ValueError(f"anchor_labels and queue_labels must be 1-D, got shapes "
                     f"{anchor_labels.shape} and {queue_labels.shape}")
  row_ok = queue_labels >= 0
  if queue_valid is not None:
    row_ok = row_ok & queue_valid
  pairs = (anchor_labels >= 0)[:, None] & row_ok[None, :]                  # (Bg, K)
  same = pairs & (anchor_labels[:, None] == queue_labels[None, :])
  masks = {"pairs": pairs, "same": same}
  if detected is not None:
    if detected.shape != pairs.shape:
      raise ValueError(f"detected must have shape {pairs.shape} (anchors x queue rows), got "
                       f"{detected.shape}")
    masks.update(detected=pairs & detected, detected_same=same & detected)
  counts = {name: jnp.sum(jnp.sum(m, axis=1, dtype=jnp.int32).astype(jnp.float32))
            for name, m in masks.items()}
  if axis_name is not None:
    counts = lax.psum(counts, axis_name)
  return counts


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (the counts are >= 0)."""
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


def label_metrics(objective, keys: Sequence[jax.Array], labels: jax.Array,
                  queue_keys: jax.Array, queue_labels: jax.Array,
                  queue_valid: Optional[jax.Array] = None, support: Optional[jax.Array] = None,
                  axis_name: Optional[str] = None) -> dict:
  """The step's "diag/..." metrics (see the module docstring).

  Args:
    objective: the `objective` config; FNC metrics when `objective.loss == "fnc"`, detecting with
      its `fnc.threshold` and `fnc.top_k`.
    keys: one (B, D) target key per loss direction (as `objectives.objective_value` gets them).
    labels: (B,) int32 labels of the batch's anchors.
    queue_keys, queue_labels, queue_valid: the queue before this step (this device's rows under
      `axis_name`).
    support: optional (B, S, D) support-view keys (FNC).
    axis_name: inside `jax.shard_map`, the mesh axis splitting the batch and the queue rows.
  """
  labels = _gather(jnp.asarray(labels, jnp.int32), axis_name)
  counts = label_pair_counts(labels, queue_labels, queue_valid=queue_valid, axis_name=axis_name)
  metrics = {"diag/queue_same_label": safe_ratio(counts["same"], counts["pairs"]),
             "diag/labeled_pairs": counts["pairs"], "diag/same_label_pairs": counts["same"]}
  if objective.loss == "fnc":
    detected = detected_same = 0.0
    for key in keys:
      fn, _ = losses.fnc_detect(key, queue_keys, support, threshold=objective.fnc.threshold,
                                top_k=objective.fnc.top_k, queue_valid=queue_valid,
                                axis_name=axis_name)
      c = label_pair_counts(labels, queue_labels, queue_valid=queue_valid, detected=fn,
                            axis_name=axis_name)
      detected, detected_same = detected + c["detected"], detected_same + c["detected_same"]
    n = len(keys)
    metrics.update({"diag/fn_precision": safe_ratio(detected_same, detected),
                    "diag/fn_recall": safe_ratio(detected_same, n * counts["same"]),
                    "diag/fn_detected": detected / n})
  return metrics
