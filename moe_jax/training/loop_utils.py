"""Plumbing of the training loop (:func:`moe_jax.training.train.run_training`, which
pretraining and fine-tuning share): the work directory, metric sums over a logging
interval, the train metrics line, SIGTERM as a stop request, and printing."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np

from moe_jax.training import depth_metrics
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


def train_line(means: dict, moe_blocks: tuple[int, ...],
                mod_blocks: tuple[int, ...] = ()) -> dict[str, Any]:
  line = {k: means[k] for k in ("loss", "aux_loss", "z_loss", "dropped_fraction",
                                "grad_norm")}
  for k in ("router_confidence", "router_entropy", "second_kept_fraction",
            "noop_fraction"):
    if k in means:
      line[k] = means[k]
  if "expert_load" in means:
    line["expert_load"] = {f"layer_{b}": means["expert_load"][i]
                           for i, b in enumerate(moe_blocks)}
    line["expert_fill"] = {f"layer_{b}": means["expert_fill"][i]
                           for i, b in enumerate(moe_blocks)}
  line.update(depth_metrics.depth_train_line(means, mod_blocks))
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
