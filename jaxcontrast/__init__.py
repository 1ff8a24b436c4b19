"""jaxcontrast: negative-aware contrastive self-supervised learning in JAX/Flax.

`jaxcontrast.losses` is importable on its own (jax only); the rest of the package (models, data,
training) is imported lazily by its submodules.
"""

__version__ = "0.1.0"
