"""MoCo v2 on ImageNet (ILSVRC-2012), ResNet-50, 200 epochs.

  python -m jaxcontrast.main --config configs/moco_imagenet2012.py --workdir /tmp/moco_imagenet2012
  python -m jaxcontrast.main --config configs/moco_imagenet2012.py:tiny --workdir /tmp/moco_imagenet2012_tiny  # smoke

imagenet2012 must be prepared in the tfds data_dir (add --config.data.data_dir=gs://.../tfds).
Loss and recipe: docs/METHODS.md §1, from the official code (see common.mocov2_imagenet).
Reported: linear top-1 67.5 (200 epochs), 71.1 (800 epochs: --config.num_epochs=800).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("moco", "imagenet2012")
  common.mocov2_imagenet(c)   # R50, K 65,536, m 0.999, tau 0.2, batch 256, SGD 0.03, Shuffle BN
  c.objective.loss = "moco"   # InfoNCE over [positive, queue] (METHODS §1)
  c.objective.symmetric = False
  return common.finish(c, arg)
