"""XMoCo on ImageNet. INTERPRETATION of the abstract; weights unverified.

  python -m jaxcontrast.main --config configs/xmoco_imagenet2012.py --workdir /tmp/xmoco_imagenet2012
  python -m jaxcontrast.main --config configs/xmoco_imagenet2012.py:tiny --workdir /tmp/xmoco_imagenet2012_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("xmoco", "imagenet2012", variant)
