"""The real pretraining loop on the tiny MoCo config: files, kill/SIGTERM and resume, NaN stop,
incompatible checkpoints, load_run.

One uninterrupted in-process run (the `reference` fixture) is shared by the tests; the resume
test kills a `python -m jaxcontrast.main` subprocess (same XLA flags and persistent compilation
cache as this process, from conftest), resumes it here and compares its final state bitwise with
the reference. Every run here has the reference's train step (same config where it shapes the
program), so the step is compiled once and loaded from the cache afterwards; the results stay
bitwise the same, the loaded executable being the compiled one.

The split is cut to 32 images (2 steps of 16 per epoch) and the queue stores source ids
(K = 64 = the keys of the last two epochs), so every checkpoint at an epoch boundary must hold
each id of the split equally often in its queue: a resume that skipped or repeated examples
breaks that.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from jaxcontrast import config_lib
from jaxcontrast.run import checkpoint, pretrain
from test_data_helpers import prepared_fashion_dir

SPEC = "configs/moco_fashion_mnist.py:tiny"
STEPS = 8
EPOCH_STEPS = 2  # train[:32] / batch 16
SPLIT = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(data_dir, **extra):
  o = {"data.data_dir": data_dir, "data.train_split": f"train[:{SPLIT}]", "total_steps": STEPS,
       "checkpoint_every": EPOCH_STEPS, "keep_checkpoints": 10, "log_every": 1,
       "queue.store_ids": True, "data.threadpool_size": 0}
  o.update(extra)
  return o


def _config(data_dir, **extra):
  config = config_lib.load_config(SPEC)
  config.unlock()
  config.update_from_flattened_dict(_overrides(data_dir, **extra))
  return config


def _command(workdir, data_dir, **extra):
  flags = [f"--config.{k}={v}" for k, v in _overrides(data_dir, **extra).items()]
  return [sys.executable, "-m", "jaxcontrast.main", f"--config={SPEC}", f"--workdir={workdir}",
          *flags]


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _check_epochs_once(workdir):
  """Each epoch-boundary checkpoint's queue holds every id of the split equally often."""
  for step, ids in _queue_ids_by_step(workdir).items():
    if step % EPOCH_STEPS == 0:
      epochs = min(step * 16, 64) // SPLIT
      counts = np.bincount(ids[ids >= 0], minlength=SPLIT)
      np.testing.assert_array_equal(counts, np.full(SPLIT, epochs), err_msg=f"step {step}")


def _queue_ids_by_step(workdir):
  """The queue's source ids in every checkpoint (one load_run, then plain restores)."""
  state = checkpoint.load_run(workdir).state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  ckpt = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  ids = {s: np.asarray(ckpt.restore(s, abstract).state.queue.ids) for s in ckpt.all_steps()}
  ckpt.close()
  return ids


@pytest.fixture(scope="module")
def data_dir():
  return prepared_fashion_dir()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run; workdir given as a file:// URI."""
  workdir = tmp_path_factory.mktemp("reference")
  knn = {"knn_every": STEPS, "knn.num_train": 32, "knn.k": 10, "knn.batch_size": 32,
         "data.eval_split": "test[:64]"}  # The kNN monitor at the end (no state change).
  last = pretrain.train_and_evaluate(_config(data_dir, **knn), f"file://{workdir}")
  return epath.Path(workdir), last


def test_full_run_writes_its_files(reference):
  workdir, last = reference
  assert last["step"] == STEPS and np.isfinite(last["loss"])
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert {"loss", "lr", "images_per_s", "epoch", "grad_norm"} <= set(rows[-1])
  assert "images_per_s" not in rows[0]  # Undefined at the first (compiling) step.
  assert rows[-1]["epoch"] == STEPS / EPOCH_STEPS
  assert 0 <= rows[-1]["knn/top1"] <= 1 and "knn/top1" not in rows[-2]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["queue"]["store_ids"] is True and saved["total_steps"] == STEPS
  ckpt = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  assert sorted(ckpt.all_steps()) == [2, 4, 6, 8]
  data, _ = ckpt.saved_json(6)
  assert data["examples_per_process"] == 6 * 16 and data["epoch"] == 3
  assert data["index_in_epoch"] == 0 and data["process_count"] == 1
  ckpt.close()


def test_load_run_and_each_epoch_once(reference):
  workdir, _ = reference
  run = checkpoint.load_run(workdir)
  assert run.step == STEPS and int(run.state.step) == STEPS
  assert run.config.queue.store_ids is True
  images = jnp.zeros((2, 16, 16, 1))
  # Shapes only: traced, not compiled.
  out = jax.eval_shape(lambda v: run.models.target.apply(v, images, train=False, predict=False),
                       {"params": run.state.ema_params, "batch_stats": run.state.ema_batch_stats})
  assert out["projection"].shape == (2, 16)
  _check_epochs_once(workdir)
  with pytest.raises(ValueError, match="saved steps"):
    checkpoint.load_run(workdir, step=5)


