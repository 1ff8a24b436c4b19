"""MoCo v2 on ImageNet: R50, K 65,536, m 0.999, tau 0.2, batch 256, Shuffle BN (set config.data.data_dir).

  python -m jaxcontrast.main --config configs/moco_imagenet2012.py --workdir /tmp/moco_imagenet2012
  python -m jaxcontrast.main --config configs/moco_imagenet2012.py:tiny --workdir /tmp/moco_imagenet2012_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("moco", "imagenet2012", variant)
