"""What the benchmarks share: compiled forward + backward steps of a module, interleaved
timing of train steps, and writing results."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Hashable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def compiled_fwd_bwd(module: nnx.Module, x: jax.Array
                     ) -> tuple[Callable[[], None], int | None]:
  """A compiled forward + backward of ``module`` on ``x``, not yet run, and its memory.

  The loss is ``mean(y**2)`` (plus ``0.01 * aux_loss`` for a module that returns
  ``(y, aux)``, as :class:`moe_jax.MoeLayer` does); the gradients are taken of the
  parameters and of ``x``. Returns ``run`` (one blocking call of the step) and the
  compiled step's temporary + output bytes (None where the backend does not report
  them), so that a caller can refuse a step that does not fit before running it.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x)
    y = out[0] if isinstance(out, tuple) else out
    extra = out[1].aux_loss if isinstance(out, tuple) else 0.0
    return jnp.mean(y.astype(jnp.float32) ** 2) + 0.01 * extra

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  mem = None
  try:
    analysis = compiled.memory_analysis()
    mem = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
  except Exception:  # not every backend reports it
    pass

  def run():
    jax.block_until_ready(compiled(params, x))

  return run, mem


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
