"""The command-line convention, through the real entry points (`python -m ...` subprocesses):
`--help` lists the config keys; a bad key, a bad value, a dataset not prepared and a workdir
without a checkpoint each end in one line on stderr and exit status 2, never a traceback; and a
tiny pretraining run and a probe of it print none of the libraries' known log noise.

Every command starts at once in the module fixture (they are mostly interpreter start-up and
imports), except the probe, which starts once the pretraining has ended. The run without data
fails before it builds its model or opens its checkpoints. The pretraining has the train step
of test_pretrain_loop.py's runs (the same settings where they shape the program), compiled once
in the suite.
"""
import os
import re
import subprocess
import sys

import pytest

from test_data_helpers import prepared_fashion_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/moco_fashion_mnist.py:tiny"
# The settings of test_pretrain_loop.py's runs that shape the train step's program.
SHARED_PROGRAM = ("--config.total_steps=8", "--config.queue.store_ids=True")
# Lines the libraries print when nothing silences them (TensorFlow's C++ and Python loggers,
# JAX's backend probing, Orbax's read-only CheckpointManager notices, tfds' missing-info
# warning for a dataset not prepared, pip).
NOISE = re.compile(
    r"Unable to initialize backend|is deprecated and will be removed|Instructions for updating|"
    r"oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|read only|read_only=True|"
    r"cpu_feature_guard|This TensorFlow binary is optimized|rebuild TensorFlow with|"
    r"absl::InitializeLog|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"Successfully installed|Obtaining file://|\[notice\]|has no dataset_info\.json")


def _environment():
  """The suite's environment minus what would hide the noise by itself: the entry points must
  do the silencing. JAX may probe its backends as on a user's machine (no accelerator here)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  for name in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "JAXCONTRAST_VERBOSE"):
    env.pop(name, None)
  return env


def _cmd(module, *args):
  return [sys.executable, "-m", module, *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: CompletedProcess-like (returncode, stdout, stderr)} of every command."""
  data_dir = prepared_fashion_dir()
  tmp = tmp_path_factory.mktemp("cli")
  empty = tmp / "empty"
  empty.mkdir()
  run_dir = tmp / "run"
  one_shot = {
      "main_help": _cmd("jaxcontrast.main", "--help"),
      "main_bad_key": _cmd("jaxcontrast.main", TINY, "--config.queue.sise=5",
                           f"--workdir={tmp / 'bad_key'}"),
      "main_bad_type": _cmd("jaxcontrast.main", TINY, "--config.queue.size=many",
                            f"--workdir={tmp / 'bad_type'}"),
      "probe_no_checkpoint": _cmd("jaxcontrast.eval.linear_probe", f"--workdir={empty}"),
      "probe_bad_value": _cmd("jaxcontrast.eval.linear_probe", f"--workdir={empty}",
                              "--config.encoder=target,nope"),
      "pairs_help": _cmd("jaxcontrast.semantic_pairs", "--help"),
      "main_no_data": _cmd("jaxcontrast.main", TINY, "--config.data.dataset=tfds:cifar10",
                           f"--config.data.data_dir={empty}", f"--workdir={tmp / 'no_data'}"),
  }
  # The tiny config through a file that counts its executions.
  counting = tmp / "counting.py"
  counting.write_text(
      "from jaxcontrast import config_lib\n"
      "def get_config():\n"
      f"  with open({str(tmp / 'executions')!r}, 'a') as f:\n"
      "    f.write('x')\n"
      f"  return config_lib.load_config({os.path.join(REPO, 'configs', 'moco_fashion_mnist.py')!r}"
      " + ':tiny')\n")
  pretrain = _cmd("jaxcontrast.main", f"--config={counting}", f"--workdir={run_dir}",
                  f"--config.data.data_dir={data_dir}", *SHARED_PROGRAM,
                  "--config.data.train_split=train[:32]", "--config.log_every=1",
                  "--config.data.threadpool_size=0")
  probe = _cmd("jaxcontrast.eval.linear_probe", f"--workdir={run_dir}",
               "--config.encoder=target,pixels", "--config.train_split=train[:64]",
               "--config.test_split=test[:64]", "--config.batch_size=64",
               "--config.full_batch.max_iter=10")
  env = _environment()
  popen = lambda cmd, **extra: subprocess.Popen(
      cmd, cwd=REPO, env=dict(env, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  started = {"pretrain": popen(pretrain)}
  started.update({name: popen(cmd) for name, cmd in one_shot.items()})
  started["probe_no_checkpoint_verbose"] = popen(one_shot["probe_no_checkpoint"],
                                                 JAXCONTRAST_VERBOSE="1")
  results = {}
  try:
    for name, proc in started.items():
      out, err = proc.communicate(timeout=900)
      results[name] = (proc.returncode, out, err)
    after = {"probe": popen(probe)}
    started.update(after)
    for name, proc in after.items():
      out, err = proc.communicate(timeout=900)
      results[name] = (proc.returncode, out, err)
  finally:
    for proc in started.values():
      if proc.poll() is None:
        proc.kill()
  results["run_dir"] = run_dir
  results["tmp"] = tmp
  return results


def _one_line_error(result):
  code, _, err = result
  lines = err.strip().splitlines()
  assert code == 2, err[-3000:]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


def _flat_keys(d, prefix=""):
  for key, value in d.items():
    if isinstance(value, dict):
      yield from _flat_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_help_lists_every_config_key(runs):
  from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
  from jaxcontrast import semantic_pairs  # pylint: disable=g-import-not-at-top
  for name, config in (("main_help", config_lib.base_config()),
                       ("pairs_help", semantic_pairs.default_mining_config())):
    code, out, err = runs[name]
    assert code == 0, err[-3000:]
    listed = set(re.findall(r"^  (\S+) = ", out, re.M))
    assert listed == set(_flat_keys(config.to_dict())), name


def test_bad_key_and_value_are_one_line_naming_them(runs):
  line = _one_line_error(runs["main_bad_key"])
  assert "queue.sise" in line and "'5'" in line and "size" in line   # the key that exists
  line = _one_line_error(runs["main_bad_type"])
  assert "queue.size" in line and "many" in line
  line = _one_line_error(runs["probe_bad_value"])
  assert "encoder" in line and "nope" in line and "pixels" in line    # the choices
  # Nothing was started: the settings are checked before the run touches its workdir.
  assert not (runs["tmp"] / "bad_key").exists() and not (runs["tmp"] / "bad_type").exists()


def test_missing_dataset_and_checkpoint_are_one_line(runs):
  line = _one_line_error(runs["main_no_data"])
  assert "cifar10" in line and "not prepared" in line
  # Checked before the model is built (it compiles for a while) and the checkpoints are opened.
  assert not (runs["tmp"] / "no_data" / "checkpoints").exists()
  line = _one_line_error(runs["probe_no_checkpoint"])
  assert "No checkpoint" in line and str(runs["tmp"] / "empty") in line


def test_verbose_brings_the_libraries_logs_back(runs):
  code, _, err = runs["probe_no_checkpoint_verbose"]
  assert code == 2 and "Traceback" not in err
  assert NOISE.search(err), err[-3000:]     # Orbax's read-only notice, hidden by default


def test_the_config_file_is_executed_once(runs):
  assert runs["pretrain"][0] == 0, runs["pretrain"][2][-3000:]
  assert (runs["tmp"] / "executions").read_text() == "x"


def test_tiny_run_and_probe_print_no_library_noise(runs):
  for name in ("pretrain", "probe"):
    code, out, err = runs[name]
    assert code == 0, err[-3000:]
    noise = [line for line in (out + err).splitlines() if NOISE.search(line)]
    assert not noise, f"{name}:\n" + "\n".join(noise)
  assert (runs["run_dir"] / "linear_probe.json").exists()
  assert (runs["run_dir"] / "linear_probe_pixels.json").exists()
  # The results are printed: one summary line per probed encoder.
  assert len(re.findall(r"^linear probe .* top1 ", runs["probe"][1], re.M)) == 2


@pytest.mark.parametrize("argv,message", [
    (["--config.queue.sise=5"], "config queue.sise = '5': no such key (did you mean 'size'?)"),
    (["--config.typo", "1"], "config typo = '1': no such key; the config has keys bn, "),
    (["--config.queue.size.x=1"], "config queue.size.x = '1': queue.size is a value"),
    (["--config.queue.size=8", "--noconfig.queue.store_ids"], None)])
def test_override_keys_are_checked_against_the_loaded_config(argv, message):
  """In process, on the config the command line loaded once (no second execution)."""
  from jaxcontrast import cli, config_lib  # pylint: disable=g-import-not-at-top
  from jaxcontrast.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  argv = ["main", TINY, *argv, "--workdir=/tmp/x"]
  if message is None:
    cli.check_override_keys(config, argv)
  else:
    with pytest.raises(ConfigError) as error:
      cli.check_override_keys(config, argv)
    assert str(error.value).startswith(message), str(error.value)
