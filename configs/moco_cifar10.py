"""MoCo v2 on CIFAR-10: MoCo's CIFAR demo (R18 CIFAR stem, K 4096, m 0.99, tau 0.1, 8-group split BN).

  python -m jaxcontrast.main --config configs/moco_cifar10.py --workdir /tmp/moco_cifar10
  python -m jaxcontrast.main --config configs/moco_cifar10.py:tiny --workdir /tmp/moco_cifar10_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("moco", "cifar10", variant)
