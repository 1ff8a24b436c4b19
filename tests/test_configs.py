"""Config files: every file x variant loads, validates and is locked; variants combine; typos and
unknown variants fail clearly; loading works from any directory; the command lines a file shows
are accepted by the entry point."""
import ast
import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxcontrast import config_check, config_lib
from jaxcontrast.data import datasets, recipes
from jaxcontrast.models import resolve_model_config
from jaxcontrast.step import optim

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.name != "common.py")
# Variants of a file beyond the shared ones (common.VARIANTS), by method.
OWN_VARIANTS = {"sepp": ["queue_ids"]}
OWN_FILE_VARIANTS = {"sce_imagenet2012": ["multicrop"]}


def variants_of(path):
  own = OWN_VARIANTS.get(path.name.split("_")[0], []) + OWN_FILE_VARIANTS.get(path.stem, [])
  if path.stem.endswith("_cpu"):   # the main job's config (configs/moco_fashion_mnist_cpu.py)
    own = own + ["knn", "long"]
  shared = ["", "tiny"] + (["cpu"] if "fashion_mnist" in path.name else [])
  return shared + own + [f"tiny,{v}" for v in own]


CASES = [(p, v) for p in CONFIG_FILES for v in variants_of(p)]


def spec(path, variant=""):
  return f"configs/{path.name}" + (f":{variant}" if variant else "")


def test_every_method_has_configs():
  names = {p.name for p in CONFIG_FILES}
  for method in config_lib.METHODS:
    assert f"{method}_fashion_mnist.py" in names and f"{method}_imagenet2012.py" in names


@pytest.mark.parametrize("path,variant", CASES, ids=[f"{p.stem}:{v}" for p, v in CASES])
def test_config_loads_and_validates(path, variant):
  c = config_lib.load_config(spec(path, variant))
  assert c.is_locked
  assert path.stem in (f"{c.method}_{c.data.dataset}", f"{c.method}_{c.data.dataset}_cpu")
  config_lib.validate_config(c)
  resolve_model_config(c.model)
  optim.resolve_optim_config(c.optim)
  recipes.view_recipes(c.data)
  datasets.get_spec(c.data.dataset)
  assert c.data.num_support_views == c.objective.fnc.num_support_views
  assert c.checkpoint_every > 0 and c.keep_checkpoints > 0 and c.knn_every >= 0
  assert c.to_json()   # the run layer saves it as JSON
  if "tiny" in variant:
    assert (c.global_batch_size, c.queue.size, c.data.image_size, c.knn_every) == (16, 64, 16, 0)
    assert c.model.width == 0.125 and c.optim.warmup_steps <= 1
  if "multicrop" in variant:
    sizes = (12, 10, 8, 6) if "tiny" in variant else (192, 160, 128, 96)
    assert c.data.local_crop_sizes == sizes
    assert len(recipes.local_crop_scales(c.data)) == 4
  if "queue_ids" in variant:
    assert c.objective.loss == "multi_positive" and c.queue.store_ids
  if ("cpu" in variant or path.stem.endswith("_cpu")) and "tiny" not in variant:
    # The main job's budget (common.cpu): the same for every method.
    assert (c.model.stem, c.model.width, c.global_batch_size, c.optim.name) == (
        "cifar_s2", 0.25, 128, "adamw")
    assert c.total_steps is None and c.num_epochs == (12 if "long" in variant else 2.5)
  if path.stem.endswith("_cpu") and "tiny" not in variant:
    # The main job has no room for the kNN monitor; its `knn` and `long` variants (and the
    # shared `cpu` budget applied on top) have it after every epoch (60,000 / 128 = 468 steps).
    with_knn = any(v in variant for v in ("knn", "long", "cpu"))
    assert c.knn_every == (468 if with_knn else 0)


def test_base_config_has_run_layer_keys():
  c = config_lib.base_config()
  assert (c.checkpoint_every, c.keep_checkpoints, c.log_every, c.knn_every) == (1000, 2, 100, 0)
  assert (c.knn.k, c.knn.temperature, c.knn.num_train, c.knn.batch_size) == (200, 0.1, None, 256)


def test_recipe_values_come_from_the_files():
  sce = config_lib.load_config("configs/sce_imagenet2012.py")
  assert sce.objective.symmetric and sce.optim.name == "lars" and sce.optim.base_lr == 0.3
  assert (sce.model.proj_dim, sce.model.pred_hidden_dims, sce.model.pred_dim) == (256, (4096,), 256)
  assert (sce.optim.warmup_epochs, sce.optim.warmup_steps) == (10, 0)   # resolved at launch
  from jaxcontrast.step import optim  # pylint: disable=g-import-not-at-top
  assert optim.warmup_steps(sce.optim, steps_per_epoch=1_281_167 / 4096) == 10 * 1_281_167 // 4096
  assert config_lib.load_config("configs/sce_cifar10.py").optim.warmup_epochs == 5
  moco = config_lib.load_config("configs/moco_cifar10.py")
  assert (moco.queue.size, moco.ema.momentum, moco.objective.temperature) == (4096, 0.99, 0.1)


