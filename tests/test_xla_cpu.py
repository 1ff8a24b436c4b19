"""The entry points' XLA:CPU defaults (jaxcontrast/xla_cpu.py)."""
import os
import subprocess
import sys

from jaxcontrast import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="


def test_defaults_are_added_once_and_never_override_the_user():
  assert xla_cpu.with_defaults("") == NO_YNN
  assert xla_cpu.with_defaults(" --xla_dump_to=/tmp/d ") == "--xla_dump_to=/tmp/d " + NO_YNN
  assert xla_cpu.with_defaults(xla_cpu.with_defaults("--a=1")) == "--a=1 " + NO_YNN
  mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  assert xla_cpu.with_defaults(mine) == mine


# A convolution large enough for XLA:CPU to hand to YNNPACK when allowed to (small ones it keeps).
_COMPILE_CONV = """
import jax, jax.numpy as jnp, sys
from jaxcontrast import xla_cpu
if sys.argv[1] == "before": xla_cpu.apply()
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
text = jax.jit(conv).lower(jnp.ones((64, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
if sys.argv[1] == "after": xla_cpu.apply()
import os
print("YNN" if "ynn_fusion" in text else "NO_YNN", os.environ.get("XLA_FLAGS", ""))
"""


def _compile_conv(when):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", _COMPILE_CONV, when], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  kernels, _, flags = out.stdout.strip().partition(" ")
  return kernels, flags, out.stderr


def test_apply_before_the_first_computation_turns_off_ynnpack_convolutions():
  kernels, flags, _ = _compile_conv("before")
  assert kernels == "NO_YNN" and flags == NO_YNN
  # Without it, jax 0.10's XLA:CPU does use YNNPACK here: the check above can fail.
  kernels, flags, _ = _compile_conv("never")
  assert kernels == "YNN" and flags == ""


def test_apply_after_the_backend_started_warns_and_changes_nothing():
  kernels, flags, stderr = _compile_conv("after")
  assert kernels == "YNN" and flags == ""
  assert "already started" in stderr
