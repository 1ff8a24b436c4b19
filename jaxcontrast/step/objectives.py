"""Objective config -> the loss of one step: a main loss plus weighted regularisers.

The six methods are points in this space (configs/ holds one file per method):

| method | objective.loss  | regularisers                         | other switches              |
|--------|-----------------|--------------------------------------|-----------------------------|
| MoCo v2| moco            | -                                    |                             |
| CO2    | moco            | co2                                  |                             |
| XMoCo  | moco            | xmoco_cross, xmoco_uniformity        | (interpretation)            |
| SCE    | sce             | -                                    | model predictor (ImageNet)  |
| FNC    | fnc             | -                                    | fnc.num_support_views       |
| SePP   | moco / multi_positive | -                              | data.semantic_pairs; queue ids |

Any combination that makes sense composes (e.g. SCE + CO2). With the `sharded` queue the whole
objective runs inside one `jax.shard_map` over the `data` axis, each device holding K/n queue rows.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from jaxcontrast import losses
from jaxcontrast.config_check import fail
from jaxcontrast.step import diagnostics

P = jax.sharding.PartitionSpec
MAIN_LOSSES = ("moco", "sce", "fnc", "multi_positive")
REGULARIZERS = ("co2", "xmoco_cross", "xmoco_uniformity")


def default_objective_config() -> ml_collections.ConfigDict:
  """MoCo v2. Every key is documented; regularisers are off at weight 0."""
  c = ml_collections.ConfigDict()
  c.loss = "moco"                 # main loss: "moco" | "sce" | "fnc" | "multi_positive"
  c.temperature = 0.2             # tau of the main loss
  c.symmetric = False             # also swap the views and average; both views' keys enqueued
  c.sce = ml_collections.ConfigDict(dict(
      target_temperature=0.07,    # tau_m of the target distribution
      coeff=0.5,                  # lambda: weight of the one-hot part
      mask_self=False))           # False: code (self logit 0); True: paper (-inf)
  c.fnc = ml_collections.ConfigDict(dict(
      threshold=0.7,              # cosine threshold of false-negative detection
      top_k=10,                   # at most k candidates per anchor
      mode="attraction",          # "attraction" | "elimination"
      num_support_views=0))       # S extra target views per anchor (set data.num_support_views too)
  # multi_positive: queue rows whose source id is the anchor, its key's source, or one of its
  # semantic neighbours (batch["neighbors"]) are positives (SePP with queue ids). Needs
  # queue.store_ids = True.
  c.co2 = ml_collections.ConfigDict(dict(
      weight=0.0,                 # alpha (unverified; 10 on MoCo v1 in the paper)
      temperature=0.04,           # tau_con (unverified)
      include_positive=False))    # lightly's (1+K)-way variant
  c.xmoco_cross = ml_collections.ConfigDict(dict(
      weight=0.0,                 # w_cross (interpretation; 1.0 in configs/xmoco_*)
      temperature=0.1,            # tau_x
      divergence="kl",            # "kl" | "mse"
      pairs="query"))             # "query": q@q.T | "cross": q@k.T
  c.xmoco_uniformity = ml_collections.ConfigDict(dict(
      weight=0.0,                 # w_unif (interpretation; 0.1 in configs/xmoco_*)
      temperature=0.2,            # tau_u
      per_sample=False))          # mean_i KL(p_i || U) instead of KL(mean_i p_i || U)
  return c


def validate(objective: ml_collections.ConfigDict, *, queue_size: int, store_ids: bool) -> None:
  """ConfigError naming the first invalid key of the `objective` section (with the queue's size
  and `store_ids`, which some losses need)."""
  if objective.loss not in MAIN_LOSSES:
    fail("objective", "loss", objective.loss, f"one of {MAIN_LOSSES}")
  if queue_size == 0 and (objective.loss != "moco" or objective.co2.weight or
                          objective.xmoco_uniformity.weight):
    fail("queue", "size", queue_size, "> 0 with this objective: queue.size = 0 (in-batch "
         "negatives) works only with objective.loss='moco' and without the co2 / "
         "xmoco_uniformity regularisers, which need a queue")
  if objective.loss == "multi_positive" and not store_ids:
    fail("queue", "store_ids", store_ids, "True with objective.loss='multi_positive'")
  if objective.fnc.mode not in ("attraction", "elimination"):
    fail("objective", "fnc.mode", objective.fnc.mode, "'attraction' or 'elimination'")
  if objective.temperature <= 0:
    fail("objective", "temperature", objective.temperature, "a number > 0")
  for name in REGULARIZERS:
    if objective[name].weight < 0:
      fail("objective", f"{name}.weight", objective[name].weight, "a number >= 0")


def _positive_mask(anchor_ids, key_ids, neighbors, queue_ids):
  """(Bg, K_local) bool: queue rows coming from the anchor, its key's image or a neighbour."""
  qid = queue_ids[None, :]
  mask = (qid == anchor_ids[:, None]) | (qid == key_ids[:, None])
  if neighbors is not None:
    mask = mask | jnp.any(qid[:, :, None] == neighbors[:, None, :], axis=-1)
  return mask & (qid >= 0)


