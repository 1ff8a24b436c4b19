"""XMoCo on Fashion-MNIST. INTERPRETATION of the abstract; weights unverified.

  python -m jaxcontrast.main --config configs/xmoco_fashion_mnist.py --workdir /tmp/xmoco_fashion_mnist
  python -m jaxcontrast.main --config configs/xmoco_fashion_mnist.py:tiny --workdir /tmp/xmoco_fashion_mnist_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("xmoco", "fashion_mnist", variant)
