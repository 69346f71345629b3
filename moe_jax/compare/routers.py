"""Every router on one budget, for causal and masked language modelling: the grid.

Each row is a router of the zoo, taken from its config file in ``experiments/configs``
(the routing settings: router, top-k, score function, balancing, capacity, dispatch)
plus, for a few rows, one or two overrides; the preset sets what every row shares
(shapes, data, steps, optimizer). Rows are compared at **equal active FFN FLOPs per
token and equal routed expert parameters**: a row whose token visits ``k`` routed
experts (``top_k``, or the capacity factor for expert choice) plus ``s`` shared ones
gets experts of width ``d_ff / (k + s)`` and ``num_experts * (k + s)`` routed experts,
so every token runs ``d_ff`` hidden units of FFN, as the dense row does, and the routed
experts hold ``num_experts * d_ff`` hidden units, as Switch's do
(:func:`expert_shape`). Every row uses the model's GELU FFN (Mixtral's SwiGLU would
change the FLOPs).

* :data:`~moe_jax.compare.router_rows.ROWS` -- one :class:`Row` per line, in
  ``router_rows.py``: adding a router to the comparison is a config file and one line
  there (docs/compare_routers.md);
* :func:`make_config` / :func:`build_grid` -- one :class:`RouterRun` per (objective,
  row, seed);
* :data:`GRID` -- the grid for :func:`moe_jax.compare.grid.run_comparison`; the
  report (tables, the papers' claims judged on the numbers) is
  :mod:`moe_jax.compare.routers_report`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from moe_jax.compare import grid, routers_report
from moe_jax.compare.aggregation import summarize_run
# The rows and their equal-FLOPs arithmetic.
from moe_jax.training.config import set_keys
from moe_jax.compare.router_rows import (BOTH, GRID_ROW_NAMES, OBJECTIVE_CHOICES,
                                         ROW_BY_NAME, ROW_NAMES, SHORT, Row, RouterRun,
                                         expert_shape, experts_per_token,
                                         ffn_flops_per_token, load_row_config)

PRESETS: dict[str, dict[str, Any]] = {
    # The whole path in CI (train, resume, benchmark, report, plots) on both
    # objectives: tiny models, one seed, three runs.
    "smoke": dict(
        steps=4, seeds=1, objectives=BOTH, rows=("dense", "expert_choice_cf2"),
        num_layers=2, d_model=32, num_heads=2, d_ff=64, num_experts=4, seq_len=32,
        batch_size=4, learning_rate=3e-3, warmup_steps=1, eval_every=2, eval_steps=1,
        final_eval_steps=2, log_every=2, checkpoint_every=4, bench_steps=1,
        bench_rounds=1),
    # Every row, both objectives, 2 seeds: 18 models, 36 runs, planned for about an
    # hour on a 2-core CPU (the shapes of switch_vs_top2's cpu_small, 200 steps
    # instead of 300). The final eval scores the whole validation split, as every
    # committed result does.
    "cpu_small": dict(
        steps=200, seeds=2, objectives=BOTH, rows=GRID_ROW_NAMES,
        num_layers=4, d_model=128, num_heads=4, d_ff=512, num_experts=8, seq_len=64,
        batch_size=16, learning_rate=2e-3, warmup_steps=20, eval_every=25,
        eval_steps=8, final_eval_steps=0, log_every=25, checkpoint_every=100,
        bench_steps=10, bench_rounds=3),
    # Accelerator-sized: T5-Base-like shapes, 64 experts, a larger corpus (--dataset).
    "base": dict(
        steps=50_000, seeds=3, objectives=BOTH, rows=GRID_ROW_NAMES,
        num_layers=12, d_model=768, num_heads=12, d_ff=3072, num_experts=64,
        seq_len=512, batch_size=256, learning_rate=1e-3, warmup_steps=2_000,
        eval_every=1_000, eval_steps=50, final_eval_steps=200, log_every=100,
        checkpoint_every=1_000, bench_steps=20, bench_rounds=0),
}
# configs_dir: where the rows' config files are (experiments/configs).
OPTIONAL_SETTINGS = {"dataset": None, "threshold": None, "configs_dir": None}


def make_config(settings: dict[str, Any], row: Row, objective: str, seed: int):
  """The training config of one run: the row's config file and overrides, the
  objective, the preset's shapes and training settings, equal-FLOPs experts."""
  s = settings
  c = load_row_config(row.config, s["configs_dir"])
  for key, value in row.overrides.items():
    set_keys(c, {key: value})
  c.model.objective = objective
  grid.set_training(c, s, seed)
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.d_ff = (s["num_layers"], s["d_model"],
                                                  s["num_heads"], s["d_ff"])
  if m.moe_every:
    width, experts = expert_shape(c, s["d_ff"], s["num_experts"])
    c.moe.d_ff, c.moe.num_experts = width, experts
  return c