def _terms(cfg, q, k, negatives, extras, axis_name):
  """One direction (query q against key k) of the objective; (total, metrics)."""
  queue_keys = None if negatives is None else negatives.keys
  queue_ids = None if negatives is None else negatives.ids
  queue_valid = None if negatives is None else negatives.valid
  tau = cfg.temperature
  loss_name = cfg.loss
  if loss_name == "moco":
    loss, metrics = losses.moco_infonce(q, k, queue_keys, temperature=tau, axis_name=axis_name,
                                        queue_valid=queue_valid)
  elif loss_name == "sce":
    loss, metrics = losses.sce(q, k, queue_keys, temperature=tau,
                               target_temperature=cfg.sce.target_temperature,
                               coeff=cfg.sce.coeff, mask_self=cfg.sce.mask_self,
                               axis_name=axis_name, queue_valid=queue_valid)
  elif loss_name == "fnc":
    loss, metrics = losses.fnc(q, k, queue_keys, support_keys=extras.get("support"),
                               temperature=tau, threshold=cfg.fnc.threshold, top_k=cfg.fnc.top_k,
                               mode=cfg.fnc.mode, axis_name=axis_name, queue_valid=queue_valid)
  else:  # multi_positive
    gather = (lambda x: x) if axis_name is None else (
        lambda x: lax.all_gather(x, axis_name, axis=0, tiled=True))
    neighbors = extras.get("neighbors")
    mask = _positive_mask(gather(extras["id"]), gather(extras["key_id"]),
                          None if neighbors is None else gather(neighbors), queue_ids)
    loss, metrics = losses.multi_positive_infonce(q, k, queue_keys, positive_mask=mask,
                                                  temperature=tau, axis_name=axis_name,
                                                  queue_valid=queue_valid)
  metrics = {f"{loss_name}/{name}": value for name, value in metrics.items()}
  metrics[f"{loss_name}/loss"] = loss
  total = loss
  if cfg.co2.weight:
    reg, _ = losses.co2_consistency(q, k, queue_keys, temperature=cfg.co2.temperature,
                                    include_positive=cfg.co2.include_positive,
                                    axis_name=axis_name, queue_valid=queue_valid)
    total, metrics["co2/reg"] = total + cfg.co2.weight * reg, reg
  if cfg.xmoco_cross.weight:
    reg, _ = losses.xmoco_cross_consistency(q, k, temperature=cfg.xmoco_cross.temperature,
                                            divergence=cfg.xmoco_cross.divergence,
                                            pairs=cfg.xmoco_cross.pairs, axis_name=axis_name)
    total, metrics["xmoco_cross/reg"] = total + cfg.xmoco_cross.weight * reg, reg
  if cfg.xmoco_uniformity.weight:
    reg, _ = losses.xmoco_negative_uniformity(q, queue_keys,
                                              temperature=cfg.xmoco_uniformity.temperature,
                                              per_sample=cfg.xmoco_uniformity.per_sample,
                                              axis_name=axis_name, queue_valid=queue_valid)
    total, metrics["xmoco_uniformity/reg"] = total + cfg.xmoco_uniformity.weight * reg, reg
  return total, metrics


