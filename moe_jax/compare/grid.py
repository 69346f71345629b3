"""One grid runner for every comparison: settings, training, benchmark, outputs.

A comparison is a :class:`Grid`: its presets, how it checks its settings, builds its
runs (a :class:`~moe_jax.compare.runner.RunSpec` subclass with the grid's own fields),
summarises a finished run and writes its report. :func:`run_comparison` runs any of
them in a work directory:

1. trains every unfinished run (:func:`moe_jax.compare.runner.run_grid`: finished runs
   are skipped, unfinished ones resume from their checkpoints), unless the settings say
   ``report_only``;
2. benchmarks every model's throughput once, in interleaved rounds, when the preset
   sets ``bench_rounds`` (:func:`moe_jax.compare.runner.benchmark_once`);
3. records the invocation's wall time and load (``invocations.jsonl``);
4. :func:`write_outputs`: one row per finished run (``Grid.summarize``), the grid's
   ``report.md`` and plots (``Grid.report``), then ``results.csv``.

The grids: :mod:`~moe_jax.compare.switch_vs_top2`, :mod:`~moe_jax.compare.routers`,
:mod:`~moe_jax.compare.switch_vs_dense`, :mod:`~moe_jax.compare.finetune_grid`,
:mod:`~moe_jax.compare.deepseek_v3` and :mod:`~moe_jax.compare.tokenizer_grid`; the
command lines are ``experiments/{switch_vs_top2,compare_routers,switch_vs_dense,
compare_finetune,compare_deepseek_v3,compare_tokenizers}.py``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from moe_jax.compare import runner
from moe_jax.compare.aggregation import summarize_run
from moe_jax.compare.report import CSV_COLUMNS, write_csv
from moe_jax.compare.runner import RunSpec, fmt_duration

REPORT_FILE, CSV_FILE = "report.md", "results.csv"


@dataclasses.dataclass(frozen=True)
class Grid:
  """One comparison: what :func:`resolve_settings` and :func:`run_comparison` need.

  Attributes:
    presets: preset name -> settings (every key a preset must define; they include
      ``seeds`` and, for a grid with the throughput benchmark, ``bench_steps`` and
      ``bench_rounds``).
    optional: settings a preset may leave unset, with their defaults.
    check: ``settings -> [error sentences]``; may normalise values in place (lists
      to tuples).
    build: ``settings -> [RunSpec]``, in training order.
    report: ``(workdir, runs, rows, settings, meta) -> {"markdown": report.md's text,
      ...}``, called with at least one finished run's row; writes the grid's plots, and
      its other keys join :func:`run_comparison`'s result.
    summarize: ``(workdir, run) -> row`` (None while the run is unfinished); by default
      :func:`moe_jax.compare.aggregation.summarize_run`.
    csv_columns: the columns of ``results.csv``.
    csv_key: sort key of ``results.csv``'s rows (None: the runs' order).
  """

  presets: dict[str, dict[str, Any]]
  optional: dict[str, Any]
  check: Callable[[dict[str, Any]], list[str]]
  build: Callable[[dict[str, Any]], list[RunSpec]]
  report: Callable[..., dict[str, Any]]
  summarize: Callable[[str, RunSpec], dict[str, Any] | None] = summarize_run
  csv_columns: Sequence[str] = CSV_COLUMNS
  csv_key: Callable[[dict[str, Any]], Any] | None = None


def resolve_settings(grid: Grid, preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: unknown preset, unknown override, or a value that cannot work.
  """
  if preset not in grid.presets:
    raise ValueError(f"--preset={preset!r} is unknown; use one of "
                     f"{', '.join(grid.presets)}.")
  settings = {"report_only": False, **grid.optional, **grid.presets[preset],
              "preset": preset}
  for key, value in overrides.items():
    if key not in settings:
      raise ValueError(f"Unknown setting {key!r}; known: {', '.join(sorted(settings))}.")
    if value is not None:
      settings[key] = value
  errors = []
  if not (isinstance(settings["seeds"], int) and settings["seeds"] >= 1):
    errors.append(f"--seeds={settings['seeds']!r} must be a positive number of seeds.")
  errors = grid.check(settings) + errors
  if errors:
    raise ValueError("\n".join(errors))
  return settings


