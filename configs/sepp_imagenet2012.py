"""SePP on ImageNet (MoCo v2 recipe, key views from semantic partners). INTERPRETATION; set config.data.semantic_pairs.

  python -m jaxcontrast.main --config configs/sepp_imagenet2012.py --workdir /tmp/sepp_imagenet2012
  python -m jaxcontrast.main --config configs/sepp_imagenet2012.py:tiny --workdir /tmp/sepp_imagenet2012_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("sepp", "imagenet2012", variant)
