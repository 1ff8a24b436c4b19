"""Test set-up: CPU with 8 simulated devices (or a GPU, see below), quiet TensorFlow.

XLA_FLAGS must be set before jax is imported anywhere, hence module level here.
"""
import gc
import importlib.util
import os
import shutil
import tempfile

import pytest

# The suite runs on CPU with 8 simulated devices. `JAX_PLATFORMS=cuda` runs it on a GPU instead
# (the loss tests, docs/CONTRIBUTING.md); the CPU compile flags below are then left out.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ON_CPU = os.environ["JAX_PLATFORMS"] == "cpu"
_DEFAULT_FLAGS = {"--xla_force_host_platform_device_count": "8"}
if _ON_CPU:
  # Tests run tiny programs a few steps each, so XLA's compile time is most of their cost: LLVM
  # optimisation level 0 compiles a tiny ResNet train step in 5.7 s instead of 14 s (measured on
  # 2 cores), and runs it in 0.09 s instead of 0.02 s.
  # XLA's own convolutions instead of YNNPACK's, as launch/local.sh runs on CPU
  # (docs/performance.md, CPU advice).
  # XLA's older CPU emitters compile the suite's programs in about half the time; the tests they
  # get wrong compile with the default ones (tests/compile_options.py says which and why). A
  # jaxlib that no longer knows the emitter flag stops at start-up naming it: then remove it here.
  _DEFAULT_FLAGS.update({"--xla_backend_optimization_level": "0",
                         "--xla_cpu_experimental_ynn_fusion_type": "",
                         "--xla_cpu_use_fusion_emitters": "false"})
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")   # TensorFlow, too, stays off any GPU.
else:
  # Several pytest workers share one accelerator: none takes 75 % of its memory at start.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# For each flag a value already in XLA_FLAGS wins, so that a comparison can be run from the shell
# (`XLA_FLAGS=--xla_cpu_use_fusion_emitters=true bash launch/test.sh`).
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] +
    [f"{name}={value}" for name, value in _DEFAULT_FLAGS.items() if name + "=" not in _flags]
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Python's cyclic collector at rarer intervals (test processes only): the workers hold JAX's and
# TensorFlow's large object graphs, which every full collection walks, and a test allocates
# millions of short-lived objects while tracing. Costs a little peak memory (docs/CONTRIBUTING.md).
gc.set_threshold(100_000, 50, 100)

# One persistent compilation cache for the whole run, shared by both xdist workers and every
# subprocess a test starts (they inherit the environment): tests compile the same tiny programs
# many times over (the same train step in several tests, the entry points in subprocesses). A
# loaded executable is the compiled one, so results are unchanged. Removed at the end.
# xdist workers are children of the controller: both name the cache after the controller's pid.
_RUN = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
_CACHE = os.path.join(tempfile.gettempdir(), f"jaxcontrast_test_jit_cache_{_RUN}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# tfds' data folder for the run, also removed at the end: tfds must never try the network inside
# tests, and the tests that read Fashion-MNIST read it there (prepared once, 1,000 examples per
# split: test_data_helpers.prepared_fashion_dir, by the autouse fixture below). Preparing all
# 70,000 images took ~20 s.
_TFDS = os.path.join(tempfile.gettempdir(), f"jaxcontrast_test_tfds_{_RUN}")
os.environ["TFDS_DATA_DIR"] = _TFDS


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if not hasattr(session.config, "workerinput"):   # the controller (or a run without xdist)
    shutil.rmtree(_CACHE, ignore_errors=True)
    shutil.rmtree(_TFDS, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _fashion_mnist_prepared():
  """Tests that leave `data.data_dir` unset (the default folder) find Fashion-MNIST prepared.

  Without tensorflow-datasets (the GPU machine of docs/CONTRIBUTING.md, which runs the loss
  tests) nothing is prepared; a test that reads data then fails on its own import.
  """
  if importlib.util.find_spec("tensorflow_datasets") is None:
    return
  from test_data_helpers import prepared_fashion_dir  # pylint: disable=g-import-not-at-top
  prepared_fashion_dir()


# Modules whose tests share an expensive module-scoped fixture (a pretraining run, a 2-process
# launch): under `pytest -n 2` each runs whole on one worker, so the fixture is made once.
# (pytest-xdist's own `xdist_group` mark does not take effect with pytest 9: its worker renames
# `item._nodeid`, which pytest 9 no longer reads; measured, each of these fixtures ran on both
# workers.) Other tests are scheduled one by one.
SHARED_FIXTURE_MODULES = ("test_eval_probe.py", "test_multiprocess.py", "test_pretrain_loop.py",
                          "test_cli.py", "test_launchers.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class SharedFixtureModules(LoadScopeScheduling):
    """LoadScope with one scope per listed module and one per test elsewhere. LoadScope hands
    out the scopes with the most tests first: these modules start at once, not last."""

    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return module if os.path.basename(module) in SHARED_FIXTURE_MODULES else nodeid

  return SharedFixtureModules(config, log)
