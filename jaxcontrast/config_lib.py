"""Config loading: every section's defaults, `--config` files, variants.

The recipes themselves live in `configs/` (one file per method x dataset, shared dataset-scale
parts in `configs/common.py`), so a run's settings are read in its config file. This module only
holds what those files and the entry points share:

  base_config()          every section with its defaults (MoCo v2 ImageNet, Fashion-MNIST data)
  load_config(spec)      "configs/sce_cifar10.py:tiny,queue_ids" -> the locked ConfigDict that
                         `python -m jaxcontrast.main --config <spec>` gets
  load_sibling(f, name)  import configs/<name>.py next to config file `f`, whatever the cwd
  apply_variants(c, arg, variants)  apply the comma-separated variants named in `arg`

Configs are locked after loading (as ml_collections' `config_flags` does): existing keys can be
changed, but assigning a key that does not exist (a typo such as `c.queue.sise = 5`, or
`--config.queue.sise=5`) raises instead of silently adding a key nobody reads. Use
`with config.unlocked():` where new keys are really wanted. The command line itself
(`--config.KEY=VALUE`, `--help`, errors) is `jaxcontrast/cli.py`.
"""
from __future__ import annotations

import importlib.util
import pathlib
import types
from typing import Callable, Mapping, Optional

import ml_collections
from ml_collections import config_dict

from jaxcontrast.config_check import fail, is_int
from jaxcontrast.errors import ConfigError
from jaxcontrast.data.config import AUGMENT_ON, default_data_config
from jaxcontrast.models import default_model_config
from jaxcontrast.models.config import validate_model_config
from jaxcontrast.step import ema, objectives, optim, train_step
from jaxcontrast.step import queue as queue_lib

