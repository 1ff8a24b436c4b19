"""CO2 (MoCo v2 + consistency regulariser) on ImageNet (ILSVRC-2012), ResNet-50.

  python -m jaxcontrast.main --config configs/co2_imagenet2012.py --workdir /tmp/co2_imagenet2012
  python -m jaxcontrast.main --config configs/co2_imagenet2012.py:tiny --workdir /tmp/co2_imagenet2012_tiny  # smoke

imagenet2012 must be prepared in the tfds data_dir (add --config.data.data_dir=...). Loss:
docs/METHODS.md §3. No official code: alpha and tau_con are UNVERIFIED (paper: alpha 10 on
MoCo v1, smaller on v2). The rest is MoCo v2's recipe (common.mocov2_imagenet). Reported: +2.9
top-1 over MoCo v1 (60.6 -> 63.5, 200 epochs).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None):
  c = common.base("co2", "imagenet2012")
  common.mocov2_imagenet(c)   # R50, K 65,536, m 0.999, tau 0.2, batch 256, SGD 0.03, Shuffle BN
  c.objective.loss = "moco"
  c.objective.co2.weight = 1.0          # alpha (unverified)
  c.objective.co2.temperature = 0.04    # tau_con (unverified; the paper's MoCo v1 value)
  c.objective.co2.include_positive = False   # K-way distributions (paper); True: lightly's
  return common.finish(c, arg)
