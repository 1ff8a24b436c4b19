"""`python tests/late_compile.py SECONDS MODULE ARGS...` runs `python -m MODULE ARGS` with this
process SECONDS late at its first train step, after compiling it, as a slower host is, or one
that compiles while the others load the program from a compilation cache
(tests/test_multiprocess.py). It says so on stderr."""
import runpy
import sys
import time

from jaxcontrast.run import pretrain


def _late(seconds, wait):
  def late(*args, **kwargs):
    print(f"late_compile: {seconds:g} s late at the first step", file=sys.stderr, flush=True)
    time.sleep(seconds)
    return wait(*args, **kwargs)
  return late


if __name__ == "__main__":
  # After the compilation, before the wait for the other processes.
  pretrain.wait_for_every_process = _late(float(sys.argv[1]), pretrain.wait_for_every_process)
  module = sys.argv[2]
  sys.argv = [module, *sys.argv[3:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
