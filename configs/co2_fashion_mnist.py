"""CO2 (MoCo v2 + consistency regulariser) on Fashion-MNIST.

  python -m jaxcontrast.main --config configs/co2_fashion_mnist.py --workdir /tmp/co2_fashion_mnist
  python -m jaxcontrast.main --config configs/co2_fashion_mnist.py:tiny --workdir /tmp/co2_fashion_mnist_tiny  # smoke

Loss: docs/METHODS.md §3. No official code: alpha and tau_con are UNVERIFIED (the paper uses
alpha 10 with MoCo v1 and "a smaller alpha" with v2; 1.0 is our guess). The rest is MoCo's
CIFAR-10 demo recipe (common.moco_cifar_demo).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("co2", "fashion_mnist")
  common.moco_cifar_demo(c)   # R18, K 4096, m 0.99, tau 0.1, batch 512, SGD 0.06, 8-group BN
  c.objective.loss = "moco"
  c.objective.co2.weight = 1.0          # alpha (unverified)
  c.objective.co2.temperature = 0.04    # tau_con (unverified; the paper's MoCo v1 value)
  c.objective.co2.include_positive = False   # K-way distributions (paper); True: lightly's
  return common.finish(c, arg)