METHODS = ("moco", "co2", "xmoco", "sce", "fnc", "sepp")
# The repository root (parent of the package): `load_config` falls back to it for relative
# config paths, so "configs/..." works from any directory in a source checkout.
_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def default_knn_config() -> ml_collections.ConfigDict:
  """The kNN monitor (MoCo's CIFAR demo): cosine similarity, k-nearest weighted vote."""
  c = ml_collections.ConfigDict()
  c.k = 200                                       # neighbours voting
  c.temperature = 0.1                             # vote weight exp(cos / temperature)
  c.num_train = config_dict.placeholder(int)      # memory bank size; None = whole train split
  c.batch_size = 256                              # images per feature-extraction batch
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (MoCo v2); see each `default_*_config` for the keys."""
  c = ml_collections.ConfigDict()
  c.method = "moco"                 # one of METHODS; names the run, the objective decides the loss
  c.seed = 0
  c.global_batch_size = 256
  c.num_epochs = 200.0               # float: fractions of an epoch are allowed (e.g. 2.5)
  c.total_steps = config_dict.placeholder(int)   # None: num_epochs x train examples / batch
  # Run layer.
  c.log_every = 100                 # steps between metric lines (metrics.jsonl, TensorBoard)
  c.checkpoint_every = 1000         # steps between checkpoints (and always at the end)
  c.keep_checkpoints = 2            # Orbax max_to_keep
  c.knn_every = 0                   # steps between kNN evaluations; 0 = off
  c.knn = default_knn_config()
  # PyTorch ResNet weights (.safetensors, or .pth / .pth.tar with torch installed; torchvision or
  # MoCo v1/v2 state dicts) to start both backbones from; None = random init. Fresh runs only:
  # a resumed run continues from its checkpoint.
  c.init_from = config_dict.placeholder(str)
  # Sections, each with its own defaults and validation.
  c.model = default_model_config()
  c.optim = optim.default_optim_config()
  c.data = default_data_config()
  c.objective = objectives.default_objective_config()
  c.ema = ema.default_ema_config()
  c.queue = queue_lib.default_queue_config()
  c.bn = train_step.default_bn_config()
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section of a whole config, once, when it is loaded (`load_config`; the entry
  points after their command-line overrides: `run.pretrain.train_and_evaluate`), so a bad value
  fails before any data, state or checkpoint exists. Types were checked by ConfigDict on
  assignment; this checks choices, ranges and combinations. Raises `ConfigError` ("config
  section.key = value: expected ...") on the first problem. The data section is checked where
  its dataset is resolved (`data.pipeline`, also before any state exists)."""
  if config.method not in METHODS:
    fail("", "method", config.method, f"one of {METHODS}")
  for key in ("global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    if not is_int(config[key]) or config[key] < 1:
      fail("", key, config[key], "an int >= 1")
  if not is_int(config.knn_every) or config.knn_every < 0:
    fail("", "knn_every", config.knn_every, "an int >= 0 (0: no kNN monitor)")
  if config.total_steps is None and not config.num_epochs > 0:
    fail("", "num_epochs", config.num_epochs, "a number > 0 (or set total_steps)")
  if config.total_steps is not None and (not is_int(config.total_steps) or
                                         config.total_steps < 1):
    fail("", "total_steps", config.total_steps, "None or an int >= 1")
  streams = config.data.get("streams")
  if streams is not None and (not is_int(streams) or streams < 1 or
                              config.global_batch_size % streams):
    fail("data", "streams", streams,
         f"None or an int >= 1 dividing global_batch_size = {config.global_batch_size}")
  if config.data.get("augment_on") not in AUGMENT_ON:
    fail("data", "augment_on", config.data.get("augment_on"), f"one of {AUGMENT_ON}")
  validate_model_config(config.model)
  optim.validate(config.optim)
  ema.validate(config.ema)
  queue_lib.validate(config.queue)
  train_step.validate_bn(config.bn)
  objectives.validate(config.objective, queue_size=config.queue.size,
                      store_ids=config.queue.store_ids)


def _load_module(path: pathlib.Path, name: str) -> types.ModuleType:
  """Executes the Python file `path` as a fresh module (not registered in sys.modules)."""
  spec = importlib.util.spec_from_file_location(name, str(path))
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load {path} as a Python module")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling(config_file: str, name: str) -> types.ModuleType:
  """The module `<name>.py` in the folder of `config_file` (pass `__file__`).

  `config_flags` loads a config file by path, outside any package, so `import common` would
  depend on the current directory; this resolves the sibling from the file itself instead.
  """
  path = pathlib.Path(config_file).resolve().with_name(f"{name}.py")
  if not path.is_file():
    raise ValueError(f"config helper {name!r} not found: {path} does not exist")
  return _load_module(path, f"jaxcontrast_configs_{name}")


def split_variants(arg: Optional[str]) -> list[str]:
  """"tiny, queue_ids" -> ["tiny", "queue_ids"]; None or "" -> []."""
  if not arg:
    return []
  return [v.strip() for v in str(arg).split(",") if v.strip()]


def apply_variants(c: ml_collections.ConfigDict, arg: Optional[str],
                   variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]]
                   ) -> ml_collections.ConfigDict:
  """Applies the variants named in `arg` ("tiny,queue_ids") to `c` in place; returns `c`.

  Variants run in the order of `variants` (not of `arg`), so "tiny,queue_ids" and
  "queue_ids,tiny" give the same config. An unknown name is a ConfigError listing the known ones.
  """
  names = split_variants(arg)
  unknown = [n for n in names if n not in variants]
  if unknown:
    raise ConfigError(f"unknown config variant(s) {unknown} in {arg!r}; known variants: "
                     f"{sorted(variants)} (combine them with commas, e.g. 'tiny,queue_ids')")
  for name, fn in variants.items():
    if name in names:
      fn(c)
  return c


def _resolve_config_path(path: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if p.is_file():
    return p
  if not p.is_absolute() and (_REPO_ROOT / p).is_file():
    return _REPO_ROOT / p
  raise ConfigError(f"config file {path!r} not found (relative to {pathlib.Path.cwd()} or "
                   f"{_REPO_ROOT})")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The locked config that `python -m jaxcontrast.main --config <spec>` gets.

  spec: "path/to/config.py" or "path/to/config.py:<arg>"; everything after the first colon is
  passed to the file's `get_config` (as ml_collections' `config_flags` does), e.g. "tiny" or
  "tiny,queue_ids". A relative path is looked up in the current directory, then in the
  repository root.
  """
  path, *arg = str(spec).split(":", 1)
  module = _load_module(_resolve_config_path(path), "jaxcontrast_config")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config()")
  config = module.get_config(*arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}:get_config() returned {type(config).__name__}, not a ConfigDict")
  config.lock()
  validate_config(config)
  return config
