"""The command-line convention of every entry point (`main`, `eval.linear_probe`, `semantic_pairs`,
`export`, `bench`): absl `app.run`, settings as one locked ml_collections config overridden with
`--config.KEY=VALUE`, user errors as one line, quiet output.

    if __name__ == "__main__":
      cli.run(main, config_file=True)                  # --config path.py[:variants] (required)
      cli.run(main, config=default_probe_config)       # a built-in config, no file

* The config is loaded once: a config file through `config_lib.load_config` (path looked up in
  the current directory, then the repository root; variants after the colon; validated), then
  config_flags applies the overrides. A key that does not exist, a value of the wrong type, a
  missing required flag or a positional argument is one line on stderr and exit status 2.
* `--help` prints the usage, the flags, and every config key with its value (of the config that
  `--config` names, or the defaults).
* In main, a `jaxcontrast.errors.UserError` (`ConfigError`, `DataNotFoundError`,
  `CheckpointNotFoundError`) and a flag validation error are one line and exit status 2; any
  other exception is a bug and keeps its traceback.
* Quiet by default: the root log level is WARNING (absl's `--verbosity=-1`) with the
  `jaxcontrast` logger at INFO, the `tensorflow` logger at ERROR (deprecation notices of the
  libraries tf.data calls), Orbax's read-only notices dropped, and `quiet_environment()` (which
  main sets before importing TensorFlow) hides TensorFlow's C++ INFO and WARNING lines (CUDA
  factory notices) and its oneDNN notice. `--verbosity=N` or JAXCONTRAST_VERBOSE=1 turns all
  of that off.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import warnings
from typing import Callable, Optional

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxcontrast import errors

FLAGS = flags.FLAGS
VERBOSE_ENV = "JAXCONTRAST_VERBOSE"
EXIT_USER_ERROR = 2
_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")
# Orbax reports every read-only CheckpointManager (each probe opens one) at WARNING; tfds warns
# about a dataset version folder without dataset_info.json each time `fashion_mnist` is looked
# up where only the Debian files are prepared (the folder need not exist).
_NOISE = re.compile(r"read only|read_only=True|has no dataset_info\.json")


def program() -> str:
  """"python -m jaxcontrast.main" for the running entry point."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is None:
    return os.path.basename(sys.argv[0])
  return "python -m " + spec.name.removesuffix(".__main__")


def fail(message: str, code: int = EXIT_USER_ERROR):
  """Prints `message` as one line on stderr and exits with `code`."""
  one_line = " ".join(str(message).split())
  sys.stderr.write(f"{program()}: error: {one_line}\n")
  sys.stderr.flush()
  raise SystemExit(code)


def verbose() -> bool:
  """True when the user asked for the libraries' logs: `--verbosity` given, or
  JAXCONTRAST_VERBOSE set to anything but "", "0" or "false"."""
  if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false"):
    return True
  return "verbosity" in FLAGS and FLAGS["verbosity"].present > 0


def quiet_environment() -> dict[str, str]:
  """Environment variables the entry points set in main(), before TensorFlow is imported (its
  C++ logging reads them once): none when `verbose()`; a value the user exported wins.

  TF_ENABLE_ONEDNN_OPTS=0: on CPUs with AVX-512 VNNI or AMX (Sapphire Rapids hosts of H100
  machines, for one) TensorFlow turns its oneDNN kernels on and says so at import, before its
  log level applies (TF_CPP_MIN_LOG_LEVEL=3 does not hide it: measured with TensorFlow 2.21).
  Those kernels are for matrix products and convolutions, which the input pipeline barely uses.
  """
  if verbose():
    return {}
  return {name: os.environ.get(name, default)
          for name, default in (("TF_CPP_MIN_LOG_LEVEL", "2"), ("TF_ENABLE_ONEDNN_OPTS", "0"))}


