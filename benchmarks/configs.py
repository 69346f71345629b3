"""Loads an experiment config by name for the benchmarks, with KEY=VALUE overrides."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Sequence

from absl import app

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


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
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  return config
