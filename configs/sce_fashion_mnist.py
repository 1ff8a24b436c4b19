"""SCE on Fashion-MNIST with SCE's CIFAR-10 recipe (configs/sce_cifar10.py) unchanged.

  python -m jaxcontrast.main --config configs/sce_fashion_mnist.py --workdir /tmp/sce_fashion_mnist
  python -m jaxcontrast.main --config configs/sce_fashion_mnist.py:tiny --workdir /tmp/sce_fashion_mnist_tiny  # smoke

Loss and recipe: docs/METHODS.md §2 and configs/sce_cifar10.py (weak view to the target,
8-group split BN in the target only, tau_m 0.05). Carrying the CIFAR-10 recipe over to 28x28
grayscale images is our choice, not tuned for Fashion-MNIST.
"""
from jaxcontrast import config_lib

sce_cifar10 = config_lib.load_sibling(__file__, "sce_cifar10")


def get_config(arg=None):
  return sce_cifar10.get_config(arg, dataset="fashion_mnist")
