"""Optional dependencies: a part of the package that needs an extra names it when it is missing.

`jaxcontrast.losses` needs only jax; models, the train step and the run layer need the `train`
extra (flax, ml_collections, ...). Without it, importing them raises an ImportError that says
what to install instead of a bare "No module named 'ml_collections'".
"""
from __future__ import annotations

import importlib

TRAIN = ("flax", "ml_collections")


def require(part: str, modules=TRAIN, extra: str = "train") -> None:
  """Import `modules`; if one is missing, ImportError naming `part` and the extra to install."""
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"{part} needs the '{extra}' extra ({name} is not installed): "
                        f"pip install 'jaxcontrast[{extra}]'", name=name) from e
