"""The library leaves the process environment alone: importing any module writes no variable,
the entry points run with the XLA_FLAGS the user gave (CPU flags belong to launch/local.sh, the
test set-up and the CPU benchmark scripts), and no module imports JAX's private `jax._src`."""
import ast
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every os.putenv / os.unsetenv (os.environ writes go through them) is reported by an audit
# hook from the first import of jaxcontrast on. The entry points run with their heavy part
# replaced by a probe that records XLA_FLAGS as the run would start JAX with it.
_SCRIPT = r"""
import json, os, pkgutil, importlib, sys, tempfile
writes = []
PACKAGE = os.path.join(os.getcwd(), "jaxcontrast") + os.sep
def hook(event, args):
  if event in ("os.putenv", "os.unsetenv"):
    # The writer: the first frame outside os.environ's own code (libraries jaxcontrast imports
    # set their own variables; only jaxcontrast's code counts).
    frame = sys._getframe(1)
    while frame and frame.f_code.co_filename in (os.__file__, "<frozen os>"):
      frame = frame.f_back
    if frame and frame.f_code.co_filename.startswith(PACKAGE):
      key = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
      writes.append([phase, key, frame.f_code.co_filename, frame.f_lineno])
phase = "import"
sys.addaudithook(hook)
import jaxcontrast
skipped = []
for m in pkgutil.walk_packages(jaxcontrast.__path__, "jaxcontrast."):
  if m.name.endswith("__main__") or m.name == "jaxcontrast.main":   # run below, as a script
    continue
  try:
    importlib.import_module(m.name)
  except ImportError as e:   # an optional extra (torch) missing
    skipped.append([m.name, str(e)])
seen = {}
from jaxcontrast.run import pretrain
from jaxcontrast.eval import linear_probe
def probe(name):
  def run(*a, **k):
    seen[name] = os.environ.get("XLA_FLAGS")
    return {}
  return run
pretrain.train_and_evaluate = probe("main")
linear_probe.run_probe = probe("linear_probe")
linear_probe.summary_line = lambda result: "probe"
import runpy
from absl import flags as absl_flags
flags_before_main = set(absl_flags.FLAGS)
workdir = tempfile.mkdtemp()
phase = "main"
sys.argv = ["main", "--config=configs/moco_fashion_mnist.py:tiny", "--workdir=" + workdir]
try:
  runpy.run_module("jaxcontrast.main", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
phase = "linear_probe"
# As `python -m jaxcontrast.eval.linear_probe` runs (its __main__ block), with main's flags gone.
import functools
from absl import flags
from jaxcontrast import cli
for name in set(flags.FLAGS) - flags_before_main:
  delattr(flags.FLAGS, name)
sys.argv = ["linear_probe", "--workdir=" + workdir]
try:
  cli.run(functools.partial(linear_probe.main, initialize_distributed=linear_probe._define_flags()),
          config=linear_probe.config_lib.default_probe_config)
except SystemExit as e:
  assert not e.code, e.code
print(json.dumps(dict(writes=writes, seen=seen, skipped=skipped,
                      xla_flags=os.environ.get("XLA_FLAGS"))))
"""


def test_imports_and_entry_points_leave_xla_flags_as_given():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(ROOT)
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert [w for w in r["writes"] if w[0] == "import"] == [], r["writes"]
  assert not any(w[1] == "XLA_FLAGS" for w in r["writes"]), r["writes"]
  # Both entry points reached the run, with XLA_FLAGS still unset.
  assert r["seen"] == {"main": None, "linear_probe": None}
  assert r["xla_flags"] is None
  # Only optional extras may be missing here, never a module of the package itself.
  assert all("jaxcontrast" not in reason for _, reason in r["skipped"]), r["skipped"]


def test_no_module_imports_private_jax():
  offenders = []
  for path in sorted((ROOT / "jaxcontrast").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                    if n == "jax._src" or n.startswith("jax._src.")]
  assert offenders == []
