"""Config checking shared by every section: one error type, one message style, and the merge of
a partial section (a dict from library code) over its defaults.

Types are ConfigDict's business: the merge assigns into a typed ConfigDict, so a str where a float
belongs fails there (re-raised as `ConfigError` naming the key). The section validators
(`config_lib.validate_config` runs them all, once, when a config is loaded) check what typing
cannot: choices, ranges and combinations.
"""
from typing import Any, NoReturn

import ml_collections

from jaxcontrast.errors import ConfigError  # re-exported: the one config error type

__all__ = ["ConfigError", "fail", "is_int", "is_number", "merge_known"]


def fail(section: str, key: str, value: Any, expected: str) -> NoReturn:
  """Raise the ConfigError of `section.key` (top-level keys: section "")."""
  name = f"{section}.{key}" if section else key
  raise ConfigError(f"config {name} = {value!r}: expected {expected}")


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge_known(defaults: ml_collections.ConfigDict, overrides: Any,
                section: str) -> ml_collections.ConfigDict:
  """`defaults` (a fresh, typed ConfigDict) with the keys of `overrides` (ConfigDict or dict)
  assigned; an unknown key or a value of the wrong type is a ConfigError naming it."""
  for key, value in dict(overrides).items():
    if key not in defaults:
      raise ConfigError(f"config {section}: unknown key {key!r}; known keys: {sorted(defaults)}")
    try:
      defaults[key] = value
    except TypeError as e:
      raise ConfigError(f"config {section}.{key} = {value!r}: {e}") from None
  return defaults
