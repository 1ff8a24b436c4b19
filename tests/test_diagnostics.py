"""Label diagnostics: queue labels written like a FIFO, the "diag/..." metrics against NumPy,
8 devices (K-sharded queue) equal to 1, and absent without labels.

References are plain NumPy written from the formulas in jaxcontrast/step/diagnostics.py and
METHODS.md section 5 (FNC detection).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcontrast import config_lib, losses
from jaxcontrast.sharding import global_batch_from_local, make_mesh
from jaxcontrast.step import diagnostics, objectives, train_step
from jaxcontrast.step import queue as queue_lib

DIAG = {"diag/queue_same_label", "diag/labeled_pairs", "diag/same_label_pairs"}
FNC_DIAG = {"diag/fn_precision", "diag/fn_recall", "diag/fn_detected"}


# ----------------------------------------------------------------------------- NumPy references


def numpy_fifo(size, writes, fill):
  """A ring buffer of `size` rows written one row at a time; `writes` is a list of arrays."""
  rows = np.full((size,) + writes[0].shape[1:], fill, writes[0].dtype)
  ptr = 0
  for block in writes:
    for row in block:
      rows[ptr] = row
      ptr = (ptr + 1) % size
  return rows


def numpy_detect(key, support, queue, threshold, top_k, valid=None):
  """METHODS.md section 5: s = max over the key and support views of the cosine to each row;
  fn = (s > threshold) & (s among the row's top_k, a tie going to the lower index), invalid rows
  excluded."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  views = unit(key)[:, None] if support is None else np.concatenate(
      [unit(key)[:, None], unit(support)], axis=1)
  s = np.einsum("bvd,kd->bvk", views.astype(np.float64), queue.astype(np.float64)).max(1)
  if valid is not None:
    s = np.where(valid[None], s, -np.inf)
  order = np.argsort(-s, axis=1, kind="stable")[:, :min(top_k, s.shape[1])]
  top = np.zeros(s.shape, bool)
  np.put_along_axis(top, order, True, axis=1)
  return (s > threshold) & top


def numpy_label_metrics(labels, queue_labels, valid=None, detected=()):
  """The module-docstring formulas; `detected`: one (B, K) mask per direction."""
  ok = (queue_labels >= 0) if valid is None else (queue_labels >= 0) & valid
  pairs = (labels >= 0)[:, None] & ok[None]
  same = pairs & (labels[:, None] == queue_labels[None])
  ratio = lambda a, b: a / b if b else 0.0
  out = {"diag/queue_same_label": ratio(same.sum(), pairs.sum()),
         "diag/labeled_pairs": pairs.sum(), "diag/same_label_pairs": same.sum()}
  if detected:
    det = sum((pairs & d).sum() for d in detected)
    hit = sum((same & d).sum() for d in detected)
    out.update({"diag/fn_precision": ratio(hit, det),
                "diag/fn_recall": ratio(hit, len(detected) * same.sum()),
                "diag/fn_detected": det / len(detected)})
  return out


def clustered(rng, labels, centres, noise=0.7):
  """Embeddings near their class centre (label -1: a random class), so detection finds rows of
  the same class and of others."""
  cls = np.where(labels >= 0, labels, rng.randint(0, len(centres), labels.shape))
  x = centres[cls] + noise * rng.randn(*labels.shape, centres.shape[1])
  return x.astype(np.float32)


# ----------------------------------------------------------------------------- queue labels


@pytest.mark.parametrize("mode,symmetric", [("replicated", False), ("replicated", True),
                                            ("sharded", False), ("sharded", True)])
