"""SePP (semantic positive pairs) on ImageNet (ILSVRC-2012), ResNet-50, MoCo v2 recipe.

  python -m jaxcontrast.main --config configs/sepp_imagenet2012.py --workdir /tmp/sepp_imagenet2012 --config.data.semantic_pairs=gs://BUCKET/imagenet_pairs.npz
  python -m jaxcontrast.main --config configs/sepp_imagenet2012.py:tiny --workdir /tmp/sepp_imagenet2012_tiny  # smoke

imagenet2012 must be prepared in the tfds data_dir (add --config.data.data_dir=...). Mine the
pairs first with a pretrained checkpoint (python -m jaxcontrast.semantic_pairs, see docs/evaluation.md).
Variant "queue_ids": multi-positive InfoNCE over the queue's stored source ids. Procedure:
docs/METHODS.md §6. Only the abstract is public: the mining, p_semantic 0.5 and the queue_ids
loss are our INTERPRETATION. The rest is MoCo v2's recipe (common.mocov2_imagenet). Reported:
+4.1 top-1 over MoCo v2 at 800 epochs.
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def queue_ids(c):
  """Multi-positive InfoNCE over the queue's stored source ids (interpretation)."""
  c.objective.loss = "multi_positive"
  c.queue.store_ids = True


def get_config(arg=None):
  c = common.base("sepp", "imagenet2012")
  common.mocov2_imagenet(c)   # R50, K 65,536, m 0.999, tau 0.2, batch 256, SGD 0.03, Shuffle BN
  c.objective.loss = "moco"   # SePP keeps the MoCo v2 loss; the pairs change the key view
  c.data.p_semantic = 0.5     # P(key view cut from a semantic partner) (interpretation)
  return common.finish(c, arg, queue_ids=queue_ids)
