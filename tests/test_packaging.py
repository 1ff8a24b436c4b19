"""Packaging: `jaxcontrast.losses` needs jax alone; training dependencies are the `train` extra."""
import configparser
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAINING_ONLY = ("flax", "optax", "orbax", "ml_collections", "tensorflow", "tensorflow_datasets",
                 "etils")


def _requirements(text):
  names = []
  for line in text.splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      names.append(re.split(r"[\s<>=!\[;]", line, maxsplit=1)[0].lower())
  return names


def test_install_requires_is_jax_and_numpy_and_train_extra_has_the_rest():
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  assert sorted(_requirements(cfg["options"]["install_requires"])) == ["jax", "numpy"]
  train = _requirements(cfg["options.extras_require"]["train"])
  for name in ("flax", "optax", "orbax-checkpoint", "ml-collections", "tensorflow-cpu",
               "tensorflow-datasets"):
    assert name in train, name
  # Lower bounds only (launch/constraints.txt pins what CI installs).
  assert "<" not in cfg["options"]["install_requires"] + cfg["options.extras_require"]["train"]


BLOCKED_IMPORT = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"blocked in this test: {name}")
sys.meta_path.insert(0, Block())
import jax.numpy as jnp
import jaxcontrast
from jaxcontrast import losses
q = jnp.ones((4, 8)); k = jnp.ones((4, 8)); queue = jnp.eye(16, 8)
loss, _ = losses.sce(q, k, queue)
loss2, _ = losses.moco_infonce(q, k, queue, temperature=0.2)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("OK", float(loss), float(loss2), loaded)
"""


def test_losses_import_and_run_without_training_dependencies():
  """With flax, optax, orbax, ml_collections, TensorFlow, tfds and etils made unimportable, the
  package and its losses still import and compute."""
  proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, ",".join(TRAINING_ONLY)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("OK") and proc.stdout.rstrip().endswith("[]"), proc.stdout
  # The blocker works: importing the train step fails under it.
  bad = BLOCKED_IMPORT.replace("from jaxcontrast import losses",
                              "from jaxcontrast.step import train_step")
  proc = subprocess.run([sys.executable, "-c", bad, ",".join(TRAINING_ONLY)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "blocked in this test" in proc.stderr


def test_importing_the_demo_changes_nothing():
  """`python -m jaxcontrast.demo` sets its simulated-device flags in main(); importing the module
  leaves the environment alone. (Running the demo takes ~35 s of eager compiles, so the suite
  does not: its losses are tested on their own.)"""
  env_check = ("import os; before = dict(os.environ); import jaxcontrast.demo; "
               "assert dict(os.environ) == before; print('UNCHANGED')")
  proc = subprocess.run([sys.executable, "-c", env_check], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "UNCHANGED" in proc.stdout, proc.stderr[-2000:]
