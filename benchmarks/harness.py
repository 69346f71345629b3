"""What the benchmarks share: interleaved timing of train steps, and writing results."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Hashable, Mapping

import jax


def interleaved_step_times(runs: Mapping[Hashable, dict], repeats: int
                           ) -> dict[Hashable, list[float]]:
  """Seconds of one train step of every run, ``repeats`` rounds, the runs in turn.

  Each run is a dict with ``state``, ``step`` (``state, metrics = step(state, batch)``)
  and ``batch``; its ``state`` advances. Interleaving makes a slow phase of the machine
  hit every run alike, so per-round ratios between runs are robust to it.
  """
  times: dict[Hashable, list[float]] = {key: [] for key in runs}
  for _ in range(repeats):
    for key, run in runs.items():
      start = time.perf_counter()
      run["state"], metrics = run["step"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      times[key].append(time.perf_counter() - start)
  return times


def write_results(data: dict[str, Any], *, json_path: str | None = None,
                  markdown_path: str | None = None,
                  to_markdown: Callable[[dict[str, Any]], str] | None = None) -> None:
  """Prints ``to_markdown(data)`` and writes it and ``data`` (JSON) where asked."""
  text = to_markdown(data) if to_markdown else None
  if text is not None:
    print(text)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(data, f, indent=1)
  if markdown_path and text is not None:
    with open(markdown_path, "w") as f:
      f.write(text)
