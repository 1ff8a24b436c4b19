"""FNC on ImageNet (threshold 0.7, top-k 10, 8 support views, tau 0.1).

  python -m jaxcontrast.main --config configs/fnc_imagenet2012.py --workdir /tmp/fnc_imagenet2012
  python -m jaxcontrast.main --config configs/fnc_imagenet2012.py:tiny --workdir /tmp/fnc_imagenet2012_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("fnc", "imagenet2012", variant)
