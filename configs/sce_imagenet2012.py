"""SCE on ImageNet (symmetric, SyncBN, LARS, predictor, cosine EMA 0.99 -> 1).

  python -m jaxcontrast.main --config configs/sce_imagenet2012.py --workdir /tmp/sce_imagenet2012
  python -m jaxcontrast.main --config configs/sce_imagenet2012.py:tiny --workdir /tmp/sce_imagenet2012_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("sce", "imagenet2012", variant)