def test_incompatible_checkpoint_names_the_key(reference, data_dir):
  workdir, _ = reference
  with pytest.raises(ValueError, match=r"queue\.size = 64 in the checkpoint but 32 now"):
    pretrain.train_and_evaluate(_config(data_dir, **{"queue.size": 32}), workdir)
  with pytest.raises(ValueError, match=r"model\.width = 0\.125 in the checkpoint but 0\.25"):
    pretrain.train_and_evaluate(_config(data_dir, **{"model.width": 0.25}), workdir)
  with pytest.raises(ValueError, match="method = 'moco' in the checkpoint but 'sce'"):
    pretrain.train_and_evaluate(_config(data_dir, method="sce"), workdir)
  assert json.loads((workdir / "config.json").read_text())["queue"]["size"] == 64  # Untouched.
  # The same config on a finished workdir: nothing to run, the last logged metrics come back.
  assert pretrain.train_and_evaluate(_config(data_dir), workdir)["step"] == STEPS


def _wait_for(predicate, proc, what, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: "
                           f"{proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timeout waiting for {what}")
    time.sleep(0.02)


def _committed(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()
                and (p / "commit_success.txt").exists()) if d.exists() else []


def _metric_steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


def _signal_after(calls, sig, monkeypatch):
  """Sends `sig` to this process once the run's compiled step has been called `calls` times.
  The step itself is the run's own compiled program (the wrapper is outside it)."""
  compile_ = pretrain.compile_on_every_process

  def compile_and_count(*args, **kwargs):
    step_fn, n = compile_(*args, **kwargs), [0]

    def counted(state, batch):
      out = step_fn(state, batch)
      n[0] += 1
      if n[0] == calls:
        os.kill(os.getpid(), sig)
      return out
    return counted

  monkeypatch.setattr(pretrain, "compile_on_every_process", compile_and_count)


def test_kill_sigterm_and_resume_is_exact(reference, data_dir, tmp_path, monkeypatch, caplog):
  """SIGKILL of `python -m jaxcontrast.main` after its first checkpoint, SIGTERM in the resumed
  run, then finish: the final state equals the uninterrupted run's bit for bit, each epoch's
  examples are seen once, and metrics.jsonl has each step once.

  The resumed run is in this process, the SIGTERM sent to it from its step loop: the entry
  point's own SIGTERM (exit status 0, the step it stopped at saved, then resumed) is
  test_multiprocess.py::test_preempted_processes_save_the_same_step_and_resume."""
  ref_dir, _ = reference
  workdir = epath.Path(tmp_path / "resumed")
  command = _command(workdir, data_dir)
  # The suite's environment (conftest): its XLA flags and persistent compilation cache.
  env = dict(os.environ, PYTHONPATH=REPO)

  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _committed(workdir), proc, "the first checkpoint")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  killed_at = _committed(workdir)
  assert killed_at and max(killed_at) < STEPS, killed_at

  resumed_from = max(killed_at)
  # Lines the killed run logged after its checkpoint linger until the resumed run drops them:
  # the signal comes at a step beyond all of them.
  logged = max(_metric_steps(workdir))
  sigterm_at = max(logged, resumed_from) + 1
  assert sigterm_at < STEPS, f"the killed run logged step {logged} before SIGKILL arrived"
  _signal_after(sigterm_at - resumed_from, signal.SIGTERM, monkeypatch)
  with caplog.at_level("INFO", logger="jaxcontrast"):
    last = pretrain.train_and_evaluate(_config(data_dir), workdir)
  assert f"resumed from" in caplog.text and "stopped by SIGTERM" in caplog.text, caplog.text
  assert last["step"] == sigterm_at
  assert _metric_steps(workdir) == list(range(1, sigterm_at + 1))
  assert max(_committed(workdir)) == sigterm_at  # Saved the step it stopped at.
  monkeypatch.undo()

  last = pretrain.train_and_evaluate(_config(data_dir), workdir)  # The same config, finishes.
  assert last["step"] == STEPS
  assert _metric_steps(workdir) == list(range(1, STEPS + 1))
  ref = checkpoint.load_run(ref_dir)
  run = checkpoint.load_run(workdir)
  assert run.step == STEPS
  for a, b in zip(_leaves(ref.state), _leaves(run.state)):
    np.testing.assert_array_equal(a, b)
  _check_epochs_once(workdir)


def test_nan_stops_with_the_step_and_saves_nothing_non_finite(data_dir, tmp_path, monkeypatch):
  """From step 3 on the step returns NaN parameters and loss: the run stops naming step 3 and
  the last good checkpoint (2), and no later checkpoint exists. The poison is applied after the
  run's own compiled step (the reference's program, from the compilation cache)."""
  compile_ = pretrain.compile_on_every_process

  @jax.jit
  def poison(new_state, metrics):
    bad = new_state.step >= 3
    nan_from_3 = lambda x: jnp.where(bad, jnp.nan, x)
    new_state = new_state.replace(params=jax.tree.map(nan_from_3, new_state.params))
    return new_state, dict(metrics, loss=nan_from_3(metrics["loss"]))

  def compile_and_poison(*args, **kwargs):
    step_fn = compile_(*args, **kwargs)
    return lambda state, batch: poison(*step_fn(state, batch))

  monkeypatch.setattr(pretrain, "compile_on_every_process", compile_and_poison)
  config = _config(data_dir, checkpoint_every=2, log_every=100)
  with pytest.raises(pretrain.NonFiniteLossError,
                     match=r"at step 3 .*Last good checkpoint: step 2"):
    pretrain.train_and_evaluate(config, tmp_path)
  assert _committed(epath.Path(tmp_path)) == [2]
  assert np.isfinite(np.concatenate(
      [x.ravel() for x in _leaves(checkpoint.load_run(tmp_path).state)
       if np.issubdtype(x.dtype, np.floating)])).all()
