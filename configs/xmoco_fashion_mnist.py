"""XMoCo on Fashion-MNIST: MoCo v2 + cross-similarity consistency + negative uniformity.

  python -m jaxcontrast.main --config configs/xmoco_fashion_mnist.py --workdir /tmp/xmoco_fashion_mnist
  python -m jaxcontrast.main --config configs/xmoco_fashion_mnist.py:tiny --workdir /tmp/xmoco_fashion_mnist_tiny  # smoke

Loss: docs/METHODS.md §4. Only the abstract is public: both regularisers are our INTERPRETATION
and their weights and temperatures are UNVERIFIED. The rest is MoCo's CIFAR-10 demo recipe
(common.moco_cifar_demo).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("xmoco", "fashion_mnist")
  common.moco_cifar_demo(c)   # R18, K 4096, m 0.99, tau 0.1, batch 512, SGD 0.06, 8-group BN
  c.objective.loss = "moco"
  # (a) cross-similarity consistency over the batch (interpretation).
  c.objective.xmoco_cross.update(weight=1.0, temperature=0.1, divergence="kl", pairs="query")
  # (b) uniform similarity over the queue's negatives across the batch (interpretation).
  c.objective.xmoco_uniformity.update(weight=0.1, temperature=0.2, per_sample=False)
  return common.finish(c, arg)