def build_grid(settings: dict[str, Any]) -> list[RouterRun]:
  """Every (objective, row, seed) run, seed-major so a partial grid covers all rows."""
  runs = []
  for seed in range(settings["seeds"]):
    for objective in settings["objectives"]:
      for name in settings["rows"]:
        row = ROW_BY_NAME[name]
        if objective not in row.objectives:
          continue
        config = make_config(settings, row, objective, seed)
        cf = config.moe.capacity_factor if (
            config.model.moe_every and config.moe.dispatch != "dropless") else None
        runs.append(RouterRun(f"{SHORT[objective]}_{row.name}_s{seed}", seed, config,
                              row=row.name, objective=objective, capacity_factor=cf,
                              paper=row.paper))
  return runs


def _check(settings: dict[str, Any]) -> list[str]:
  if not settings["configs_dir"]:
    return ["configs_dir is unset; pass the directory of the rows' config files "
            "(configs_dir=\"experiments/configs\")."]
  errors = []
  objectives = settings["objectives"]
  if isinstance(objectives, str):
    if objectives not in OBJECTIVE_CHOICES:
      errors.append(f"--objective={objectives!r} is unknown; use causal_lm, masked_lm "
                    "or both.")
      objectives = ()
    else:
      objectives = OBJECTIVE_CHOICES[objectives]
  settings["objectives"] = tuple(objectives)
  settings["rows"] = tuple(settings["rows"])
  bad = [r for r in settings["rows"] if r not in ROW_BY_NAME]
  if bad:
    errors.append(f"--rows has unknown {', '.join(bad)}; use a subset of "
                  f"{', '.join(ROW_NAMES)}.")
  d_ff, experts = settings["d_ff"], settings["num_experts"]
  for name in settings["rows"]:
    row = ROW_BY_NAME.get(name)
    if row is None:
      continue
    probe = load_row_config(row.config, settings["configs_dir"])
    for key, value in row.overrides.items():
      set_keys(probe, {key: value})
    if probe.model.moe_every:
      units = experts_per_token(probe) + probe.moe.num_shared_experts
      if not math.isclose(d_ff / units, round(d_ff / units)):
        errors.append(f"--d_ff={d_ff} must split into {units:g} experts per token for "
                      f"row {name!r} (equal active FLOPs); pick a multiple of {units:g}.")
  if not isinstance(experts, int) or experts < 1:
    errors.append(f"--num_experts={experts!r} must be a positive integer.")
  return errors


def resolve_settings(preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: unknown preset, unknown override, or a value that cannot work.
  """
  return grid.resolve_settings(GRID, preset, **overrides)


def summarize(workdir: str, run: RouterRun) -> dict[str, Any] | None:
  """:func:`moe_jax.compare.aggregation.summarize_run` plus the run's active FFN FLOPs
  per token (what the rows hold equal)."""
  row = summarize_run(workdir, run)
  if row is not None:
    row["ffn_flops_per_token"] = ffn_flops_per_token(run.config)
  return row


GRID = grid.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check,
                 build=build_grid, report=routers_report.report, summarize=summarize,
                 csv_columns=routers_report.ROUTER_CSV_COLUMNS)


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the router grid in ``workdir`` and writes its report."""
  return grid.run_comparison(GRID, settings, workdir, command=command,
                             train_fn=train_fn, log=log)
