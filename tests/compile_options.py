"""XLA compile options for the tests that need XLA's default CPU emitters.

tests/conftest.py compiles the suite with XLA's older CPU emitters (`XLA_FLAGS`), which compile
its programs in about half the time. They are not what users run: at optimisation level 0 they
miscompile the colour jitter's chain of per-example selects, and their float32 sums are coarser.
The tests that compare with TensorFlow to float32 rounding, or that need the default sums'
accuracy, compile their programs with `jax.jit(f, compiler_options=DEFAULT_CPU_EMITTERS)`
(measurements: docs/CONTRIBUTING.md). Only the CPU backend reads these options.
"""
DEFAULT_CPU_EMITTERS = {"xla_cpu_use_fusion_emitters": True}
