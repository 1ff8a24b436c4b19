"""XLA:CPU flags the entry points set before JAX starts its backends.

jax 0.10's XLA:CPU runs convolutions through YNNPACK by default. On this project's shapes that
is 2-6x slower than XLA's own (Eigen) convolutions, worst for the filter gradient. 2 cores,
one 3x3 convolution 64 -> 64 channels on (256, 32, 32, 64), ms:

  kernels   forward   input gradient   filter gradient
  YNNPACK       233              225             1,316
  Eigen         108              118               225

Training steps, same machine: ResNet-18 CIFAR batch 256 went from 16.8 to 23.5 images/s; the
Fashion-MNIST main job's step went from ~325 to ~345-375 images/s. Matrix products do not
change measurably. So `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) is the
default of the command-line entry points that run networks (`main`, `bench`, the probe,
`semantic_pairs`) and of the tests. A value the user puts in XLA_FLAGS wins. Only the CPU backend reads it;
GPU and TPU programs are unchanged. XLA reads XLA_FLAGS once, when the first backend starts, so
`apply()` must run before the first JAX computation; afterwards it only warns.
"""
from __future__ import annotations

import logging
import os

YNN_FUSION_TYPE = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (YNN_FUSION_TYPE + "=",)   # empty list: no YNNPACK fusions


def with_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each default flag whose name it does not already set."""
  added = [f for f in DEFAULT_FLAGS if f.split("=")[0] + "=" not in xla_flags]
  return " ".join([xla_flags.strip()] + added).strip()


def apply() -> None:
  """Adds the defaults to `os.environ["XLA_FLAGS"]`, if JAX has not started a backend yet."""
  flags = with_defaults(os.environ.get("XLA_FLAGS", ""))
  if flags == os.environ.get("XLA_FLAGS", "").strip():
    return
  try:
    from jax._src import xla_bridge   # private, hence the guard; no public query exists
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    logging.getLogger("jaxcontrast").warning(
        "JAX's backends already started: XLA:CPU keeps YNNPACK convolutions (slower on CPU; "
        "set XLA_FLAGS=%s before the first JAX computation)", DEFAULT_FLAGS[0])
    return
  os.environ["XLA_FLAGS"] = flags
