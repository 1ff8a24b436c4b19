"""Method x dataset presets: the one place recipes from METHODS.md become configs.

`configs/<method>_<dataset>.py` files call `method_config`; their docstrings hold the command
line. Variant "tiny" shrinks any preset (tiny ResNet, 16x16 inputs, batch 16, K 64) for tests
and smoke runs.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from jaxcontrast import ema, objectives
from jaxcontrast.data.config import default_data_config
from jaxcontrast.models import default_model_config
from jaxcontrast.optim import default_optim_config

METHODS = ("moco", "co2", "xmoco", "sce", "fnc", "sepp")
SMALL_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10")


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (MoCo v2); see each `default_*_config` for the keys."""
  from jaxcontrast.train import default_bn_config, default_queue_config  # avoid an import cycle
  c = ml_collections.ConfigDict()
  c.method = "moco"
  c.seed = 0
  c.global_batch_size = 256
  c.num_epochs = 200
  c.total_steps = ml_collections.config_dict.placeholder(int)   # None: from num_epochs
  c.log_every = 100
  c.model = default_model_config()
  c.optim = default_optim_config()
  c.data = default_data_config()
  c.objective = objectives.default_objective_config()
  c.ema = ema.default_ema_config()
  c.queue = default_queue_config()
  c.bn = default_bn_config()
  return c


def _small_dataset(c) -> None:
  """MoCo's CIFAR-10 demo: R18 with the CIFAR stem, K 4096, m 0.99, tau 0.1, batch 512, SGD
  0.06 wd 5e-4, 8-group split BN, projector 512-512-128."""
  c.model.update(arch="resnet18", stem="cifar", proj_hidden_dims=(512,), proj_dim=128)
  c.queue.size = 4096
  c.ema.momentum = 0.99
  c.objective.temperature = 0.1
  c.global_batch_size = 512
  c.optim.update(name="sgd", base_lr=0.06, lr_scaling="none", weight_decay=5e-4)
  c.bn.update(mode="ghost", groups=8)
  c.data.recipe = "mocov2_cifar"


def _imagenet(c) -> None:
  """MoCo v2 ImageNet: R50, K 65,536, m 0.999, tau 0.2, batch 256, SGD 0.03 wd 1e-4, cosine,
  projector 2048-2048-128 without BN, Shuffle BN across devices."""
  c.model.update(arch="resnet50", stem="imagenet", proj_hidden_dims=(2048,), proj_dim=128)
  c.queue.size = 65536
  c.ema.momentum = 0.999
  c.objective.temperature = 0.2
  c.global_batch_size = 256
  c.optim.update(name="sgd", base_lr=0.03, lr_scaling="linear", weight_decay=1e-4)
  c.bn.mode = "shuffle"
  c.data.recipe = "mocov2"


def _sce(c, small: bool) -> None:
  c.objective.loss = "sce"
  c.ema.update_at = "after_step"
  if small:  # SCE CIFAR-10: weak view to the target, 8-group BN in the target only.
    c.objective.update(temperature=0.1)
    c.objective.sce.update(target_temperature=0.05, coeff=0.5)
    c.optim.update(warmup_steps=0)   # 5 warm-up epochs: set from the dataset size at launch
    c.bn.update(mode="ghost", groups=8, target_only=True)
    c.data.recipe = "sce_cifar"
  else:      # SCE ImageNet: symmetric, SyncBN, LARS 0.3 x B/256, wd 1e-6, cosine m 0.99 -> 1.
    c.objective.update(temperature=0.1, symmetric=True)
    c.objective.sce.update(target_temperature=0.07, coeff=0.5)
    c.ema.update(momentum=0.99, schedule="cosine")
    c.model.update(proj_hidden_dims=(2048,), proj_dim=256, proj_bn=True, proj_last_bn=True,
                   pred_hidden_dims=(4096,), pred_dim=256)
    c.optim.update(name="lars", base_lr=0.3, lr_scaling="linear", weight_decay=1e-6,
                   exclude_1d_from_wd=True)
    c.bn.mode = "sync"
    c.data.recipe = "sce_imagenet"
    c.global_batch_size = 4096


def method_config(method: str, dataset: str = "fashion_mnist",
                  variant: Optional[str] = None) -> ml_collections.ConfigDict:
  """The preset for `method` on `dataset`; `variant` "tiny" for tests, "queue_ids" for SePP
  with the multi-positive queue loss."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  c = base_config()
  c.method = method
  c.data.dataset = dataset
  small = dataset in SMALL_DATASETS
  (_small_dataset if small else _imagenet)(c)
  if method == "co2":   # alpha, tau_con unverified (paper: alpha 10 on MoCo v1; smaller on v2).
    c.objective.co2.update(weight=1.0, temperature=0.04)
  elif method == "xmoco":   # interpretation; weights unverified.
    c.objective.xmoco_cross.update(weight=1.0, temperature=0.1)
    c.objective.xmoco_uniformity.update(weight=0.1, temperature=0.2)
  elif method == "sce":
    _sce(c, small)
  elif method == "fnc":   # official: threshold 0.7, top-k 10, 8 support views, tau 0.1.
    c.objective.update(loss="fnc", temperature=0.1)
    c.objective.fnc.update(threshold=0.7, top_k=10, mode="attraction",
                           num_support_views=2 if small else 8)
    c.data.num_support_views = c.objective.fnc.num_support_views
    c.ema.update_at = "after_step"
  elif method == "sepp":  # key views from semantic partners; set data.semantic_pairs.
    c.data.p_semantic = 0.5
    if variant == "queue_ids":
      c.objective.loss = "multi_positive"
      c.queue.store_ids = True
  if variant == "tiny":
    _tiny(c)
  elif variant not in (None, "", "queue_ids"):
    raise ValueError(f"unknown config variant {variant!r}; known: tiny, queue_ids")
  return c


def _tiny(c) -> None:
  """Shrink any preset for tests: ResNet-18 at width 1/8, 16x16 inputs, batch 16, K 64."""
  c.model.update(arch="resnet18", stem="cifar", width=0.125, proj_hidden_dims=(32,), proj_dim=16)
  if c.model.pred_dim:
    c.model.update(pred_hidden_dims=(32,), pred_dim=16)
  c.data.image_size = 16
  c.global_batch_size = 16
  c.queue.size = 64
  c.total_steps = 4
  c.log_every = 1
  if c.bn.mode == "ghost":
    c.bn.groups = 4
  if c.objective.fnc.num_support_views:
    c.objective.fnc.num_support_views = c.data.num_support_views = 2
  c.data.shuffle_buffer = 64
