"""Override a section's defaults with user keys, rejecting unknown ones."""
from typing import Any

import ml_collections


def override_known(defaults: ml_collections.ConfigDict, overrides: Any,
                   what: str) -> ml_collections.ConfigDict:
  """`defaults` with the keys of `overrides` (a ConfigDict or dict) replaced.

  Merged as plain dicts, so a wrong type surfaces later as our validator's ValueError naming the
  key rather than as ConfigDict's type-safety TypeError; an unknown key is a ValueError listing
  the known ones.
  """
  merged = defaults.to_dict()
  for key, value in dict(overrides).items():
    if key not in merged:
      raise ValueError(f"{what} config: unknown key {key!r}; known keys: {sorted(merged)}")
    merged[key] = value
  return ml_collections.ConfigDict(merged, type_safe=False)
