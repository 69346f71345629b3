"""Loads an experiment config by name for the benchmarks, with KEY=VALUE overrides."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Sequence

from absl import app

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _cast(item: str, old, text: str):
  """``text`` as the type of ``old``, the value it replaces (``true``/``false`` for a
  bool, since ``bool("False")`` is True); a text that is not one is refused."""
  if old is None:
    return text
  if isinstance(old, bool):
    if text.lower() not in ("true", "false"):
      raise app.UsageError(f"{item!r}: the value must be true or false.")
    return text.lower() == "true"
  try:
    return type(old)(text)
  except ValueError:
    raise app.UsageError(
        f"{item!r}: the value must be of type {type(old).__name__}.") from None


def load_config(name: str, overrides: Sequence[str] = ()):
  """``experiments/configs/NAME.py``'s ``get_config()``, with each ``a.b=value`` of
  ``overrides`` cast to the type of the value it replaces."""
  path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    raise app.UsageError(f"no config {name!r} in experiments/configs; pick from "
                         f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.py')))}.")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1) if "=" in item else (item, None)
    node = config
    *parents, leaf = key.split(".")
    try:
      for p in parents:
        node = node[p]
      old = node[leaf]
    except (KeyError, TypeError):
      raise app.UsageError(f"{item!r}: {name} has no key {key!r}.") from None
    if value is None:
      raise app.UsageError(f"{item!r}: write it as KEY=VALUE.")
    node[leaf] = _cast(item, old, value)
  return config
