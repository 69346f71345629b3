"""Plumbing of the training loop (:func:`moe_jax.training.train.run_training`, which
pretraining and fine-tuning share): the work directory, metric sums over a logging
interval, the train metrics line, SIGTERM as a stop request, and printing."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np

from moe_jax.training import metric_schema
from moe_jax.errors import ConfigError


class Accumulator:
  """Sums of per-step metrics over one logging interval (saved in checkpoints)."""

  def __init__(self, state: dict | None = None):
    state = state or {}
    self.sums: dict[str, Any] = {k: (np.asarray(v) if isinstance(v, list) else v)
                                 for k, v in state.get("sums", {}).items()}
    self.count: int = state.get("count", 0)
    self.time: float = state.get("time", 0.0)
    self.timed_tokens: int = state.get("timed_tokens", 0)

  def add(self, metrics: dict[str, Any]) -> None:
    for k, v in metrics.items():
      v = np.asarray(v, np.float64)
      v = float(v) if v.ndim == 0 else v
      self.sums[k] = self.sums[k] + v if k in self.sums else v
    self.count += 1

  def means(self) -> dict[str, Any]:
    return {k: v / self.count for k, v in self.sums.items()}

  def state(self) -> dict:
    return {"sums": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                     for k, v in self.sums.items()},
            "count": self.count, "time": self.time, "timed_tokens": self.timed_tokens}


class ShareCounter:
  """Rows per source of a mixture's batches -> ``data_share/<source>``, each source's
  share of the tokens trained on since the last train line (no keys for one source)."""

  def __init__(self, names, saved=None):
    self._names = list(names)
    self._counts = np.zeros(len(self._names), np.int64)
    if saved is not None and len(saved) == len(self._names):  # resumed mid-interval
      self._counts[:] = saved

  def state(self) -> dict:
    """The checkpoint meta's ``data_share_rows`` (none for one source)."""
    return {"data_share_rows": self._counts.tolist()} if self._names else {}

  def add(self, source) -> None:
    self._counts += np.bincount(np.asarray(source).reshape(-1), minlength=len(self._names))

  def line(self) -> dict[str, float]:
    if not self._names:
      return {}
    total = max(int(self._counts.sum()), 1)
    out = {f"data_share/{n}": float(c) / total for n, c in zip(self._names, self._counts)}
    self._counts[:] = 0
    return out


def prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError([f"--workdir={workdir!r} cannot be created ({e.strerror}); pick a "
                       "writable directory."]) from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError([f"--workdir={workdir!r} is not writable; pick a writable "
                       "directory."])
  return workdir


def per_layer(values: Any, blocks: tuple[int, ...]) -> dict[str, Any]:
  """``{"layer_<b>": values[i]}`` for the ``i``-th of ``blocks``: how a line keys a
  per-layer metric (f32[n, ...] in block order) by block index."""
  return {f"layer_{b}": values[i] for i, b in enumerate(blocks)}


def train_line(means: dict, moe_blocks: tuple[int, ...],
               mod_blocks: tuple[int, ...] = ()) -> dict[str, Any]:
  """The train line's metrics (:data:`moe_jax.training.metric_schema.TRAIN`, in its
  order) from the interval's means of the step metrics: every one the steps
  reported, the per-layer ones keyed by block (MoE blocks, or routed blocks for the
  Mixture-of-Depths ones). The loop adds its own (:data:`~metric_schema.LOOP`)."""
  line = {}
  for m in metric_schema.TRAIN:
    if m.name not in means:
      if m.when == metric_schema.ALWAYS:
        raise KeyError(f"the step metrics lack {m.name!r}, which every train line has")
      continue
    if m.layers == "per_depth":  # multi-token prediction: one key per depth
      line.update(zip(metric_schema.depth_keys(m.name, len(means[m.name])),
                      means[m.name]))
    elif m.layers == "per_layer":
      line[m.name] = per_layer(means[m.name],
                               mod_blocks if m.when == metric_schema.MOD else moe_blocks)
    else:
      line[m.name] = means[m.name]
  return line


class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def fmt(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"
