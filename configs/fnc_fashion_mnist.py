"""FNC (attraction, 2 support views) on Fashion-MNIST.

  python -m jaxcontrast.main --config configs/fnc_fashion_mnist.py --workdir /tmp/fnc_fashion_mnist
  python -m jaxcontrast.main --config configs/fnc_fashion_mnist.py:tiny --workdir /tmp/fnc_fashion_mnist_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("fnc", "fashion_mnist", variant)
