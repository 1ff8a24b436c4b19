"""MoCo v2 on CIFAR-10 with MoCo's CIFAR-10 demo recipe.

  python -m jaxcontrast.main --config configs/moco_cifar10.py --workdir /tmp/moco_cifar10
  python -m jaxcontrast.main --config configs/moco_cifar10.py:tiny --workdir /tmp/moco_cifar10_tiny  # smoke

CIFAR-10 must be prepared in the tfds data_dir (add --config.data.data_dir=DIR). Loss and recipe:
docs/METHODS.md §1. The hyper-parameters are the demo's (see common.moco_cifar_demo); the
512-512-128 projector is ours. Reported with R18, 200 epochs: kNN 82.6 (asymmetric), 85.3 with
--config.objective.symmetric=True.
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("moco", "cifar10")
  common.moco_cifar_demo(c)   # R18, K 4096, m 0.99, tau 0.1, batch 512, SGD 0.06, 8-group BN
  c.objective.loss = "moco"   # InfoNCE over [positive, queue] (METHODS §1)
  c.objective.symmetric = False
  return common.finish(c, arg)
