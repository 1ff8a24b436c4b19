"""SePP (semantic positive pairs) on Fashion-MNIST: key views from mined semantic partners.

  python -m jaxcontrast.semantic_pairs --config.dataset=fashion_mnist_debian --config.embedding=pixels \
      --config.threshold=0.9 --config.top_k=10 --config.out=/tmp/fmnist_pairs.npz
  python -m jaxcontrast.main --config configs/sepp_fashion_mnist.py --workdir /tmp/sepp_fashion_mnist --config.data.semantic_pairs=/tmp/fmnist_pairs.npz
  python -m jaxcontrast.main --config configs/sepp_fashion_mnist.py:tiny --workdir /tmp/sepp_fashion_mnist_tiny  # smoke

Variant "queue_ids" (`configs/sepp_fashion_mnist.py:queue_ids`, or `:tiny,queue_ids`): the
queue keeps each key's source image id and entries of the anchor's semantic partners count as
positives (multi-positive InfoNCE). Procedure: docs/METHODS.md §6. Only the abstract is public:
the mining, p_semantic 0.5 and the queue_ids loss are our INTERPRETATION. Without
data.semantic_pairs the run is plain MoCo v2. The rest is MoCo's CIFAR-10 demo recipe
(common.moco_cifar_demo).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def queue_ids(c):
  """Multi-positive InfoNCE over the queue's stored source ids (interpretation)."""
  c.objective.loss = "multi_positive"
  c.queue.store_ids = True


def get_config(arg=None):
  c = common.base("sepp", "fashion_mnist")
  common.moco_cifar_demo(c)   # R18, K 4096, m 0.99, tau 0.1, batch 512, SGD 0.06, 8-group BN
  c.objective.loss = "moco"   # SePP keeps the MoCo v2 loss; the pairs change the key view
  c.data.p_semantic = 0.5     # P(key view cut from a semantic partner) (interpretation)
  # c.data.semantic_pairs: the .npz written by jaxcontrast.semantic_pairs (None = off).
  return common.finish(c, arg, queue_ids=queue_ids)
