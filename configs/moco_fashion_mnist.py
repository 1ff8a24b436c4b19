"""MoCo v2 on Fashion-MNIST (the offline default dataset) with MoCo's CIFAR-10 demo recipe.

  python -m jaxcontrast.main --config configs/moco_fashion_mnist.py --workdir /tmp/moco_fashion_mnist
  python -m jaxcontrast.main --config configs/moco_fashion_mnist.py:tiny --workdir /tmp/moco_fashion_mnist_tiny  # smoke

Loss and recipe: docs/METHODS.md §1. The CIFAR-10 demo's hyper-parameters (common.moco_cifar_demo)
carried over unchanged to 28x28 grayscale images: our choice, not tuned for Fashion-MNIST.
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("moco", "fashion_mnist")
  common.moco_cifar_demo(c)   # R18, K 4096, m 0.99, tau 0.1, batch 512, SGD 0.06, 8-group BN
  c.objective.loss = "moco"   # InfoNCE over [positive, queue] (METHODS §1)
  c.objective.symmetric = False
  return common.finish(c, arg)
