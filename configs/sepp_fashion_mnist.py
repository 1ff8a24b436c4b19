"""SePP on Fashion-MNIST: key views from mined semantic partners. INTERPRETATION.

Mine pairs first and set config.data.semantic_pairs (see README, SePP):
  python -m jaxcontrast.semantic_pairs --dataset fashion_mnist --embedding pixels --threshold 0.9 --top_k 10 --out /tmp/fmnist_pairs.npz
  ... --config configs/sepp_fashion_mnist.py:queue_ids  # multi-positive loss over queue ids

  python -m jaxcontrast.main --config configs/sepp_fashion_mnist.py --workdir /tmp/sepp_fashion_mnist
  python -m jaxcontrast.main --config configs/sepp_fashion_mnist.py:tiny --workdir /tmp/sepp_fashion_mnist_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("sepp", "fashion_mnist", variant)
