"""FNC (false-negative attraction with support views) on ImageNet (ILSVRC-2012), ResNet-50.

  python -m jaxcontrast.main --config configs/fnc_imagenet2012.py --workdir /tmp/fnc_imagenet2012
  python -m jaxcontrast.main --config configs/fnc_imagenet2012.py:tiny --workdir /tmp/fnc_imagenet2012_tiny  # smoke

imagenet2012 must be prepared in the tfds data_dir (add --config.data.data_dir=...). Loss:
docs/METHODS.md §5, MoCo-queue form. Threshold, top-k, support views, tau, EMA 0.999 and
memory 65,536 are the official code's; the optimizer, batch and augmentations are MoCo v2's
(common.mocov2_imagenet), not FNC's own (its code builds on SimCLR: --config.data.recipe=simclr
gives those augmentations). Reported (official R50): linear 74.4.
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("fnc", "imagenet2012")
  common.mocov2_imagenet(c)   # R50, K 65,536, m 0.999, batch 256, SGD 0.03, Shuffle BN
  c.objective.loss = "fnc"
  c.objective.temperature = 0.1            # tau (official)
  c.objective.fnc.threshold = 0.7          # cosine threshold of detection (official)
  c.objective.fnc.top_k = 10               # candidates per anchor (official)
  c.objective.fnc.mode = "attraction"      # the official release implements only attraction
  c.objective.fnc.num_support_views = 8    # S (official)
  c.data.num_support_views = c.objective.fnc.get_ref("num_support_views")   # always equal
  # Official code: the EMA update follows the optimizer step, and the target network is not a
  # copy of the online one at start (METHODS §0).
  c.ema.update(update_at="after_step", init="independent")
  return common.finish(c, arg)