def test_variants_combine_in_any_order():
  a = config_lib.load_config("configs/sepp_fashion_mnist.py:tiny,queue_ids")
  b = config_lib.load_config("configs/sepp_fashion_mnist.py: queue_ids , tiny")
  assert a.to_dict() == b.to_dict()
  assert a.queue.store_ids and a.queue.size == 64


@pytest.mark.parametrize("bad,known", [("configs/sepp_fashion_mnist.py:tiny,big", "queue_ids"),
                                       ("configs/moco_fashion_mnist.py:queue_ids", "tiny")])
def test_unknown_variant_lists_known_ones(bad, known):
  with pytest.raises(ValueError, match=f"unknown config variant.*known variants.*{known}"):
    config_lib.load_config(bad)


def test_missing_file_and_unknown_key_fail_clearly():
  with pytest.raises(ValueError, match="not found"):
    config_lib.load_config("configs/nope.py:tiny")
  c = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  c.queue.size = 8                        # existing keys stay writable
  with pytest.raises(AttributeError, match='Did you mean "size"'):
    c.queue.sise = 5
  with c.unlocked():                      # the explicit way to add a key
    c.extra = 1


def _parse_flags(*args):
  """What `python -m jaxcontrast.main <args>` gets as its config (config_flags, in-process)."""
  argv = ["main"] + list(args)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_matches_load_config_and_overrides_placeholders():
  path = "configs/sce_cifar10.py:tiny"
  c = _parse_flags(f"--config={path}", "--config.queue.size=8", "--config.data.image_size=20",
                   "--config.knn.num_train=100")
  expected = config_lib.load_config(path)
  expected.queue.size, expected.data.image_size, expected.knn.num_train = 8, 20, 100
  assert c.is_locked and c.to_dict() == expected.to_dict()


