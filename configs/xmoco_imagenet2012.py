"""XMoCo on ImageNet (ILSVRC-2012), ResNet-50: MoCo v2 + cross-similarity consistency +
negative uniformity.

  python -m jaxcontrast.main --config configs/xmoco_imagenet2012.py --workdir /tmp/xmoco_imagenet2012
  python -m jaxcontrast.main --config configs/xmoco_imagenet2012.py:tiny --workdir /tmp/xmoco_imagenet2012_tiny  # smoke

imagenet2012 must be prepared in the tfds data_dir (add --config.data.data_dir=...). Loss:
docs/METHODS.md §4. Only the abstract is public: both regularisers are our INTERPRETATION and
their weights and temperatures are UNVERIFIED. The rest is MoCo v2's recipe
(common.mocov2_imagenet).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("xmoco", "imagenet2012")
  common.mocov2_imagenet(c)   # R50, K 65,536, m 0.999, tau 0.2, batch 256, SGD 0.03, Shuffle BN
  c.objective.loss = "moco"
  # (a) cross-similarity consistency over the batch (interpretation).
  c.objective.xmoco_cross.update(weight=1.0, temperature=0.1, divergence="kl", pairs="query")
  # (b) uniform similarity over the queue's negatives across the batch (interpretation).
  c.objective.xmoco_uniformity.update(weight=0.1, temperature=0.2, per_sample=False)
  return common.finish(c, arg)