class _DropNoise(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not _NOISE.search(record.getMessage())


def _quiet_logging() -> None:
  if verbose():
    return
  FLAGS.verbosity = -1                                   # root logger: WARNING
  logging.getLogger("jaxcontrast").setLevel(logging.INFO)
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  logging.getLogger("absl").addFilter(_DropNoise())
  warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"tensorflow")


# ---------------------------------------------------------------------------------------------
# Config keys: checking overrides, listing them in --help.


def flat_items(config, prefix: str = "") -> list[tuple[str, object]]:
  """[("queue.size", 65536), ...]: every leaf key of `config` with its value, in key order."""
  items = []
  for key in config.keys():
    value = config[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      items.extend(flat_items(value, name + "."))
    else:
      items.append((name, value))
  return items


def describe_keys(config) -> str:
  """One line per key: "  queue.size = 65536"."""
  return "\n".join(f"  {key} = {value!r}" for key, value in flat_items(config))


def override_items(argv: list[str], name: str = "config") -> list[tuple[str, str]]:
  """[("queue.size", "8"), ...] for the `--config.KEY[=VALUE]` arguments of `argv`."""
  out = []
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?(no)?{name}\.([^=]+)(?:=(.*))?$", arg)
    if not m:
      continue
    value = m.group(3)
    if value is None:
      nxt = argv[i + 1] if i + 1 < len(argv) else None
      value = ("False" if m.group(1) else "True") if nxt is None or nxt.startswith("-") else nxt
    out.append((m.group(2), value))
  return out


def check_override_keys(config, argv: list[str], name: str = "config") -> None:
  """ConfigError naming the first `--config.KEY` of `argv` that `config` lacks, its value and the
  keys that exist there (config_flags itself fails on it with a bare AttributeError)."""
  for path, value in override_items(argv, name):
    node, where = config, ""
    for part in path.split("."):
      key = part.split("[", 1)[0]                # config_flags also takes list indices: a.b[0]
      if not isinstance(node, ml_collections.ConfigDict):
        raise errors.ConfigError(
            f"config {path} = {value!r}: {where} is a value, not a section with keys")
      if key not in node:
        known = sorted(node.keys())
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        section = f"section {where}" if where else "the config"
        raise errors.ConfigError(f"config {path} = {value!r}: no such key{hint}; {section} has "
                                 f"keys {', '.join(known)}")
      node, where = node[key], f"{where}.{key}" if where else key


class _ConfigFileParser(flags.ArgumentParser):
  """`--config path.py[:variants]` through `config_lib.load_config` (the repository root as a
  fallback for relative paths, validation, locking), once; override keys checked against it.
  (In place of config_flags' own file parser, which has no fallback and turns a ConfigError
  raised in the file into a ValueError holding a traceback.)"""

  def __init__(self, name: str):
    self.name = name

  def flag_type(self) -> str:
    return "config object"

  def parse(self, path):
    if isinstance(path, ml_collections.ConfigDict):
      return path
    from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(path)
    check_override_keys(config, sys.argv, self.name)
    return config


def _config_spec(argv: list[str]) -> Optional[str]:
  spec = None
  for i, arg in enumerate(argv):
    m = re.match(r"^--?config(=(.*))?$", arg)
    if m:
      spec = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return spec


def _user_error_in(e: BaseException) -> Optional[errors.UserError]:
  """The UserError that caused `e` (absl re-raises a parser's ValueError as its own error)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, errors.UserError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _config_value_error(message: str) -> str:
  """absl's "flag --config.KEY=VALUE: <parser error>" in the ConfigError style."""
  m = re.match(r"^flag --(config\.([^=]+))=(.*?): (.*)$", message, re.S)
  if not m or m.group(1) not in FLAGS:
    return message
  name, key, value, detail = m.groups()
  default = FLAGS[name].default
  now = "" if default is None else f" like its value {default!r}"
  return f"config {key} = {value!r}: expected {FLAGS[name].flag_type()}{now} ({detail})"


def _print_help(config_file: bool, default_config: Optional[Callable], argv: list[str]):
  app.usage(shorthelp=True, writeto_stdout=True)
  if config_file:
    from jaxcontrast import config_lib  # pylint: disable=g-import-not-at-top
    spec = _config_spec(argv) or (config_file if isinstance(config_file, str) else None)
    if spec:
      config, what = config_lib.load_config(spec), f"the keys of {spec} and their values"
    else:
      config = config_lib.base_config()
      what = ("the keys every config file has, with the defaults of "
              "config_lib.base_config() (give --config with --help for a file's own values)")
  else:
    config, what = default_config(), "the keys and their defaults"
  print(f"\nSettings: --config.KEY=VALUE overrides a key; {what}:")
  print(describe_keys(config))
  print(f"\nLogs of the libraries (TensorFlow, JAX, Orbax) are hidden; --verbosity=0 (or "
        f"{VERBOSE_ENV}=1) shows them. A user error exits with status {EXIT_USER_ERROR}.")


def define_config_flag(*, config_file=False,
                       config: Optional[Callable[[], ml_collections.ConfigDict]] = None
                       ) -> list[str]:
  """Defines `--config` (and its `--config.KEY` overrides, read from sys.argv) as `run` does;
  returns the argv to parse (with the default config spec inserted where one applies). A bad
  key or config file ends in one line (exit status 2)."""
  argv = list(sys.argv)
  try:
    if config_file:
      if isinstance(config_file, str) and _config_spec(argv[1:]) is None:
        argv.insert(1, f"--config={config_file}")
        sys.argv = argv                       # config_flags reads the overrides from sys.argv
      config_flags.DEFINE_config_file(
          "config", None, "Config file, path.py[:variants]; keys: --help.")
      FLAGS["config"].parser = _ConfigFileParser(name="config")
      if config_file is True:
        flags.mark_flag_as_required("config")
    else:
      default = config()
      check_override_keys(default, argv)
      # Defining the flag parses the default and the overrides' types from sys.argv.
      config_flags.DEFINE_config_dict("config", default, "Settings; keys: --help.")
  except (errors.UserError, flags.Error) as e:
    fail(str(e))
  # Listed by --help with the entry point's own flags (they are defined in other modules).
  shown = ("coordinator_address", "num_processes", "process_id", "distributed_timeout",
           "heartbeat_timeout", "verbosity")
  for name in (("config",) if config_file else ()) + shown:
    if name in FLAGS:
      FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  return argv


def run(main: Callable[[list[str]], Optional[int]], *, config_file=False,
        config: Optional[Callable[[], ml_collections.ConfigDict]] = None) -> None:
  """`app.run(main)` under the convention above; main reads the config as FLAGS.config.

  config_file: True: `--config path.py[:variants]` is required; a str: the spec used when
    `--config` is not given; False: no config file (give `config`).
  config: a function returning the default ConfigDict (a built-in config, no file).
  """
  argv = define_config_flag(config_file=config_file, config=config)

  def parse(args: list[str]) -> list[str]:
    if any(a in _HELP for a in args[1:]):
      try:
        _print_help(config_file, config, args)
      except errors.UserError as e:
        fail(str(e))
      raise SystemExit(0)
    try:
      rest = FLAGS(args)
    except (flags.Error, errors.UserError) as e:
      cause = _user_error_in(e)
      fail(str(cause) if cause is not None else _config_value_error(str(e)))
    if len(rest) > 1:
      fail(f"unexpected arguments {rest[1:]} (settings are --config.KEY=VALUE)")
    return rest

  def main_with_errors(args: list[str]):
    _quiet_logging()
    try:
      return main(args)
    except errors.UserError as e:
      fail(str(e))
    except flags.ValidationError as e:
      fail(str(e))

  app.run(main_with_errors, argv=argv, flags_parser=parse)
