"""SCE on CIFAR-10 (coeff 0.5, tau 0.1, tau_m 0.05, K 4096, weak view to the target).

  python -m jaxcontrast.main --config configs/sce_cifar10.py --workdir /tmp/sce_cifar10
  python -m jaxcontrast.main --config configs/sce_cifar10.py:tiny --workdir /tmp/sce_cifar10_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("sce", "cifar10", variant)
