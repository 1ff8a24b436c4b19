"""CO2 (MoCo v2 + consistency regulariser) on Fashion-MNIST. alpha and tau_con are unverified.

  python -m jaxcontrast.main --config configs/co2_fashion_mnist.py --workdir /tmp/co2_fashion_mnist
  python -m jaxcontrast.main --config configs/co2_fashion_mnist.py:tiny --workdir /tmp/co2_fashion_mnist_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("co2", "fashion_mnist", variant)
