"""Exceptions for problems the user can fix: a bad configuration, bad or missing data.

`recall_jax.main` prints these as one line without a traceback; every other exception keeps its
traceback, so a real bug (say, inside tracing) is never disguised as a configuration problem.
They subclass the built-in exception a caller would expect (ValueError, FileNotFoundError), so
library users can keep catching those.

Serves both tasks.
"""

from __future__ import annotations


class UserInputError(ValueError):
  """Base class: something in the user's config, data or command line is wrong."""


class ConfigError(UserInputError):
  """The configuration is invalid (unknown key, value out of range, inconsistent sizes)."""


class DataError(UserInputError):
  """The data is unusable (malformed annotation line, empty class, corrupt file)."""


class MissingFileError(DataError, FileNotFoundError):
  """A file or folder the run needs does not exist (dataset files, weights, a checkpoint)."""
