"""MoCo v2 on Fashion-MNIST (the offline default dataset), CIFAR-demo recipe.

  python -m jaxcontrast.main --config configs/moco_fashion_mnist.py --workdir /tmp/moco_fashion_mnist
  python -m jaxcontrast.main --config configs/moco_fashion_mnist.py:tiny --workdir /tmp/moco_fashion_mnist_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("moco", "fashion_mnist", variant)
