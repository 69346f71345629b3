"""Training history: per-layer expert load over training, read from ``metrics.jsonl`` rows."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def load_history(rows: Sequence[Mapping[str, Any]], key: str = "expert_load"
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Per-layer expert load over training from ``metrics.jsonl`` train lines.

  Args:
    rows: lines from :func:`moe_jax.training.metrics.read_metrics` (``split="train"``);
      lines without ``key`` are skipped.
    key: ``"expert_load"`` (first choices before capacity) or ``"expert_fill"``.

  Returns:
    ``steps`` i64[T] and ``{layer name: f64[T, E]}``, layers in the order of the file.
  """
  rows = [r for r in rows if isinstance(r.get(key), Mapping)]
  steps = np.array([r["step"] for r in rows], np.int64)
  layers: dict[str, list] = {}
  for r in rows:
    for name, load in r[key].items():
      layers.setdefault(name, []).append(load)
  return steps, {name: np.asarray(v, np.float64) for name, v in layers.items()}
