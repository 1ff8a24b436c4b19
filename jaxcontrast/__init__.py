"""jaxcontrast: negative-aware contrastive self-supervised learning in JAX/Flax.

`jaxcontrast.losses` is importable on its own (jax only); the rest of the package (models, data,
training) is imported lazily by its submodules. `jaxcontrast.load_encoder(workdir)` (needs the
`train` extra) restores a run's encoder from its checkpoint: see `jaxcontrast.eval.encoders`.
"""

__version__ = "0.1.0"

__all__ = ["load_encoder"]


def __getattr__(name):
  # Lazy: `import jaxcontrast` (and `jaxcontrast.losses`) must not import flax or orbax.
  if name == "load_encoder":
    from jaxcontrast.eval.encoders import load_encoder  # pylint: disable=g-import-not-at-top
    return load_encoder
  raise AttributeError(f"module 'jaxcontrast' has no attribute {name!r}")
