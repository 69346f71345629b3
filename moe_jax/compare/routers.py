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

* :data:`ROWS` -- one :class:`Row` per line: adding a router to the comparison is a
  config file and one line here (docs/compare_routers.md);
* :func:`make_config` / :func:`build_grid` -- one
  :class:`~moe_jax.compare.runner.RunSpec` per (objective, row, seed);
* :data:`GRID` -- the grid for :func:`moe_jax.compare.runner.run_comparison`; the
  report (tables, the papers' claims judged on the numbers) is
  :mod:`moe_jax.compare.routers_report`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Callable, Mapping

from moe_jax.compare import runner
from moe_jax.compare.runner import RunSpec

CAUSAL, MASKED = "causal_lm", "masked_lm"
OBJECTIVE_CHOICES = {"causal_lm": (CAUSAL,), "masked_lm": (MASKED,),
                     "both": (CAUSAL, MASKED)}
SHORT = {CAUSAL: "clm", MASKED: "mlm"}  # run-name prefixes
BOTH = (CAUSAL, MASKED)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments", "configs")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the comparison.

  Attributes:
    name: run-name stem and ``family`` column (``switch``).
    label: the report's name for it.
    config: the ``experiments/configs/NAME.py`` it starts from.
    overrides: dotted config keys set after loading it (``{"moe.capacity_factor": 1.0}``).
    objectives: the objectives it runs under (non-causal routers: masked LM only).
    paper: where the router comes from.
  """

  name: str
  label: str
  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  objectives: tuple[str, ...] = BOTH
  paper: str = ""


# Capacity 1.0 at train and eval for the capacity-limited masked-LM rows: expert choice
# at its two capacity factors (Zhou et al. evaluate at the train factor), and Switch
# with and without Batch Prioritized Routing where capacity is tight (V-MoE).
_TIGHT = {"moe.capacity_factor": 1.0, "moe.eval_capacity_factor": 1.0}
ROWS: tuple[Row, ...] = (
    Row("dense", "Dense", "dense_small"),
    Row("switch", "Switch top-1", "switch_small", paper="Fedus et al. 2021"),
    Row("gshard_top2", "GShard top-2", "top2_small", paper="Lepikhin et al. 2020"),
    Row("mixtral_top2", "Mixtral top-2 dropless", "mixtral_small",
        {"model.activation": "gelu"}, paper="Jiang et al. 2024"),
    Row("deepseek", "DeepSeek fine-grained + shared, bias balancing", "deepseek_small",
        paper="Dai et al. 2024; DeepSeek-AI 2024 (V3)"),
    Row("deepseek_aux", "DeepSeek fine-grained + shared, aux loss, no bias",
        "deepseek_small", {"moe.bias_update_rate": 0.0, "moe.aux_loss_coef": 0.01},
        paper="Dai et al. 2024"),
    Row("noisy_top2", "Noisy top-2", "noisy_topk_small", paper="Shazeer et al. 2017"),
    Row("expert_choice_cf1", "Expert choice cf 1.0", "switch_small",
        {"moe.router": "expert_choice", **_TIGHT}, (MASKED,), paper="Zhou et al. 2022"),
    Row("expert_choice_cf2", "Expert choice cf 2.0", "switch_small",
        {"moe.router": "expert_choice", "moe.capacity_factor": 2.0,
         "moe.eval_capacity_factor": 2.0}, (MASKED,), paper="Zhou et al. 2022"),
    Row("switch_bpr_cf1", "Switch top-1 + BPR cf 1.0", "switch_small",
        {"moe.batch_priority": True, **_TIGHT}, (MASKED,), paper="Riquelme et al. 2021"),
    # The control of the BPR row: the same capacity without batch priority.
    Row("switch_cf1", "Switch top-1 cf 1.0 (BPR's control)", "switch_small", _TIGHT,
        (MASKED,), paper="Fedus et al. 2021"),
)
ROW_NAMES = tuple(r.name for r in ROWS)
ROW_BY_NAME = {r.name: r for r in ROWS}

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
        steps=200, seeds=2, objectives=BOTH, rows=ROW_NAMES,
        num_layers=4, d_model=128, num_heads=4, d_ff=512, num_experts=8, seq_len=64,
        batch_size=16, learning_rate=2e-3, warmup_steps=20, eval_every=25,
        eval_steps=8, final_eval_steps=0, log_every=25, checkpoint_every=100,
        bench_steps=10, bench_rounds=3),
    # Accelerator-sized: T5-Base-like shapes, 64 experts, a larger corpus (--dataset).
    "base": dict(
        steps=50_000, seeds=3, objectives=BOTH, rows=ROW_NAMES,
        num_layers=12, d_model=768, num_heads=12, d_ff=3072, num_experts=64,
        seq_len=512, batch_size=256, learning_rate=1e-3, warmup_steps=2_000,
        eval_every=1_000, eval_steps=50, final_eval_steps=200, log_every=100,
        checkpoint_every=1_000, bench_steps=20, bench_rounds=0),
}
OPTIONAL_SETTINGS = {"dataset": None, "threshold": None}


def load_row_config(name: str):
  """``get_config()`` of ``experiments/configs/NAME.py``."""
  path = os.path.join(CONFIGS_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"moe_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _set(config, key: str, value) -> None:
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def experts_per_token(config) -> float:
  """Routed experts a token visits: ``top_k``, or the capacity factor for expert
  choice (each expert takes ``cf * S / E`` tokens)."""
  from moe_jax.routers import ROUTERS  # pylint: disable=import-outside-toplevel
  return float(ROUTERS[config.moe.router].experts_per_token(config.moe))


def expert_shape(config, d_ff: int, num_experts: int) -> tuple[int, int]:
  """(expert width, routed experts) at equal active FFN FLOPs and routed parameters.

  A token visiting ``k`` routed and ``s`` shared experts of width ``d_ff / (k + s)``
  runs ``d_ff`` hidden units; ``num_experts * (k + s)`` routed experts hold
  ``num_experts * d_ff``. Switch (k 1): ``(d_ff, E)``; top-2: ``(d_ff / 2, 2E)``;
  DeepSeek's 3 routed + 1 shared: ``(d_ff / 4, 4E)``.
  """
  units = experts_per_token(config) + config.moe.num_shared_experts
  return int(round(d_ff / units)), int(round(num_experts * units))


def ffn_flops_per_token(config) -> float:
  """Forward FLOPs of the FFNs per token (2 per multiply-add), experts at the share a
  token visits: what the rows hold equal."""
  from moe_jax.config import expert_d_ff, model_pattern  # pylint: disable=import-outside-toplevel
  m = config.model
  mats = 3 if m.activation == "swiglu" else 2
  total = 0.0
  for kind in model_pattern(config):
    if kind.ffn == "moe":
      units = experts_per_token(config) + config.moe.num_shared_experts
      total += 2 * mats * m.d_model * expert_d_ff(config) * units
    else:
      total += 2 * mats * m.d_model * m.d_ff
  return total


def make_config(settings: dict[str, Any], row: Row, objective: str, seed: int):
  """The training config of one run: the row's config file and overrides, the
  objective, the preset's shapes and training settings, equal-FLOPs experts."""
  s = settings
  c = load_row_config(row.config)
  for key, value in row.overrides.items():
    _set(c, key, value)
  c.model.objective = objective
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
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.d_ff = (s["num_layers"], s["d_model"],
                                                  s["num_heads"], s["d_ff"])
  if m.moe_every:
    width, experts = expert_shape(c, s["d_ff"], s["num_experts"])
    c.moe.d_ff, c.moe.num_experts = width, experts
  return c


def build_grid(settings: dict[str, Any]) -> list[RunSpec]:
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
        runs.append(RunSpec(f"{SHORT[objective]}_{row.name}_s{seed}", row.name, cf, seed,
                            config, paper_model=row.paper))
  return runs


def _check(settings: dict[str, Any]) -> list[str]:
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
    probe = load_row_config(row.config)
    for key, value in row.overrides.items():
      _set(probe, key, value)
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
  return runner.resolve_settings(GRID, preset, **overrides)


def _write_outputs(workdir, runs, settings, meta):
  from moe_jax.compare import routers_report  # pylint: disable=import-outside-toplevel
  return routers_report.write_outputs(workdir, runs, settings, meta)


GRID = runner.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check,
                   build=build_grid, write_outputs=_write_outputs)


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the router grid in ``workdir`` and writes its report."""
  return runner.run_comparison(GRID, settings, workdir, command=command,
                               train_fn=train_fn, log=log)
