"""Run-layer pieces without a training step: the resumable input stream, metric files,
progress display, workdir paths."""
import io
import json
import pathlib
import shutil

import numpy as np
import pytest
from etils import epath

from jaxcontrast import config_lib
from jaxcontrast.data import pipeline
from jaxcontrast.run import checkpoint, metrics, pretrain, progress
from test_data_helpers import fashion_config, fashion_dir  # pylint: disable=unused-import


def test_stream_resumes_at_any_example(fashion_dir):
  """The stream from `start_example` is the tail of the stream from 0 (views included); each
  epoch is a permutation of the split and epochs are ordered differently."""
  cfg = fashion_config(fashion_dir, train_split="test[:20]", image_size=8, shuffle_buffer=8)
  stream = lambda start, n: [b for _, b in zip(range(n), pipeline.make_train_iterator(
      cfg, batch_size=4, seed=5, process_index=0, process_count=1, start_example=start))]
  full = stream(0, 12)  # 48 examples: epochs 0, 1 and 8 of epoch 2.
  ids = np.concatenate([b["id"] for b in full])
  assert sorted(ids[:20]) == list(range(20)) and sorted(ids[20:40]) == list(range(20))
  assert not np.array_equal(ids[:20], ids[20:40])
  for start_batch in (3, 5, 9):  # Mid-epoch 0, at the start of epoch 1, mid-epoch 1.
    for a, b in zip(full[start_batch:], stream(start_batch * 4, 12 - start_batch)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  assert pipeline.local_train_size(cfg, process_index=1, process_count=3) == 7
  with pytest.raises(ValueError, match="start_example"):
    pipeline.make_train_dataset(cfg, batch_size=4, seed=0, start_example=-1)


def test_resume_position_checks_the_streams():
  saved = pretrain.data_position(step=3, examples=48, local_batch=16, local_size=20, streams=1,
                                 source="fashion_mnist_debian")
  assert saved == {"step": 3, "examples_per_process": 48, "examples_per_stream": 48,
                   "streams": 1, "local_batch": 16, "process_count": 1, "epoch": 2,
                   "index_in_epoch": 8, "local_examples": 20,
                   "dataset_source": "fashion_mnist_debian"}
  resume = lambda saved, **kw: pretrain.resume_examples(
      saved, step=3, **dict(dict(local_batch=16, streams=1, source="fashion_mnist_debian"), **kw))
  assert resume(saved, local_batch=8) == 48  # Same example.
  with pytest.raises(ValueError, match="written with 2 input streams"):
    resume(dict(saved, streams=2))
  # A data item without the stream position or its source is not this version's: a clear error.
  old = {"step": 3, "examples_per_process": 48, "local_batch": 16, "process_count": 1}
  with pytest.raises(checkpoint.CheckpointError, match="has no input position"):
    resume(old)
  no_source = {k: v for k, v in saved.items() if k != "dataset_source"}
  with pytest.raises(checkpoint.CheckpointError, match=r"has no input position \(its data item "
                                                       r"lacks dataset_source\)"):
    resume(no_source)
  # Written by 2 processes of one stream each (24 examples per stream); this 1 process reads
  # both streams: 48 examples.
  two = {"step": 3, "examples_per_process": 24, "examples_per_stream": 24, "streams": 2,
         "local_batch": 8, "process_count": 2, "dataset_source": "cifar10"}
  assert resume(two, streams=2, source="cifar10") == 48


@pytest.mark.parametrize("saved, now, pin", [
    ("fashion_mnist", "fashion_mnist_debian", "tfds:fashion_mnist"),
    ("fashion_mnist_debian", "fashion_mnist", "fashion_mnist_debian"),
    ("imagenet2012_subset/1pct", "imagenet2012_subset/10pct", "tfds:imagenet2012_subset/1pct")])
def test_resume_refuses_another_dataset_source(saved, now, pin):
  """The position counts examples of one tfds dataset: on another source (tfds' Fashion-MNIST
  and the Debian files order the same images differently) a resume is refused, in one line
  naming both sources and the setting that reads the saved one."""
  position = pretrain.data_position(step=3, examples=48, local_batch=16, local_size=20,
                                    streams=1, source=saved)
  with pytest.raises(checkpoint.CheckpointError) as error:
    pretrain.resume_examples(position, step=3, local_batch=16, streams=1, source=now)
  message = str(error.value)
  assert "\n" not in message
  assert f"tfds dataset {saved!r}" in message and f"resolves data.dataset to {now!r}" in message
  assert f"--config.data.dataset={pin} " in message


def test_resume_checks_the_source_the_dataset_resolves_to(fashion_dir, tmp_path, monkeypatch):
  """train_and_evaluate checks the source `data.dataset` resolves to. With only the Debian files
  in data_dir, `fashion_mnist` reads `fashion_mnist_debian`: a checkpoint of tfds'
  `fashion_mnist` is refused before any step, and one that read the Debian files resumes under
  the name that pins them (the name itself need not match). Where `fashion_mnist` resolves to
  tfds' files (faked: not prepared here), that one is refused. The checkpoints are at the last
  step: a resume that passes the checks has nothing to train."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxcontrast.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from jaxcontrast.step import train_step  # pylint: disable=g-import-not-at-top
  from jaxcontrast.step.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.data.data_dir = fashion_dir
  config.total_steps = 2
  info = pipeline.dataset_info(config.data)
  assert info["source"] == "fashion_mnist_debian"
  mesh = make_mesh()
  tx, _ = make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                         total_steps=2, steps_per_epoch=None)
  abstract, _ = checkpoint.abstract_state(
      config, models=train_step.build_models(config, mesh), tx=tx, mesh=mesh,
      image_shape=info["image_shape"])
  state = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                       abstract)
  ckpt = checkpoint.Checkpointer(tmp_path / "fashion_mnist_debian")
  ckpt.save(2, state, config=config, data=pretrain.data_position(
      step=2, examples=32, local_batch=16, local_size=None, streams=1,
      source="fashion_mnist_debian"))
  ckpt.wait()
  ckpt.close()
  # The same checkpoint as tfds' files would have left it (the data item is Orbax's JSON).
  shutil.copytree(tmp_path / "fashion_mnist_debian", tmp_path / "fashion_mnist")
  item = tmp_path / "fashion_mnist" / checkpoint.CHECKPOINT_DIR / "2" / "data" / "metadata"
  item.write_text(json.dumps(dict(json.loads(item.read_text()), dataset_source="fashion_mnist")))
  with pytest.raises(checkpoint.CheckpointError, match=r"tfds dataset 'fashion_mnist'; this run "
                     r"resolves data.dataset to 'fashion_mnist_debian'.*"
                     r"--config.data.dataset=tfds:fashion_mnist "):
    pretrain.train_and_evaluate(config, tmp_path / "fashion_mnist")
  config.data.dataset = "fashion_mnist_debian"
  assert pretrain.train_and_evaluate(config, tmp_path / "fashion_mnist_debian") == {}
  config.data.dataset = "fashion_mnist"
  real = pipeline.dataset_info
  monkeypatch.setattr(pipeline, "dataset_info",
                      lambda cfg: dict(real(cfg), source="fashion_mnist"))
  with pytest.raises(checkpoint.CheckpointError, match=r"--config.data.dataset="
                                                       r"fashion_mnist_debian "):
    pretrain.train_and_evaluate(config, tmp_path / "fashion_mnist_debian")


def test_streams_make_the_global_batches_independent_of_the_process_count(fashion_dir):
  """Two processes reading one stream each give, row for row, the batches of one process
  reading both streams; their ids do not overlap. A resume continues each stream."""
  cfg = fashion_config(fashion_dir, train_split="test[:24]", image_size=8, shuffle_buffer=8)
  take = lambda n, **kw: [b for _, b in zip(range(n), pipeline.make_train_iterator(
      cfg, seed=3, **kw))]
  cfg.streams = 2
  one = take(5, batch_size=8, process_index=0, process_count=1)
  cfg.streams = None   # The default: one stream per process.
  two = [take(5, batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
  for step, batch in enumerate(one):
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([two[0][step][key], two[1][step][key]]), err_msg=key)
    assert not set(two[0][step]["id"]) & set(two[1][step]["id"])
  # 24 examples in 2 parts of 12: epoch 0 of each stream is its own 12 ids, once.
  firsts = [np.concatenate([b["id"] for b in two[p][:3]]) for p in (0, 1)]
  assert sorted(firsts[0]) == list(range(12)) and sorted(firsts[1]) == list(range(12, 24))
  assert pipeline.local_train_size(cfg, process_index=1, process_count=2) == 12
  cfg.streams = 2
  resumed = take(2, batch_size=8, process_index=0, process_count=1, start_example=3 * 8)
  for a, b in zip(one[3:], resumed):
    np.testing.assert_array_equal(a["view1"], b["view1"])
  assert pipeline.local_train_size(cfg, process_index=0, process_count=1) == 24
  with pytest.raises(ValueError, match="not a multiple of the 4 processes"):
    pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="multiple of this process's 2 streams"):
    pipeline.make_train_dataset(cfg, batch_size=8, seed=0, process_index=0, process_count=1,
                                start_example=3)


@pytest.mark.parametrize("append", [True, False])  # False: how gs:// files are written.
def test_metric_file_drops_steps_after_the_resumed_checkpoint(tmp_path, append):
  w = metrics.MetricWriter(epath.Path(tmp_path), tensorboard=False, append=append)
  for step in (1, 2, 3, 4):
    w.write(step, {"loss": np.float32(step), "matrix": np.zeros((2, 2))})
  w.close()
  w = metrics.MetricWriter(epath.Path(tmp_path), resume_step=2, append=append)  # Killed after 4.
  w.write(3, {"loss": 30.0, "nan": float("nan")})
  w.close()
  rows = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 30.0
  assert "matrix" not in rows[0] and np.isnan(rows[2]["nan"])
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_scalars_are_readable(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  w = metrics.MetricWriter(epath.Path(tmp_path))
  w.write(7, {"loss": 1.5})
  w.close()
  (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  values = [(e.step, v.tag, tf.make_ndarray(v.tensor), v.metadata.plugin_data.plugin_name)
            for e in tf.compat.v1.train.summary_iterator(str(event_file)) for v in e.summary.value]
  assert values == [(7, "loss", np.float32(1.5), "scalars")]


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_progress_lines_without_a_terminal():
  out, clock = io.StringIO(), _Clock()
  p = progress.Progress(total=10, start=0, global_batch=32, stream=out, clock=clock)
  assert not p.interactive
  clock.t = 100.0  # Compilation: left out of the rate.
  p.started(1)
  p.log(1, 4.0)
  p.update(2)      # Not a log point: nothing printed.
  clock.t = 102.0
  p.log(5, 3.25)
  p.close()
  lines = out.getvalue().splitlines()
  assert lines == ["step 1/10 loss 4.0000 ? img/s ETA ?",
                   "step 5/10 loss 3.2500 64.0 img/s ETA 0:00:02"]  # 4 steps x 32 / 2 s.


def test_progress_bar_on_a_terminal():
  out, clock = io.StringIO(), _Clock()
  p = progress.Progress(total=4, start=0, global_batch=8, stream=out, interactive=True,
                        width=8, clock=clock)
  p.started(1)
  clock.t = 1.0
  p.log(2, 0.5)
  p.update(3)      # Within 0.1 s of the last draw: skipped.
  clock.t = 2.0
  p.update(4)
  p.close()
  text = out.getvalue()
  assert text.startswith("\rstep 2/4 [====>   ]  50% loss 0.5000 8.0 img/s ETA 0:00:02")
  assert "\rstep 4/4 [========] 100% loss 0.5000 12.0 img/s ETA 0:00:00" in text
  assert "step 3/4" not in text and text.endswith("\n") and text.count("\n") == 1


def test_workdir_paths(tmp_path):
  assert checkpoint.workdir_path(f"file://{tmp_path}") == epath.Path(tmp_path)
  assert checkpoint.workdir_path(epath.Path(tmp_path)) == epath.Path(tmp_path)
  assert str(checkpoint.workdir_path("gs://bucket/run")) == "gs://bucket/run"
  with pytest.raises(ValueError, match="No checkpoint in"):
    checkpoint.load_run(tmp_path)


def test_config_json_round_trip():
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  back = checkpoint.config_from_dict(json.loads(json.dumps(checkpoint.config_to_dict(config))))
  assert back.to_dict() == config.to_dict()



def _queue_state(mesh, queue):
  """A TrainState holding only `queue`, rows split over `mesh` (cheap to save and restore)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from jaxcontrast.step.state import TrainState  # pylint: disable=g-import-not-at-top
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  put = lambda x, s: jax.device_put(np.asarray(x), s)
  queue = jax.tree.map(lambda x: put(x, rows if np.ndim(x) else rep), queue)
  return TrainState(step=put(np.int32(1), rep), params={}, ema_params={}, batch_stats={},
                    ema_batch_stats={}, opt_state=(), queue=queue)


def test_sharded_queue_restored_on_fewer_devices_is_reblocked(tmp_path, monkeypatch):
  """A sharded queue saved on 8 devices and resumed on 4 is, row for row and with its pointer,
  the queue 4 devices would have after the same pushes (config global batch 16, one key view),
  on the 4-device mesh. A state of just a queue keeps it small: the restore path is the loop's.
  The workdir is given as a RELATIVE path, as launch/local.sh does (Orbax alone refuses to save
  under one)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxcontrast.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from test_queue_ema_bn import _pushed  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  config.unlock()
  config.queue.mode = "sharded"
  assert config.global_batch_size == 16 and not config.objective.symmetric

  queue, want = _pushed(8, 64, 3, views=1), _pushed(4, 64, 3, views=1)
  state = _queue_state(make_mesh(8), queue)
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer("workdirs/run", keep=1)
  assert ckpt.directory == epath.Path(tmp_path) / "workdirs/run/checkpoints"
  ckpt.save(1, state, data={"data_devices": 8}, config=config)
  ckpt.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _queue_state(make_mesh(4), queue))
  restored = ckpt.restore(1, abstract, mesh=make_mesh(4)).state.queue
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored.ids), np.asarray(want.ids))
  written = np.asarray(want.ids) >= 0
  np.testing.assert_array_equal(np.asarray(restored.keys)[written],
                                np.asarray(want.keys)[written])
  assert int(restored.ptr) == int(want.ptr) == 3 * 16 // 4
  assert not np.array_equal(np.asarray(queue.ids), np.asarray(restored.ids))
  assert restored.keys.sharding.mesh.shape["data"] == 4


def test_knn_monitor_schedule():
  due = lambda steps, every: [d for d in range(1, steps + 1)
                              if pretrain.knn_due(d, steps=steps, every=every)]
  # 3 epochs of 234 steps end at 703: the evaluation at 702 would repeat the final one.
  assert due(703, 234) == [234, 468, 703]
  assert due(700, 100) == [100, 200, 300, 400, 500, 600, 700]
  assert due(730, 100) == [100, 200, 300, 400, 500, 600, 700, 730]
  assert due(720, 100) == [100, 200, 300, 400, 500, 600, 720]
  assert due(5, 1) == [1, 2, 3, 4, 5]


def test_eval_dataset_is_kept_in_memory_only_when_asked_and_small(fashion_dir):
  from jaxcontrast.eval import features
  split = "test[:40]"
  def batches(ds):
    return [b for b in ds.as_numpy_iterator()]
  streamed = fashion_config(fashion_dir)
  assert features.eval_dataset(streamed, batch_size=16, split=split) is not (
      features.eval_dataset(streamed, batch_size=16, split=split))
  cached = fashion_config(fashion_dir, cache=True)
  first = features.eval_dataset(cached, batch_size=16, split=split)
  assert features.eval_dataset(cached, batch_size=16, split=split) is first
  once, twice = batches(first), batches(first)
  reference = batches(pipeline.make_eval_dataset(streamed, batch_size=16, split=split))
  assert len(once) == len(reference) == 3   # 40 rows: two full batches and one padded
  for a, b, c in zip(once, twice, reference):
    for key in ("image", "label", "id", "mask"):
      np.testing.assert_array_equal(a[key], c[key])
      np.testing.assert_array_equal(b[key], c[key])
  # Another batch size, split or config is another dataset; too large for the limit: streamed.
  assert features.eval_dataset(cached, batch_size=8, split=split) is not first
  tiny_limit = fashion_config(fashion_dir, cache=True, in_memory_max_bytes=1000)
  assert features.eval_dataset(tiny_limit, batch_size=16, split=split) is not (
      features.eval_dataset(tiny_limit, batch_size=16, split=split))


def truncate_array_data(step_dir) -> None:
  """Cuts every OCDBT data file of a saved step's train state to 100 bytes, as a partial copy
  between buckets leaves them."""
  for f in pathlib.Path(step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":   # OCDBT's data files
      f.write_bytes(f.read_bytes()[:100])


def test_damaged_checkpoints_fall_back_to_the_newest_readable(tmp_path, caplog):
  """Steps 1-3 saved; step 3's array data truncated (a partial copy between buckets), step 2's
  data item missing: the restore warns naming both steps and items, moves them aside (so the
  run can save those steps again) and returns step 1. With step 1 damaged too: CheckpointError,
  one line naming every step."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxcontrast.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from test_queue_ema_bn import _pushed  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  mesh = make_mesh(8)
  states = {step: _queue_state(mesh, _pushed(8, 64, step, views=1)) for step in (1, 2, 3)}
  ckpt = checkpoint.Checkpointer(tmp_path, keep=None)
  for step, state in states.items():
    ckpt.save(step, state, data={"step": step}, config=config)
  ckpt.close()
  root = epath.Path(tmp_path) / "checkpoints"

  truncate_array_data(root / "3")
  (root / "2" / "data").rmtree()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          states[1])
  caplog.set_level("WARNING", logger="jaxcontrast")
  ckpt = checkpoint.Checkpointer(tmp_path, keep=None)
  restored = ckpt.restore_latest(abstract, mesh=mesh)
  assert restored.step == 1 and restored.data == {"step": 1}
  np.testing.assert_array_equal(np.asarray(restored.state.queue.keys),
                                np.asarray(states[1].queue.keys))
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "step 3 (item 'state'" in warned and "step 2 (item 'data' is missing)" in warned
  assert "resuming from the older checkpoint of step 1" in warned
  assert ckpt.all_steps() == [1]
  assert sorted(p.name for p in (epath.Path(tmp_path) / "checkpoints_damaged").iterdir()) == [
      "2", "3"]
  ckpt.save(2, states[2], data={"step": 2}, config=config)   # The run saves step 2 again.
  ckpt.close()

  truncate_array_data(root / "1")
  truncate_array_data(root / "2")
  ckpt = checkpoint.Checkpointer(tmp_path, keep=None)
  with pytest.raises(checkpoint.CheckpointError) as error:
    ckpt.restore_latest(abstract, mesh=mesh)
  ckpt.close()
  message = str(error.value)
  assert "\n" not in message and "No readable checkpoint" in message
  assert "step 2 (item 'state'" in message and "step 1 (item 'state'" in message
  assert (root / "2").exists()   # Nothing is moved when nothing can be resumed.


def test_stop_signals_of_a_single_process_run():
  """SIGTERM, SIGINT (Ctrl-C) and SIGHUP each ask for a save and a stop after the step in
  flight; a second Ctrl-C stops at once; a signal ignored at start (nohup) stays ignored; the
  previous handlers come back on close."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  from jaxcontrast.run import preemption  # pylint: disable=g-import-not-at-top
  before = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
  try:
    for sig in preemption.STOP_SIGNALS:
      watcher = preemption.PreemptionWatcher(checkpointer=None)
      assert not watcher.reached(1)
      os.kill(os.getpid(), sig)
      assert watcher.reached(2), sig
      if sig == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
          os.kill(os.getpid(), sig)
      watcher.close()
      assert signal.getsignal(sig) == before[sig]
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # as `nohup` starts a program
    watcher = preemption.PreemptionWatcher(checkpointer=None)
    os.kill(os.getpid(), signal.SIGHUP)
    assert not watcher.reached(1)
    watcher.close()
  finally:
    for sig, handler in before.items():
      signal.signal(sig, handler)
