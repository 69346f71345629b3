"""The errors the library raises on purpose, in one leaf module every layer may import.

The entry points (``experiments/*.py``) catch these and print their sentences, one line
per problem, without a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """Invalid configuration; ``errors`` holds one sentence per problem."""

  def __init__(self, errors: list[str]):
    self.errors = list(errors)
    super().__init__("\n".join(self.errors))


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, unusable work directory, ...)."""


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""
