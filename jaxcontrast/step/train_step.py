"""The jitted, sharded train step of every method, and the pieces that build it from a config.

One step (METHODS.md section 0), all inside one `jax.jit` over the mesh, the state donated:
  1. key = fold_in(base_key, step); EMA momentum m from the step (no recompiles);
  2. [ema.update_at == before_keys] target <- m target + (1 - m) online   (MoCo v2);
  3. target forward (train-mode BN, its own statistics) on the key view(s) and support views,
     with the BN-shuffle permutation of `bn.mode`; no gradient;
  4. online forward (view 1, view 2 when symmetric, each multi-crop local view) + objective
     against the queue *as it was before this step*; gradients;
  5. optimizer update; [ema.update_at == after_step] target EMA from the new params (SCE, FNC);
  6. enqueue this step's keys (both views' when symmetric) with their ids and labels; step + 1.

With class labels in the batch ("label") and `queue.store_labels`, the metrics also hold the
false-negative diagnostics of `diagnostics.py` ("diag/..."); labels never enter the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast.config_check import fail, is_int
from jaxcontrast.models import build_encoder
from jaxcontrast.sharding import DATA_AXIS
from jaxcontrast.step import bn_shuffle, ema, objectives
from jaxcontrast.step import queue as queue_lib
from jaxcontrast.step.state import TrainState, init_train_state, state_shardings

BN_MODES = ("sync", "ghost", "shuffle")


def default_bn_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "sync"          # "sync" (global stats under jit) | "ghost" | "shuffle"
  c.groups = 8             # ghost: G groups of strided samples per batch
  c.target_only = False    # ghost: grouped BN in the target (key) network only (SCE CIFAR)
  return c


@dataclasses.dataclass(frozen=True)
class Models:
  """The online and target modules (same parameter tree, maybe different BN grouping), how the
  key batch is permuted before the target network, and `online_pair`: the online module taking
  two views interleaved, its BatchNorms treating them as two calls (`online_forward`)."""
  online: Any
  target: Any
  permutation: Callable[[jax.Array, int], jax.Array] | None
  online_pair: Any = None


def build_models(config, mesh) -> Models:
  """Online/target encoders for `config.bn.mode`.

  sync: one module, BN statistics over the global batch (SyncBN under jit).
  ghost: strided groups of `bn.groups` samples (both networks, or the target only), key batch
    permuted so no key shares its query's group index (single-device Shuffle BN).
  shuffle: per-device statistics (contiguous groups, one per device), key batch permuted across
    the global batch (MoCo's Shuffle BN).
  """
  bn = config.bn

  def with_bn(groups=None, grouping=None, views=1):
    model = config.model if groups is None else dict(config.model, bn_groups=groups,
                                                     bn_grouping=grouping)
    return build_encoder(model, bn_views=views)

  if bn.mode == "sync":
    model = with_bn()
    return Models(model, model, None, online_pair=with_bn(views=2))
  if bn.mode == "ghost":
    target = with_bn(bn.groups, "strided")
    if bn.target_only:
      online, pair = with_bn(), with_bn(views=2)
    else:
      online, pair = target, with_bn(bn.groups, "strided", views=2)
    return Models(online, target,
                  lambda rng, batch: bn_shuffle.ghost_permutation(rng, batch, bn.groups),
                  online_pair=pair)
  devices = mesh.shape[DATA_AXIS]
  model = with_bn(devices, "contiguous")
  return Models(model, model, bn_shuffle.shuffle_permutation,
                online_pair=with_bn(devices, "contiguous", views=2))


def validate_bn(bn: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first invalid key of the `bn` section."""
  if bn.mode not in BN_MODES:
    fail("bn", "mode", bn.mode, f"one of {BN_MODES}")
  if not is_int(bn.groups) or bn.groups < 1:
    fail("bn", "groups", bn.groups, "an int >= 1")


def local_view_names(batch) -> list[str]:
  """The batch's multi-crop local views, "local_0", "local_1", ... in crop order."""
  names = [k for k in batch if k.startswith("local_")]
  return sorted(names, key=lambda k: int(k[len("local_"):]))


def query_embedding(out: dict) -> jax.Array:
  """The online network's output used as the query: predictor output if any, else projection."""
  return out["prediction"] if "prediction" in out else out["projection"]


def online_forward(models: Models, params, stats, batch, *, symmetric: bool, local_names=()):
  """The online network in train mode: `(queries, local_queries, new BN statistics)`.

  queries: `(q1,)`, or `(q1, q2)` when symmetric; local_queries: one per multi-crop local view
  (each its own forward and BN batch, as SCE's code forwards each resolution separately). The
  BN statistics are threaded through the forwards in the order view 1, view 2, local crops.

  Symmetric: both views in one forward of `models.online_pair` on the batch interleaved (row
  2b + v is view v + 1 of sample b, so every device keeps its own rows), whose BatchNorms
  normalise each view with its own statistics and update the running ones view 1 then view 2:
  the values of two forwards, but one backward, so each parameter's gradient is summed over
  the devices once per step instead of once per view.
  """
  def apply(module, images, stats):
    out, updates = module.apply({"params": params, "batch_stats": stats}, images, train=True,
                                mutable=["batch_stats"])
    return query_embedding(out), updates["batch_stats"]

  if symmetric:
    v1, v2 = batch["view1"], batch["view2"]
    pair = jnp.stack([v1, v2], axis=1).reshape((2 * v1.shape[0],) + v1.shape[1:])
    q, stats = apply(models.online_pair, pair, stats)
    q = q.reshape((v1.shape[0], 2) + q.shape[1:])
    queries = (q[:, 0], q[:, 1])
  else:
    q1, stats = apply(models.online, batch["view1"], stats)
    queries = (q1,)
  local_queries = []
  for name in local_names:
    q, stats = apply(models.online, batch[name], stats)
    local_queries.append(q)
  return queries, tuple(local_queries), stats


def make_train_step(config, *, models: Models, tx: optax.GradientTransformation, mesh,
                    total_steps: int, base_rng: jax.Array, augment=None):
  """The un-jitted step `(state, batch) -> (state, metrics)`; `jit_train_step` compiles it.

  batch: dict of global arrays split on `data`: "view1" (online view), "view2" (key view),
  optional "support" (B, S, H, W, C), "local_0", "local_1", ... (multi-crop local views (B, h_i,
  h_i, C): extra online queries against the keys, `objectives.crop_pairs`; never enqueued),
  "id", "key_id", "neighbors", "label" (int32 class of the
  anchor image, -1 = unknown) and "key_label" (class of the image view2 was cut from; default
  "label"). The "diag/..." metrics are present iff "label" is in the batch, the queue exists and
  `queue.store_labels` is on.

  augment: an `augment_jax.DeviceAugment` when the batch holds uint8 views and their
  photometric parameters ("aug", `data.augment_on = "device"`): they are finished first, inside
  the compiled step, each device on its own rows.
  """
  cfg_ema, cfg_obj, cfg_queue = config.ema, config.objective, config.queue
  symmetric = bool(cfg_obj.symmetric)
  objective_fn = objectives.make_objective_fn(cfg_obj, mesh=mesh, queue_mode=cfg_queue.mode)
  devices = mesh.shape[DATA_AXIS]

  def encode_keys(params, stats, images, rng, aug_params=None):
    """Target forward in train mode; returns (keys without gradient, new BN stats).

    With `aug_params`, `images` are the key view's uint8 crops, finished after the Shuffle BN
    permutation: the permutation moves the whole key batch between devices (the largest
    transfer of the step), and uint8 is 4 x fewer bytes than float32. Exact: the augmentation
    is per example, so it commutes with a permutation of the examples."""
    perm = None
    if models.permutation is not None:
      perm = models.permutation(rng, images.shape[0])
      images = images[perm]
      if aug_params is not None:
        aug_params = jax.tree.map(lambda p: p[perm], aug_params)
    if aug_params is not None:
      images = augment.view("view2", images, aug_params)
    out, updates = models.target.apply({"params": params, "batch_stats": stats}, images,
                                       train=True, predict=False, mutable=["batch_stats"])
    keys = out["projection"]
    if perm is not None:
      keys = bn_shuffle.unpermute(keys, perm)
    return jax.lax.stop_gradient(keys), updates["batch_stats"]

  def step_fn(state: TrainState, batch):
    if "aug" in batch:
      if augment is None:
        raise ValueError("the batch holds uint8 views for device augmentation (batch['aug']) "
                         "but make_train_step got no `augment` (pipeline.device_augment)")
      # The key view alone feeds the permuted target forward (not symmetric): finish it there.
      defer = ("view2",) if models.permutation is not None and not symmetric else ()
      batch = augment(batch, defer=defer)
    rng = jax.random.fold_in(base_rng, state.step)
    m = ema.momentum(state.step, base=cfg_ema.momentum, schedule=cfg_ema.schedule,
                     total_steps=total_steps)
    ema_params = state.ema_params
    if cfg_ema.update_at == "before_keys":
      ema_params = ema.update(ema_params, state.params, m)

    # Target branch: keys of the key view (and of view 1 when symmetric).
    k2, ema_stats = encode_keys(ema_params, state.ema_batch_stats, batch["view2"],
                                jax.random.fold_in(rng, 0),
                                aug_params=batch.get("aug", {}).get("view2"))
    k1 = None
    if symmetric:
      k1, ema_stats = encode_keys(ema_params, ema_stats, batch["view1"], jax.random.fold_in(rng, 1))
    extras = {}
    if "support" in batch:
      support = batch["support"]
      b, s = support.shape[:2]
      # Detection only: no permutation needed, and the running statistics keep to key views.
      out = models.target.apply({"params": ema_params, "batch_stats": ema_stats},
                                support.reshape(b * s, *support.shape[2:]), train=True,
                                predict=False, mutable=["batch_stats"])[0]
      extras["support"] = jax.lax.stop_gradient(out["projection"].reshape(b, s, -1))
    batch_size = batch["view1"].shape[0]
    local_names = local_view_names(batch)
    ids = batch.get("id", jnp.full((batch_size,), -1, jnp.int32))
    key_ids = batch.get("key_id", ids)
    if cfg_obj.loss == "multi_positive":
      extras.update(id=ids, key_id=key_ids)
      if "neighbors" in batch:
        extras["neighbors"] = batch["neighbors"]

    queue = state.queue
    labels = batch.get("label") if cfg_queue.store_labels else None
    key_labels = None if labels is None else batch.get("key_label", labels)
    if labels is not None and queue is not None:   # label diagnostics (diagnostics.py)
      extras["label"] = labels
    negatives = queue_lib.negatives(queue, cfg_queue, devices=devices,
                                    with_labels=labels is not None)

    def loss_fn(params):
      queries, local_queries, stats = online_forward(
          models, params, state.batch_stats, batch, symmetric=symmetric, local_names=local_names)
      keys = (k2, k1) if symmetric else (k2,)
      # Multi-crop: each local crop's query is one more query against every key.
      loss, metrics = objective_fn(queries, keys, negatives, extras,
                                   local_queries=local_queries)
      return loss, (metrics, stats)

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if cfg_ema.update_at == "after_step":
      ema_params = ema.update(ema_params, params, m)

    if queue is not None:
      if not cfg_queue.store_ids:
        ids = key_ids = None
      if symmetric:
        views = ((k1, k2), (ids, key_ids), (labels, key_labels))
      else:
        views = ((k2,), (key_ids,), (key_labels,))
      queue = queue_lib.push(queue, *views, mode=cfg_queue.mode, mesh=mesh, axis_name=DATA_AXIS)

    metrics = dict(metrics, ema_momentum=m,
                   grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              batch_stats=batch_stats, ema_batch_stats=ema_stats,
                              opt_state=opt_state, queue=queue)
    return new_state, metrics

  return step_fn


def create_state(config, *, models: Models, tx, mesh, sample_images, rng):
  """The initial state, placed with its shardings (queue rows split in `sharded` mode)."""
  queue_dim = config.model.proj_dim
  init = lambda r: init_train_state(r, model=models.online, tx=tx, sample_images=sample_images,
                                    queue_size=config.queue.size, queue_dim=queue_dim,
                                    ema_init=config.ema.init,
                                    queue_blocks=queue_lib.num_blocks(config.queue.mode,
                                                                      mesh.shape[DATA_AXIS]))
  shapes = jax.eval_shape(init, rng)
  shardings = state_shardings(shapes, mesh, config.queue.mode)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def jit_train_step(step_fn, *, mesh, shardings):
  """Compile with the state donated, kept in its shardings, and the batch split on `data`."""
  return jax.jit(step_fn, in_shardings=(shardings, NamedSharding(mesh, P(DATA_AXIS))),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
