"""The errors that mean "the user can fix this": a bad setting, a dataset not prepared, a workdir
without a checkpoint.

Every command-line entry point (`jaxcontrast.cli.run`) prints a `UserError` as one line and exits
with status 2; any other exception is a bug and keeps its traceback. Library callers catch them
by type: each also derives from the builtin error that code written before these types existed
would catch (`ValueError`, `FileNotFoundError`).
"""


class UserError(Exception):
  """A mistake in what the user asked for or set up; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A config that cannot run. The message names the key, the value and what is allowed:
  "config section.key = value: expected ..."."""


class DataNotFoundError(UserError, FileNotFoundError):
  """A dataset that is not prepared (or whose files are missing) where the config points."""


class CheckpointNotFoundError(UserError, ValueError):
  """A workdir (or a step of it) without a checkpoint to read."""
