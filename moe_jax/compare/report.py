"""Report pieces every comparison grid shares: the CSV, the sentences that state a run's
init, loss and eval conventions, table cells and the paragraph on which of a paper's
claims held.

A grid's own ``report.md`` layout (its tables and the paper's numbers) lives with the
grid, e.g. :func:`moe_jax.compare.switch_vs_top2.report_markdown`.
"""

from __future__ import annotations

import csv
import math
import statistics
from typing import Any, Callable, Iterable, Sequence

from moe_jax.compare.aggregation import Stat, default_threshold
from moe_jax.compare.runner import cf_name

CSV_COLUMNS = (
    "run", "family", "paper_model", "top_k", "train_capacity_factor",
    "eval_capacity_factor", "seed", "steps", "params_total", "params_active",
    "flops_per_token_active", "final_eval_loss", "eval_loss_stderr", "eval_tokens",
    "quality", "eval_bits_per_byte",
    "threshold_loss", "steps_to_threshold", "time_to_threshold_sec",
    "elapsed_to_threshold_sec",
    "examples_per_sec", "tokens_per_sec", "dropped_fraction_train",
    "dropped_fraction_eval", "elapsed_sec")


def write_csv(path: str, rows: Iterable[dict[str, Any]],
              columns: Sequence[str] = CSV_COLUMNS) -> None:
  """``results.csv``: one line per run, the ``columns`` (default :data:`CSV_COLUMNS`)."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else
                      (repr(float(f"{r[k]:.6g}")) if isinstance(r[k], float) else r[k]))
                  for k in columns})


def init_and_loss_sentence(config) -> str:
  """The init rule and loss convention of a run's config, in words, for reports."""
  s, moe = config.model.init_scale, config.moe
  reduction = moe.loss_reduction
  how = ("summed over the MoE blocks, each block's loss carrying the full coefficient "
         "as in the Switch and ST-MoE papers" if reduction == "sum" else
         "averaged over the MoE blocks, the coefficient shared out over them")
  return (f"Init (every row alike): model-wide scale `model.init_scale={s:g}`: every "
          f"weight matrix, dense FFNs and attention included, is drawn with variance "
          f"{s:g}/fan_in (the embedding with variance {s:g}); experts at "
          f"`moe.init_scale={moe.init_scale:g}` and the router at "
          f"`moe.router_init_scale={moe.router_init_scale:g}` times it, "
          f"i.e. {s * moe.init_scale:g}/fan_in and "
          f"{s * moe.router_init_scale:g}/fan_in. "
          f"Loss convention: `moe.loss_reduction=\"{reduction}\"`, the aux and z losses "
          f"{how}.")


def eval_sentence(config) -> str:
  """Which eval data a run's config scores, in words, for reports."""

  def what(steps):
    return ("the whole validation split (every target token once)" if not steps else
            f"a fixed sample of {steps} batches of {config.batch_size} windows drawn "
            "uniformly from the whole validation split")

  final = config.get("final_eval_steps")
  if final is None or final == config.eval_steps:
    scope = f"every eval scores {what(config.eval_steps)}"
  else:
    scope = (f"the final eval (the quality column) scores {what(final)}; the evals "
             f"every {config.eval_every} steps (the curves) score {what(config.eval_steps)}")
  return (f"Eval: {scope}; the same batches for every row and seed, at eval capacity "
          f"factor {cf_name(config.moe.eval_capacity_factor)}.")


def threshold_for(rows: Sequence[dict[str, Any]], settings: dict[str, Any],
                  baseline: str) -> tuple[float, str]:
  """(quality threshold as an eval loss, where it comes from, in words) for ``rows``.

  ``settings["threshold"]`` when set (a negative value is a quality, -loss); else the
  dense family's final eval loss (mean over seeds), which ``baseline`` names ("the
  dense row"); else, with no dense run, the best final eval loss of any run.
  """
  threshold = settings.get("threshold")
  if threshold is not None:
    return (-threshold if threshold < 0 else threshold), "set with --threshold"
  threshold = default_threshold(rows)
  if threshold is None:
    return (min(r["final_eval_loss"] for r in rows),
            "no dense run, so the best final eval loss of any run")
  return threshold, f"{baseline}'s final eval loss (mean over seeds)"


def run_section(meta: dict[str, Any]) -> list[str]:
  """The report's ``## Run`` section: every ``meta`` entry but the command."""
  return ["## Run", "", *[f"- {k}: {v}" for k, v in meta.items() if k != "command"]]


def stderr_cell(stat: Stat) -> str:
  """The mean over seeds of each run's eval standard error ("—" when unknown)."""
  values = [v for v in stat.values if math.isfinite(v)]
  return f"{statistics.fmean(values):.4f}" if values else "—"


def threshold_cell(agg: dict[str, Any], fmt_time: Callable[[Stat], str]) -> tuple:
  """(time to threshold, steps to threshold) cells of an aggregate's table row."""
  steps = agg["steps"]
  if not agg["reached"]:
    return (f"not reached in {steps} steps", "—")
  time_s, steps_s = fmt_time(agg["time_to_threshold"]), agg["steps_to_threshold"].fmt(
      ".0f")
  if agg["reached"] < agg["n"]:
    note = f" ({agg['reached']}/{agg['n']} seeds; others not reached in {steps} steps)"
    return (time_s + note, steps_s)
  return (time_s, steps_s)


def claims_paragraph(claims: Sequence[dict[str, Any]], *,
                     none_text: str = "No row of this grid has a counterpart in the "
                     "paper.") -> str:
  """One paragraph: which of a paper's orderings reproduced here and which did not.

  ``claims`` are ``{"claim": text, "pairs": [...]}``, each pair a dict with ``winner``,
  ``loser``, ``metric`` (the paper's winner first), ``holds``, ``within_noise`` and the
  formatted ``paper`` and ``ours`` values of both. One sentence per claim; a pair already
  checked under an earlier claim is not repeated. ``none_text`` when nothing compares.
  """
  seen = set()
  sentences, held_total, total, noisy = [], 0, 0, 0
  for c in claims:
    pairs = []
    for p in c["pairs"]:
      key = (p["winner"], p["loser"], p["metric"])
      if key not in seen:
        seen.add(key)
        pairs.append(p)
    if not pairs:
      continue
    held = [p for p in pairs if p["holds"]]
    total += len(pairs)
    held_total += len(held)
    noisy += sum(p["within_noise"] for p in pairs)

    def text(p):
      return (f"{p['winner']} vs {p['loser']}: paper {p['paper'][0]} vs "
              f"{p['paper'][1]}, here {p['ours'][0]} vs {p['ours'][1]}"
              + (" (within seed noise)" if p["within_noise"] else ""))

    parts = []
    if held:
      parts.append("reproduced for " + "; ".join(text(p) for p in held))
    failed = [p for p in pairs if not p["holds"]]
    if failed:
      parts.append("not reproduced for " + "; ".join(text(p) for p in failed))
    sentences.append(f"{c['claim'][0].upper()}{c['claim'][1:]} ({len(held)} of "
                     f"{len(pairs)} pairs): " + ", and ".join(parts) + ".")
  if not total:
    return none_text
  return (f"Of the paper's {total} pairwise orderings checked here, {held_total} "
          f"reproduced and {total - held_total} did not; {noisy} of the {total} "
          "differ here by less than the seeds' combined standard deviation. "
          + " ".join(sentences))
