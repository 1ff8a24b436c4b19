"""SCE on Fashion-MNIST with the SCE CIFAR recipe (weak target view, target-only split BN).

  python -m jaxcontrast.main --config configs/sce_fashion_mnist.py --workdir /tmp/sce_fashion_mnist
  python -m jaxcontrast.main --config configs/sce_fashion_mnist.py:tiny --workdir /tmp/sce_fashion_mnist_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("sce", "fashion_mnist", variant)
