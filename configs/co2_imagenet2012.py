"""CO2 on ImageNet (MoCo v2 recipe + consistency, alpha 1.0, tau_con 0.04: unverified).

  python -m jaxcontrast.main --config configs/co2_imagenet2012.py --workdir /tmp/co2_imagenet2012
  python -m jaxcontrast.main --config configs/co2_imagenet2012.py:tiny --workdir /tmp/co2_imagenet2012_tiny  # smoke

Recipe and sources: jaxcontrast/config_lib.py and ../shared/docs/METHODS.md.
"""
from jaxcontrast import config_lib


def get_config(variant=None):
  return config_lib.method_config("co2", "imagenet2012", variant)