def test_queue_labels_follow_a_numpy_fifo(mode, symmetric):
  """Labels land in the rows of their keys, in FIFO order, wrapping around (K not a multiple of
  the per-step writes in replicated mode); ids too. Replicated: [view1 keys; view2 keys] at ptr.
  Sharded (8 devices): device d writes its rows of view 1 then view 2 into its own block. The
  queue re-blocked to one block holds the labels in age order, and `valid_rows` marks the rows
  holding keys."""
  devices = 8 if mode == "sharded" else 1
  size, batch, steps = (24, 8, 3) if mode == "sharded" else (10, 4, 3)
  views = 2 if symmetric else 1
  mesh = make_mesh(devices)
  rng = np.random.RandomState(0)
  q = queue_lib.init_queue(jax.random.key(0), size, 3, devices)
  enqueue = jax.jit(lambda q, k, i, l: queue_lib.push(q, k, i, l, mode=mode, mesh=mesh))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  writes = {"keys": [], "ids": [], "labels": []}
  blocks = {name: [[] for _ in range(devices)] for name in writes}
  for step in range(steps):
    keys = tuple(rng.randn(batch, 3).astype(np.float32) for _ in range(views))
    ids = tuple(np.arange(batch, dtype=np.int32) + 100 * step + 1000 * v for v in range(views))
    labels = tuple(rng.randint(-1, 5, batch).astype(np.int32) for _ in range(views))
    q = enqueue(q, keys, ids, labels)
    for name, value in (("keys", keys), ("ids", ids), ("labels", labels)):
      value = [unit(x) if name == "keys" else x for x in value]
      writes[name].append(np.concatenate(value))
      local = batch // devices
      for d in range(devices):
        blocks[name][d].append(np.concatenate([x[d * local:(d + 1) * local] for x in value]))
  q = jax.device_get(q)
  assert int(q.filled) == min(size, steps * views * batch)
  for name in writes:
    if mode == "replicated":
      want = numpy_fifo(size, writes[name], -1)
    else:
      want = np.concatenate([numpy_fifo(size // devices, blocks[name][d], -1)
                             for d in range(devices)])
    np.testing.assert_allclose(np.asarray(getattr(q, name)), want, rtol=0, atol=1e-6,
                               err_msg=name)
  one = queue_lib.reblock(q, devices, 1)
  order = queue_lib.age_order(q.keys, int(q.ptr), devices)
  np.testing.assert_array_equal(np.asarray(one.labels), np.asarray(q.labels)[order])
  np.testing.assert_array_equal(np.asarray(one.keys), np.asarray(q.keys)[order])
  np.testing.assert_array_equal(np.asarray(queue_lib.valid_rows(q, devices)),
                                np.asarray(q.ids) >= 0)


def test_queue_labels_default_to_unknown():
  enqueue = jax.jit(queue_lib.enqueue)
  q = queue_lib.init_queue(jax.random.key(0), 6, 2)
  assert (np.asarray(q.labels) == -1).all()
  q = enqueue(q, jnp.ones((4, 2)), jnp.arange(4))      # no labels given: -1
  assert (np.asarray(q.labels) == -1).all() and (np.asarray(q.ids)[:4] == np.arange(4)).all()
  q = enqueue(q, jnp.ones((8, 2)), None, jnp.arange(8) + 10)   # 8 > K: the last 6 are kept
  assert sorted(np.asarray(q.labels)) == list(range(12, 18))


# ----------------------------------------------------------------------------- metrics


def test_label_pair_counts_match_numpy():
  rng = np.random.RandomState(1)
  labels, queue_labels = rng.randint(-1, 3, 7), rng.randint(-1, 3, 11)
  valid, detected = rng.rand(11) > 0.3, rng.rand(7, 11) > 0.5
  counts = jax.jit(lambda *a: diagnostics.label_pair_counts(*a[:2], queue_valid=a[2],
                                                            detected=a[3]))
  got = jax.device_get(counts(labels, queue_labels, valid, detected))
  ok = (labels >= 0)[:, None] & ((queue_labels >= 0) & valid)[None]
  same = ok & (labels[:, None] == queue_labels[None])
  want = {"pairs": ok.sum(), "same": same.sum(), "detected": (ok & detected).sum(),
          "detected_same": (same & detected).sum()}
  assert got == pytest.approx(want)
  assert want["same"] > 0 and want["detected_same"] > 0     # the example measures something
  with pytest.raises(ValueError, match="detected must have shape"):
    diagnostics.label_pair_counts(labels, queue_labels, detected=detected[:, :5])


def test_safe_ratio_is_zero_on_empty():
  np.testing.assert_array_equal(diagnostics.safe_ratio(jnp.float32(0), jnp.float32(0)), 0.0)
  np.testing.assert_allclose(diagnostics.safe_ratio(jnp.float32(3), jnp.float32(4)), 0.75)


@pytest.mark.parametrize("num_support,masked", [(0, False), (2, True)])
def test_fnc_detect_matches_numpy_and_the_loss(num_support, masked):
  """`fnc_detect` is METHODS.md's detection, and `fnc` detects the same rows (its
  num_false_negatives is the mask's mean row count)."""
  rng = np.random.RandomState(2)
  centres = rng.randn(3, 8)
  labels, queue_labels = rng.randint(0, 3, 6), rng.randint(0, 3, 20)
  key = clustered(rng, labels, centres)
  support = None if not num_support else np.stack(
      [clustered(rng, labels, centres) for _ in range(num_support)], axis=1)
  queue = clustered(rng, queue_labels, centres)
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  valid = (rng.rand(20) > 0.25) if masked else None
  detect = jax.jit(lambda *a: losses.fnc_detect(*a[:3], threshold=0.5, top_k=4,
                                                 queue_valid=a[3])[0])
  got = np.asarray(detect(key, queue, support, valid))
  want = numpy_detect(key, support, queue, 0.5, 4, valid)
  np.testing.assert_array_equal(got, want)
  assert 0 < want.sum() < want.size
  loss = jax.jit(lambda *a: losses.fnc(a[0], a[1], a[2], support_keys=a[3], threshold=0.5,
                                        top_k=4, queue_valid=a[4]))
  _, metrics = loss(key + 0.1, key, queue, support, valid)
  np.testing.assert_allclose(metrics["num_false_negatives"], want.sum(1).mean(), rtol=1e-6)


def fnc_objective(**fnc):
  cfg = objectives.default_objective_config()
  cfg.loss = "fnc"
  cfg.fnc.update(threshold=0.5, top_k=4, **fnc)
  return cfg


def diag_inputs(rng, batch=8, size=32, dim=8, support=2):
  centres = rng.randn(4, dim)
  labels = rng.randint(-1, 4, batch).astype(np.int32)
  queue_labels = rng.randint(-1, 4, size).astype(np.int32)
  queue = clustered(rng, queue_labels, centres)
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  return dict(
      queries=tuple(clustered(rng, labels, centres) for _ in range(2)),
      keys=tuple(clustered(rng, labels, centres) for _ in range(2)),
      support=np.stack([clustered(rng, labels, centres) for _ in range(support)], axis=1),
      labels=labels, queue=queue, queue_labels=queue_labels, valid=rng.rand(size) > 0.2)


@pytest.mark.parametrize("loss,directions,masked", [("fnc", 1, False), ("fnc", 2, True),
                                                    ("moco", 1, True)])
def test_label_metrics_match_numpy(loss, directions, masked):
  rng = np.random.RandomState(3)
  x = diag_inputs(rng)
  cfg = fnc_objective() if loss == "fnc" else objectives.default_objective_config()
  keys = x["keys"][:directions]
  valid = x["valid"] if masked else None
  metrics = jax.jit(lambda keys, *a: diagnostics.label_metrics(cfg, keys, *a[:3],
                                                               queue_valid=a[3], support=a[4]))
  got = jax.device_get(metrics(keys, x["labels"], x["queue"], x["queue_labels"], valid,
                               x["support"]))
  detected = [] if loss != "fnc" else [numpy_detect(k, x["support"], x["queue"], 0.5, 4, valid)
                                       for k in keys]
  want = numpy_label_metrics(x["labels"], x["queue_labels"], valid, detected)
  assert set(got) == set(want) == (DIAG | FNC_DIAG if loss == "fnc" else DIAG)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
  if loss == "fnc":   # non-trivial: some detections right, some wrong, some same-class missed
    assert 0 < want["diag/fn_precision"] < 1 and 0 < want["diag/fn_recall"] < 1


def test_objective_diagnostics_on_eight_devices_equal_one_and_need_labels():
  """The objective with the K-sharded queue on 8 devices (counts psum-ed inside its shard_map)
  gives the same loss and diag metrics as the replicated one on 1 device; without a label in
  `extras` or without queue labels, no diag metric at all."""
  rng = np.random.RandomState(4)
  x = diag_inputs(rng, batch=16, size=32)
  cfg = fnc_objective()
  results = []
  for devices, mode in ((1, "replicated"), (8, "sharded")):
    mesh = make_mesh(devices)
    fn = jax.jit(objectives.make_objective_fn(cfg, mesh=mesh, queue_mode=mode))
    put = lambda tree: global_batch_from_local(mesh, tree)
    qs, ks, extras = put(x["queries"]), put(x["keys"]), put(
        {"support": x["support"], "label": x["labels"]})
    labelled = put(queue_lib.Negatives(keys=x["queue"], labels=x["queue_labels"],
                                       valid=x["valid"]))
    _, metrics = fn(qs, ks, labelled, extras)
    results.append(jax.device_get(metrics))
    assert DIAG | FNC_DIAG <= set(metrics)
    no_label = {"support": extras["support"]}
    unlabelled = labelled.replace(labels=None)
    for negatives, ex in ((labelled, no_label), (unlabelled, extras)):
      _, metrics = fn(qs, ks, negatives, ex)
      assert not [n for n in metrics if n.startswith("diag/")], (devices, set(metrics))
  one, eight = results
  assert set(one) == set(eight)
  for name in one:
    np.testing.assert_allclose(one[name], eight[name], rtol=1e-5, atol=1e-6, err_msg=name)
  detected = [numpy_detect(k, x["support"], x["queue"], 0.5, 4, x["valid"]) for k in x["keys"]]
  want = numpy_label_metrics(x["labels"], x["queue_labels"], x["valid"], detected)
  for name in want:
    np.testing.assert_allclose(one[name], want[name], rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- the train step


def test_train_step_reports_diagnostics_only_with_stored_labels():
  """Two real steps of a tiny MoCo run with labels: step 1 reads a noise queue (no labelled
  pairs: ratio 0, count 0), step 2 the labels step 1 enqueued; its queue_same_label is the NumPy
  class-collision rate of batch 2 against batch 1's labels. Without "label" in the batch, or with
  queue.store_labels off, the metrics have no diag entry (checked by tracing, not compiling).

  The same compiled step (one program) also runs Ghost BN (4 strided groups on one device) and
  `queue.mask_unfilled`: the first step sees no negatives (only the positive: loss exactly 0),
  the second only the 16 keys of the first (the diag counts above see the same rows: the noise
  rows carry no label). Its unmasked counterpart is in tests/test_train_step.py (MoCo's noise
  rows are negatives from the first step)."""
  c = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  c.bn.update(mode="ghost", groups=4)
  c.queue.mask_unfilled = True
  mesh = make_mesh(1)
  models = train_step.build_models(c, mesh)
  tx = optax.sgd(0.01)
  rng = np.random.RandomState(5)
  batch_size = 16
  images = lambda: rng.rand(batch_size, 16, 16, 1).astype(np.float32)
  batches = [{"view1": images(), "view2": images(),
              "label": rng.randint(-1, 3, batch_size).astype(np.int32)} for _ in range(2)]
  state, shardings = train_step.create_state(c, models=models, tx=tx, mesh=mesh,
                                             sample_images=jnp.zeros((2, 16, 16, 1)),
                                             rng=jax.random.key(0))
  step_fn = train_step.make_train_step(c, models=models, tx=tx, mesh=mesh, total_steps=2,
                                       base_rng=jax.random.key(1))
  no_label = {k: v for k, v in batches[0].items() if k != "label"}
  assert not [n for n in jax.eval_shape(step_fn, state, no_label)[1] if n.startswith("diag/")]
  c_off = c.copy_and_resolve_references()
  c_off.queue.store_labels = False
  step_off = train_step.make_train_step(c_off, models=models, tx=tx, mesh=mesh, total_steps=2,
                                        base_rng=jax.random.key(1))
  assert not [n for n in jax.eval_shape(step_off, state, batches[0])[1] if n.startswith("diag/")]

  step = train_step.jit_train_step(step_fn, mesh=mesh, shardings=shardings)
  metrics = []
  for batch in batches:
    state, m = step(state, global_batch_from_local(mesh, batch))
    metrics.append(jax.device_get(m))
  assert np.isfinite([m["loss"] for m in metrics]).all()
  np.testing.assert_allclose(metrics[0]["loss"], 0.0, atol=1e-6)
  assert metrics[1]["loss"] > 0.1
  assert int(state.queue.filled) == 2 * batch_size
  assert DIAG <= set(metrics[0]) and not FNC_DIAG & set(metrics[0])
  assert metrics[0]["diag/labeled_pairs"] == 0 and metrics[0]["diag/queue_same_label"] == 0
  queue_labels = numpy_fifo(c.queue.size, [b["label"] for b in batches], -1)
  np.testing.assert_array_equal(np.asarray(state.queue.labels), queue_labels)
  want = numpy_label_metrics(batches[1]["label"],
                             numpy_fifo(c.queue.size, [batches[0]["label"]], -1))
  assert want["diag/labeled_pairs"] > 0
  for name in DIAG:
    np.testing.assert_allclose(metrics[1][name], want[name], rtol=1e-6, err_msg=name)