def test_batch_size_override_moves_settings_given_in_epochs():
  c = _parse_flags("--config=configs/sce_cifar10.py", "--config.global_batch_size=256")
  assert c.optim.warmup_epochs == 5 and c.knn_every == 2 * 50_000 // 256
  c = _parse_flags("--config=configs/sce_cifar10.py", "--config.optim.warmup_epochs=2",
                   "--config.knn_every=9", "--config.global_batch_size=128")
  assert (c.optim.warmup_epochs, c.knn_every, c.checkpoint_every) == (2, 9, 5 * 50_000 // 128)
  c = _parse_flags("--config=configs/fnc_fashion_mnist.py",
                   "--config.objective.fnc.num_support_views=4")
  assert c.data.num_support_views == 4    # tied: the pipeline makes as many as the loss reads


@pytest.mark.parametrize("typo", ["--config.queue.sise=5", "--config.typo=1"])
def test_command_line_typo_fails(typo):
  with pytest.raises((AttributeError, KeyError, flags.Error), match="sise|typo"):
    _parse_flags("--config=configs/moco_fashion_mnist.py:tiny", typo)


def test_loads_from_another_directory(tmp_path, monkeypatch):
  expected = config_lib.load_config("configs/sce_fashion_mnist.py:tiny").to_dict()
  monkeypatch.chdir(tmp_path)
  absolute = str(REPO / "configs" / "sce_fashion_mnist.py") + ":tiny"
  assert _parse_flags(f"--config={absolute}").to_dict() == expected   # common.py found by path
  assert config_lib.load_config(absolute).to_dict() == expected
  assert config_lib.load_config("configs/sce_fashion_mnist.py:tiny").to_dict() == expected


def _docstring_commands(path) -> list[list[str]]:
  """The arguments of every `python -m jaxcontrast.main ...` command in the file's docstring."""
  doc = ast.get_docstring(ast.parse(path.read_text())).replace("\\\n", " ")
  entry = "python -m jaxcontrast.main"
  return [shlex.split(line[line.index(entry) + len(entry):], comments=True)
          for line in doc.splitlines() if entry in line]


# Run in a subprocess, as `python -m jaxcontrast.main ARGS` starts: the entry point's flags are
# defined at import, `--config` as `cli.run` defines it from sys.argv (config_flags registers the
# `--config.KEY` overrides of the file named there), then absl parses them. Each command gets a
# fresh import; nothing runs.
_PARSE_COMMANDS = r"""
import importlib, json, sys
from absl import flags
from jaxcontrast import cli, config_lib
before = set(flags.FLAGS)
results = []
for argv in json.loads(sys.stdin.read()):
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  sys.modules.pop("jaxcontrast.main", None)
  sys.argv = ["jaxcontrast.main"] + argv
  try:
    importlib.import_module("jaxcontrast.main")
    flags.FLAGS(cli.define_config_flag(config_file=True))
    config = flags.FLAGS["config"].value
    config_lib.validate_config(config)
    results.append({"config_file": flags.FLAGS["config"].config_filename,
                    "workdir": flags.FLAGS["workdir"].value})
  except Exception as e:  # pylint: disable=broad-except
    results.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def parsed_docstring_commands():
  """{config path: [parse result of each docstring command]}, from one subprocess."""
  commands = [(path, argv) for path in CONFIG_FILES for argv in _docstring_commands(path)]
  out = subprocess.run([sys.executable, "-c", _PARSE_COMMANDS],
                       input=json.dumps([argv for _, argv in commands]), cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=600, check=True)
  results = {path: [] for path in CONFIG_FILES}
  for (path, _), result in zip(commands, json.loads(out.stdout.splitlines()[-1])):
    results[path].append(result)
  return results


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_docstring_commands_are_accepted_by_the_entry_point(path, parsed_docstring_commands):
  """Every command line a config file shows parses as the entry point's flags, loads this file
  with its variant and overrides, and validates."""
  results = parsed_docstring_commands[path]
  assert results, f"{path.name}: its docstring shows no python -m jaxcontrast.main command"
  for result in results:
    assert "error" not in result, result
    assert (REPO / result["config_file"].split(":")[0]).resolve() == path
    assert result["workdir"]


@pytest.mark.parametrize("key,value,expected", [
    ("queue.mode", "bogus", "config queue.mode = 'bogus': expected one of"),
    ("queue.size", -1, "config queue.size = -1: expected an int >= 0"),
    ("ema.momentum", 1.5, "config ema.momentum = 1.5: expected a number in [0, 1]"),
    ("optim.name", "adam", "config optim.name = 'adam': expected one of"),
    ("model.arch", "resnet9", "config model.arch = 'resnet9': expected one of"),
    ("bn.mode", "batch", "config bn.mode = 'batch': expected one of"),
    ("objective.temperature", 0.0, "config objective.temperature = 0.0: expected a number > 0"),
    ("objective.loss", "simclr", "config objective.loss = 'simclr': expected one of"),
    ("global_batch_size", 0, "config global_batch_size = 0: expected an int >= 1"),
    ("method", "byol", "config method = 'byol': expected one of"),
    ("data.augment_on", "gpu", "config data.augment_on = 'gpu': expected one of"),
    ("data.streams", 3, "config data.streams = 3: expected None or an int >= 1 dividing"),
])
def test_every_section_fails_on_a_bad_value_with_one_error_style(key, value, expected):
  c = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  c.update_from_flattened_dict({key: value})
  with pytest.raises(config_check.ConfigError) as error:
    config_lib.validate_config(c)
  assert str(error.value).startswith(expected), str(error.value)


def test_combinations_are_checked_across_sections():
  c = config_lib.load_config("configs/sce_fashion_mnist.py:tiny")
  with c.unlocked():
    c.queue.size = 0            # in-batch negatives: MoCo's loss only
  with pytest.raises(config_check.ConfigError, match=r"config queue.size = 0: expected > 0"):
    config_lib.validate_config(c)


def test_a_bad_override_fails_before_the_run_touches_its_workdir(tmp_path):
  """Through the real entry point: the command-line value is checked with the whole config
  before any data, state or checkpoint exists."""
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "jaxcontrast.main", "--config=configs/moco_fashion_mnist.py:tiny",
       "--config.ema.momentum=1.5", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode != 0
  assert "config ema.momentum = 1.5: expected a number in [0, 1]" in out.stderr
  assert not workdir.exists()


def test_partial_sections_merge_through_configdict_typing():
  """Library calls may pass a partial dict: unknown keys and wrong types fail naming the key;
  missing keys take their defaults."""
  with pytest.raises(config_check.ConfigError, match=r"config optim: unknown key 'lr'"):
    optim.resolve_optim_config({"lr": 0.1})
  with pytest.raises(config_check.ConfigError, match=r"config optim.base_lr = 'fast'"):
    optim.resolve_optim_config({"base_lr": "fast"})
  with pytest.raises(config_check.ConfigError, match=r"config model.width = 'wide'"):
    resolve_model_config({"width": "wide"})
  full = dict(optim.default_optim_config().to_dict(), name="sgd", warmup_steps=2)
  steps = jnp.arange(12)
  schedules = [jax.vmap(optim.make_optimizer(c, global_batch_size=256, total_steps=10)[1])(steps)
               for c in ({"name": "sgd", "warmup_steps": 2}, full)]
  np.testing.assert_array_equal(*schedules)