def crop_pairs(queries, keys, local_queries=()):
  """The (query, key) pairs of one step, multi-crop included, in the SCE code's order.

  queries / keys: one (B, D) embedding per global direction: `(q1,)`, `(k2,)` (asymmetric) or
  `(q1, q2)`, `(k2, k1)` (symmetric: q_j against the key of the other global view). Each local
  crop's query is an extra query against every global view's key:

      pairs = [(queries[d], keys[d]) for d] + [(q_l, k) for q_l in local_queries for k in keys]

  Averaging a loss over these pairs is the official SCE multi-crop loss (eztorch
  `ShuffleMomentumQueueBaseModel.training_step`): symmetric, sum over global views i and all
  crops j != i of loss(q_j, k_i), divided by (num_crops - 1) * num_global_crops; asymmetric,
  loss(q_j, k_2) over the other crops j, divided by num_crops - 1.
  """
  if len(queries) != len(keys):
    raise ValueError(f"{len(queries)} queries for {len(keys)} keys: one key per direction")
  return list(zip(queries, keys)) + [(q, k) for q in local_queries for k in keys]


def objective_value(cfg, queries, keys, negatives, extras, *, axis_name: Optional[str] = None,
                    local_queries=()):
  """The whole objective for one step.

  queries / keys: tuples of (B, D) embeddings, one per direction: `(q1,)`, `(k2,)` for the
  asymmetric loss; `(q1, q2)`, `(k2, k1)` for the symmetric one. local_queries: the online
  embeddings of the multi-crop local views, each an extra query against every key
  (`crop_pairs`); the objective is the mean over all pairs. negatives: `queue.Negatives`, the
  queue as it was before this step (None: no queue, the batch's other keys are the negatives);
  its `valid` marks the rows holding real keys (`queue.mask_unfilled`). Returns (loss, metrics),
  metrics averaged over the pairs.

  With `negatives.labels` (K,) and `extras["label"]` (B,) the metrics also hold the label
  diagnostics (`diagnostics.label_metrics`: "diag/queue_same_label", and for FNC
  "diag/fn_precision", "diag/fn_recall"); labels never enter the loss.
  """
  totals, all_metrics = [], []
  for q, k in crop_pairs(queries, keys, local_queries):
    total, metrics = _terms(cfg, q, k, negatives, extras, axis_name)
    totals.append(total)
    all_metrics.append(metrics)
  n = len(totals)
  metrics = {name: sum(m[name] for m in all_metrics) / n for name in all_metrics[0]}
  loss = sum(totals) / n
  metrics["loss"] = loss
  if negatives is not None and negatives.labels is not None and "label" in extras:
    metrics.update(diagnostics.label_metrics(
        cfg, keys, extras["label"], negatives.keys, negatives.labels, queue_valid=negatives.valid,
        support=extras.get("support"), axis_name=axis_name))
  return loss, metrics


def make_objective_fn(cfg, *, mesh, queue_mode: str, axis_name: str = "data"):
  """`fn(queries, keys, negatives, extras, local_queries=()) -> (loss, metrics)` (arguments as
  in `objective_value`).

  `replicated`: plain global-array code (XLA partitions the batch; the queue is on every device).
  `sharded`: one `jax.shard_map` over `axis_name`; every field of `negatives` split by rows like
  the queue, batch rows split, outputs replicated (the label diagnostics psum their counts over
  `axis_name`). `extras` (support views, ids, labels, neighbours) are batch-split in both.
  """
  if queue_mode == "replicated":
    return lambda queries, keys, negatives, extras, local_queries=(): objective_value(
        cfg, queries, keys, negatives, extras, local_queries=tuple(local_queries))
  if queue_mode != "sharded":
    raise ValueError(f"queue.mode must be 'replicated' or 'sharded', got {queue_mode!r}")

  def fn(queries, keys, negatives, extras, local_queries=()):
    body = lambda qs, ks, neg, ex, lq: objective_value(cfg, qs, ks, neg, ex, axis_name=axis_name,
                                                       local_queries=lq)
    split = lambda tree: jax.tree.map(lambda _: P(axis_name), tree)
    local_queries = tuple(local_queries)
    specs = (split(queries), split(keys), split(negatives), split(extras), split(local_queries))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)(
        queries, keys, negatives, extras, local_queries)

  return fn
