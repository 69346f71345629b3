"""Metrics writer: ``DIR/metrics.jsonl`` plus TensorBoard events in ``DIR/tb``.

One JSON object per line, ``{"split": ..., "step": ..., <scalars>, <vectors>}``. Scalars
go to TensorBoard as ``{split}/{name}``; vectors (per-expert loads) go to the JSON line
as lists and to TensorBoard as one curve per entry. Only process 0 writes; on other processes
every method is a no-op, so callers need no ``if process_index == 0``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def _to_json(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  arr = np.asarray(value)
  if arr.ndim == 0:
    x = arr.item()
    if isinstance(x, float) and not math.isfinite(x):
      return str(x)  # JSON has no NaN/inf; keep the line parseable.
    return x
  return [_to_json(v) for v in arr]


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
  """The lines of ``workdir/metrics.jsonl`` (optionally one split), in file order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r.get("split") == split]


class MetricsWriter:
  """Appends metrics lines and TensorBoard events (process 0 only).

  Args:
    workdir: run directory.
    resume_step: when resuming from a checkpoint at this step, lines with a later step
      (written after that checkpoint by the interrupted run) are dropped from the JSONL
      file and TensorBoard is told to purge them, so every step appears once.
    enabled: defaults to ``jax.process_index() == 0``.
    tensorboard: also write ``workdir/tb``.
    tags: fields added to every JSON line, not to TensorBoard (e.g. ``{"objective":
      "masked_lm"}``: which objective produced the numbers).
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None,
               enabled: bool | None = None, tensorboard: bool = True,
               tags: Mapping[str, Any] | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.tags = dict(tags or {})
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      purge = resume_step + 1 if resume_step is not None else None
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          keep.append(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        pass
    if len(keep) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)

  def write(self, split: str, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
    """Writes one line; returns it as a dict (on every process)."""
    row = {"split": split, "step": int(step), **self.tags}
    row.update(_to_json(dict(values)))
    if not self.enabled:
      return row
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._write_tb(split, int(step), values)
    return row

  def _write_tb(self, split: str, step: int, values: Mapping[str, Any],
                prefix: str = "") -> None:
    for name, value in values.items():
      tag = f"{split}/{prefix}{name}"
      if isinstance(value, Mapping):
        self._write_tb(split, step, value, prefix=f"{prefix}{name}/")
        continue
      if isinstance(value, str):
        self._tb.add_text(tag, value, step)
        continue
      arr = np.asarray(value, dtype=np.float64)
      if arr.ndim == 0:
        self._tb.add_scalar(tag, float(arr), step)
      elif arr.ndim == 1 and arr.size <= 64:  # e.g. per-expert load: one curve each
        for i, x in enumerate(arr):
          self._tb.add_scalar(f"{tag}/{i}", float(x), step)
      elif arr.size:
        self._tb.add_histogram(tag, arr, step)

  def write_text(self, tag: str, text: str, step: int) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
