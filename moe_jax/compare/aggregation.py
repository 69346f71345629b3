"""From finished runs to rows and per-model aggregates: the numbers every report uses.

* :func:`summarize_run` -- one ``results.csv`` row per finished run: final quality, its
  eval standard error, throughput, dropped tokens, the eval curve;
* :func:`steps_to_threshold` / :func:`add_threshold` -- when a run's eval loss reached
  a quality threshold, in steps and in training seconds;
* :func:`aggregate` -- the rows grouped by model (family, capacity factor), each number
  a :class:`Stat` over seeds.

Grid-independent: what a family means, how models are ordered and which row sets the
default threshold are the grid's to say (arguments here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Callable, Sequence

from moe_jax.analysis.history import load_history
from moe_jax.compare.runner import RunSpec, run_dir
from moe_jax.training.metrics import read_metrics


def steps_to_threshold(curve: Sequence[tuple[int, float]], threshold: float
                       ) -> float | None:
  """First step at which eval loss reaches ``threshold``, interpolated linearly
  between the evaluations around the crossing (None if never reached).

  ``curve`` is ``[(step, eval_loss), ...]`` in step order; a crossing before the first
  evaluation interpolates from ``(0, first_loss)``, i.e. it returns the first step.
  """
  prev = None
  for step, loss in curve:
    if loss <= threshold:
      if prev is None or prev[1] == loss:
        return float(step)
      (s0, l0) = prev
      return s0 + (step - s0) * (l0 - threshold) / (l0 - loss)
    prev = (step, loss)
  return None


def load_balance(load: Sequence[float]) -> tuple[float, float]:
  """(coefficient of variation, max / mean) of one layer's f32[E] expert load.

  CV is the population std over experts divided by the mean (0: perfectly balanced);
  max / mean is the most loaded expert against the average (1: balanced, E: one expert
  takes everything).
  """
  mean = statistics.fmean(load)
  if mean <= 0:
    return float("nan"), float("nan")
  return statistics.pstdev(load) / mean, max(load) / mean


def balance_curves(train: Sequence[dict[str, Any]]) -> dict[str, list[tuple]]:
  """Per MoE layer, ``[(step, CV, max/mean), ...]`` of the logged expert loads (each
  train line's load is the mean over its logging interval); {} for a dense model."""
  steps, loads = load_history(train)
  return {layer: [(int(s), *load_balance(l.tolist())) for s, l in zip(steps, load)]
          for layer, load in loads.items()}


def summarize_run(workdir: str, run: RunSpec, threshold: float | None = None
                  ) -> dict[str, Any] | None:
  """One row of ``results.csv`` for a finished run (None if it has no final eval)."""
  rdir = run_dir(workdir, run)
  lines = read_metrics(rdir)
  train = [l for l in lines if l.get("split") == "train"]
  evals = [l for l in lines if l.get("split") == "eval"]
  if not evals or evals[-1]["step"] < run.config.steps or not train:
    return None
  with open(os.path.join(rdir, "model_info.json"), encoding="utf-8") as f:
    info = json.load(f)
  c = run.config
  tokens_per_step = c.batch_size * c.data.seq_len
  tps = [float(l["tokens_per_sec"]) for l in train
         if isinstance(l.get("tokens_per_sec"), (int, float))
         and math.isfinite(l["tokens_per_sec"])]
  tokens_per_sec = statistics.median(tps) if tps else float("nan")
  final = evals[-1]
  row = {
      "run": run.name, "family": "", "paper_model": "", "train_capacity_factor": "",
      **run.columns(),  # the grid's own: family, paper_model, train_capacity_factor...
      "top_k": c.moe.top_k if c.model.moe_every else 0,
      "eval_capacity_factor": c.moe.eval_capacity_factor if c.model.moe_every else "",
      "seed": run.seed, "steps": final["step"],
      "params_total": info["params_total"], "params_active": info["params_active"],
      "flops_per_token_active": info["flops_per_token_active"],
      "final_eval_loss": final["eval_loss"], "quality": -final["eval_loss"],
      # Lines written before eval_loss_stderr existed read as unknown (NaN).
      "eval_loss_stderr": float(final.get("eval_loss_stderr", "nan")),
      "eval_tokens": final.get("eval_tokens", ""),
      "eval_bits_per_byte": final["eval_bits_per_byte"],
      # A mixture's per-source eval losses (eval_loss/<source>; empty otherwise).
      "eval_loss_by_source": {k.split("/", 1)[1]: float(v) for k, v in final.items()
                              if k.startswith("eval_loss/")},
      "tokens_per_sec": tokens_per_sec,
      "examples_per_sec": tokens_per_sec / c.data.seq_len,
      "dropped_fraction_train": statistics.fmean(
          float(l["dropped_fraction"]) for l in train),
      "dropped_fraction_eval": float(final.get("eval_dropped_fraction", 0.0)),
      "elapsed_sec": float(train[-1]["elapsed_sec"]),
      "curve": [(l["step"], float(l["eval_loss"])) for l in evals],
      "bpb_curve": [(l["step"], float(l["eval_bits_per_byte"])) for l in evals
                    if "eval_bits_per_byte" in l],
      "elapsed_curve": [(l["step"], float(l["elapsed_sec"])) for l in train],
      "tokens_per_step": tokens_per_step, "seq_len": c.data.seq_len,
      "objective": c.model.get("objective", "causal_lm"),
      "dropped_curve": [(l["step"], float(l["dropped_fraction"])) for l in train],
      "balance_curves": balance_curves(train),
  }
  balance = [p for curve in row["balance_curves"].values() for p in curve]
  # Over the whole run and every MoE layer: how balanced training kept the experts.
  row["load_cv"] = statistics.fmean(p[1] for p in balance) if balance else None
  row["load_max_mean"] = statistics.fmean(p[2] for p in balance) if balance else None
  if threshold is not None:
    add_threshold(row, threshold)
  return row


def add_threshold(row: dict[str, Any], threshold: float) -> None:
  """Sets the row's threshold, steps and training seconds to reach it (None: never)."""
  steps = steps_to_threshold(row["curve"], threshold)
  steps_per_sec = row["tokens_per_sec"] / row["tokens_per_step"]
  row["threshold_loss"] = threshold
  row["steps_to_threshold"] = steps
  row["time_to_threshold_sec"] = None if steps is None else steps / steps_per_sec
  row["elapsed_to_threshold_sec"] = None if steps is None else _interp(
      row.get("elapsed_curve", []), steps)


def _interp(curve: Sequence[tuple[int, float]], step: float) -> float | None:
  """Linear interpolation of ``[(step, value), ...]`` at ``step`` (from (0, 0))."""
  prev = (0, 0.0)
  for s, v in curve:
    if s >= step:
      return prev[1] + (v - prev[1]) * (step - prev[0]) / max(s - prev[0], 1e-9)
    prev = (s, v)
  return None


def train_seconds(row: dict[str, Any], step: float) -> float:
  """Training seconds to ``step``: at the row's ``seconds_per_step`` where a grid set
  one (an interleaved benchmark's), else at its measured training tokens per second."""
  if row.get("seconds_per_step"):
    return step * row["seconds_per_step"]
  return step * row["tokens_per_step"] / row["tokens_per_sec"]


def value_at_time(row: dict[str, Any], seconds: float, curve: str = "curve"
                  ) -> float | None:
  """The run's ``curve`` (eval loss by default; ``"bpb_curve"``: bits per byte) at
  ``seconds`` of training, interpolated linearly between its evaluations (None before
  the first one or past the last)."""
  pts = [(train_seconds(row, s), v) for s, v in row[curve]]
  for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
    if t0 <= seconds <= t1:
      return v0 + (v1 - v0) * (seconds - t0) / max(t1 - t0, 1e-12)
  if pts and math.isclose(seconds, pts[-1][0]):
    return pts[-1][1]
  return None


def equal_time_budget(rows: Sequence[dict[str, Any]]) -> float:
  """The equal-time budget: the training seconds of the fastest-finishing run, so
  that every run has a value at it (a model's mean over seeds would leave its faster
  seed without one)."""
  return min(train_seconds(r, r["steps"]) for r in rows)


def default_threshold(rows: Sequence[dict[str, Any]], baseline: str = "dense"
                      ) -> float | None:
  """The ``baseline`` family's final eval loss, averaged over seeds."""
  dense = [r["final_eval_loss"] for r in rows if r["family"] == baseline]
  return statistics.fmean(dense) if dense else None


@dataclasses.dataclass
class Stat:
  """Mean and sample standard deviation over seeds (std None with one seed)."""

  values: list[float]

  @property
  def mean(self) -> float:
    return statistics.fmean(self.values)

  @property
  def std(self) -> float | None:
    return statistics.stdev(self.values) if len(self.values) > 1 else None

  def fmt(self, spec: str) -> str:
    if self.std is None:
      return format(self.mean, spec)
    return f"{format(self.mean, spec)} ± {format(self.std, spec)}"


def aggregate(rows: Sequence[dict[str, Any]],
              bench: dict[str, list[float]] | None = None, *,
              order: Callable[[tuple[str, float | None]], Any] | None = None
              ) -> list[dict[str, Any]]:
  """Rows grouped by model (family, capacity factor).

  Args:
    rows: from :func:`summarize_run` (with :func:`add_threshold` applied).
    bench: from :func:`moe_jax.compare.runner.measure_throughput`; adds
      ``bench_examples_per_sec``.
    order: sort key of a model key ``(family, capacity_factor)``, the grid's row order
      in its report; None keeps the models in the order they first appear in ``rows``.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    key = (r["family"], r["train_capacity_factor"] or None)
    groups.setdefault(key, []).append(r)

  out = []
  for key in (sorted(groups, key=order) if order else list(groups)):
    g = groups[key]
    reached = [r for r in g if r.get("steps_to_threshold") is not None]
    model = g[0]["run"].rsplit("_s", 1)[0]
    tokens = (bench or {}).get(model)
    out.append({
        "family": key[0], "capacity_factor": key[1], "n": len(g),
        "steps": g[0]["steps"], "paper_model": g[0]["paper_model"],
        "quality": Stat([r["quality"] for r in g]),
        "eval_stderr": Stat([r["eval_loss_stderr"] for r in g]),
        "bits_per_byte": Stat([r["eval_bits_per_byte"] for r in g]),
        "examples_per_sec": Stat([r["examples_per_sec"] for r in g]),
        "tokens_per_sec": Stat([r["tokens_per_sec"] for r in g]),
        "bench_examples_per_sec": (Stat([t / g[0]["seq_len"] for t in tokens])
                                   if tokens else None),
        "dropped_train": Stat([r["dropped_fraction_train"] for r in g]),
        "dropped_eval": Stat([r["dropped_fraction_eval"] for r in g]),
        "reached": len(reached),
        "time_to_threshold": Stat([r["time_to_threshold_sec"] for r in reached])
                             if reached else None,
        "steps_to_threshold": Stat([r["steps_to_threshold"] for r in reached])
                              if reached else None,
        "load_cv": (Stat([r["load_cv"] for r in g])
                    if all(r.get("load_cv") is not None for r in g) else None),
        "load_max_mean": (Stat([r["load_max_mean"] for r in g])
                          if all(r.get("load_max_mean") is not None for r in g) else None),
        "params_total": g[0]["params_total"],
        "flops_per_token_active": g[0]["flops_per_token_active"],
        "curves": [r["curve"] for r in g],
        "rows": g,
    })
  return out
