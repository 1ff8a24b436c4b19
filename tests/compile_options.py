"""XLA compile options for the tests that need XLA's default CPU emitters.

tests/conftest.py compiles the suite with XLA's older CPU emitters (`XLA_FLAGS`), which compile
its programs in about half the time. At optimisation level 0 they miscompile the colour jitter's
chain of per-example selects (values off by up to 1.0), and their float32 sums are coarser, so the
tests that compare with TensorFlow to float32 rounding, or that need the default sums' accuracy,
compile with these options: `jax.jit(f, compiler_options=DEFAULT_CPU_EMITTERS)` or
`.lower(...).compile(compiler_options=...)`. Only the CPU backend reads them.
"""
DEFAULT_CPU_EMITTERS = {"xla_cpu_use_fusion_emitters": True}