def set_training(config, settings: dict[str, Any], seed: int) -> None:
  """Sets the training keys a preset shares with the command line's grid flags
  (steps, batch, optimizer schedule, logging, evals, checkpoints, sequence length,
  dataset) on ``config``, no sample and no progress bar."""
  s, c = settings, config
  c.steps, c.seed, c.batch_size = s["steps"], seed, s["batch_size"]
  c.learning_rate, c.warmup_steps = s["learning_rate"], s["warmup_steps"]
  c.log_every, c.eval_every = s["log_every"], s["eval_every"]
  c.eval_steps, c.final_eval_steps = s["eval_steps"], s.get("final_eval_steps")
  c.checkpoint_every, c.keep_checkpoints = s["checkpoint_every"], 1
  c.progress_bar = False
  c.sample.length = 0
  c.data.seq_len = s["seq_len"]
  if s.get("dataset"):
    c.data.name = s["dataset"]


def write_outputs(grid: Grid, workdir: str, runs: Sequence[RunSpec],
                  settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
  """``report.md`` (with its plots) and ``results.csv`` of the finished runs.

  ``meta`` gains a ``PARTIAL`` entry while some runs are unfinished. Returns
  ``{"rows", "complete", ...the report's other keys}``; with no finished run, writes
  nothing.
  """
  rows = [row for run in runs if (row := grid.summarize(workdir, run)) is not None]
  complete = len(rows) == len(runs)
  if not rows:
    return {"rows": [], "complete": False}
  meta = dict(meta)
  if not complete:
    meta["PARTIAL"] = (f"only {len(rows)} of {len(runs)} runs have finished; the "
                       "tables cover those")
  out = dict(grid.report(workdir, runs, rows, settings, meta))
  with open(os.path.join(workdir, REPORT_FILE), "w", encoding="utf-8") as f:
    f.write(out.pop("markdown"))
  write_csv(os.path.join(workdir, CSV_FILE),
            sorted(rows, key=grid.csv_key) if grid.csv_key else rows, grid.csv_columns)
  return {"rows": rows, "complete": complete, **out}


def run_comparison(grid: Grid, settings: dict[str, Any], workdir: str, *,
                   command: str = "", train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) ``grid`` in ``workdir`` and writes its report.

  With ``settings["report_only"]`` nothing trains or benchmarks: the report covers the
  runs finished so far. Each invocation that trained or benchmarked appends its wall
  time and load average (start, end) to ``workdir/invocations.jsonl``; reports give
  their total.

  Returns:
    :func:`moe_jax.compare.runner.run_grid`'s result, :func:`write_outputs`'s and
    ``total_wall_sec``.
  """
  os.makedirs(workdir, exist_ok=True)
  runs = grid.build(settings)
  load0, t0 = os.getloadavg(), time.time()
  if settings.get("report_only"):
    result = {"trained": [], "skipped": [r.name for r in runs], "preempted": False,
              "wall_sec": 0.0}
  else:
    result = runner.run_grid(runs, workdir, train_fn=train_fn, log=log)
  benched = not (result["preempted"] or settings.get("report_only")) and (
      runner.benchmark_once(runs, workdir, steps=settings.get("bench_steps", 0),
                            rounds=settings.get("bench_rounds"), log=log))
  load1, wall = os.getloadavg(), time.time() - t0
  if result["trained"] or result["preempted"] or benched:
    runner.record_invocation(workdir, {
        "start": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
        "wall_sec": wall, "trained": result["trained"], "benchmark": benched,
        "loadavg_start": load0, "loadavg_end": load1})
  invocations = runner.read_invocations(workdir)
  total = sum(i["wall_sec"] for i in invocations)
  meta = {
      "command": command,
      "runs": f"{len(runs)} (" + ", ".join(sorted({r.model_key for r in runs})) + ")",
      "total wall-clock (training and benchmark)": (
          f"{fmt_duration(total)} over {len(invocations)} invocation(s) that trained "
          "or benchmarked"),
      "load average (1 min) at start / end of each invocation": "; ".join(
          f"{i['loadavg_start'][0]:.1f} / {i['loadavg_end'][0]:.1f}"
          for i in invocations) or "n/a",
      "CPU cores": os.cpu_count(),
  }
  out = write_outputs(grid, workdir, runs, settings, meta)
  out.update(result, total_wall_sec=total)
  log(f"Grid wall-clock this invocation: {fmt_duration(wall)} "
      f"(all invocations: {fmt_duration(total)}); load average "
      f"{load0[0]:.1f} -> {load1[0]:.1f}.")
  if out["rows"]:
    log(f"Wrote {os.path.join(workdir, REPORT_FILE)}, {CSV_FILE} and plots"
        + ("" if out["complete"] else " (PARTIAL: some runs unfinished)") + ".")
  return out
