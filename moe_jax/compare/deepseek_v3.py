"""DeepSeek-V3's attention and training objective against DeepSeek-MoE's: the grid.

Four rows, all with ``deepseek_small``'s MoE (32 fine-grained experts in 4 groups,
top-3 plus one shared, sigmoid gates, the selection bias; dropless), so MLA and MTP
can be separated (:data:`ROWS`):

* ``deepseek_small`` -- multi-head attention, no multi-token prediction;
* ``deepseek_small_mtp1`` -- the same with one MTP module (lambda 0.3): MTP only;
* ``deepseek_v3_small_mtp0`` -- ``deepseek_v3_small`` without its MTP module: MLA
  (with YaRN and interleaved rotary pairs) only;
* ``deepseek_v3_small`` -- MLA and one MTP module.

Each row is its config file in ``experiments/configs`` plus the row's overrides and
the preset's shared training settings (steps, batch, optimizer, evals); a preset may
shrink the shapes (``model_overrides``, every row alike). ``eval_loss`` is the main
next-token loss with or without MTP (the MTP modules are skipped at evaluation), so
the rows compare on it directly. The report (:func:`report`) gives per row the active
FLOPs per token, the final eval loss with its seed spread, the eval loss at an equal
training-time budget, the MTP on/off and MLA/MHA pairs, the KV-cache values per token
(from the built model's cache shapes) and the plots of eval loss against step and
against training time. ``experiments/compare_deepseek_v3.py`` is the command line;
docs/results/deepseek_v3_cpu/ holds the results.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable

from moe_jax.compare import grid, plots, runner
from moe_jax.compare.aggregation import (Stat, add_threshold, aggregate, equal_time_budget,
                                         summarize_run, value_at_time)
from moe_jax.compare.report import CSV_COLUMNS, run_section, stderr_cell, threshold_cell
from moe_jax.compare.router_rows import load_row_config
from moe_jax.compare.runner import RunSpec
from moe_jax.training.config import set_keys


@dataclasses.dataclass(frozen=True)
class Row:
  """One model of the grid: a config file, overrides, what it has."""

  name: str
  config: str
  overrides: dict[str, Any]
  mixer: str  # "MHA" | "MLA"
  mtp: bool
  color: str


ROWS = (
    Row("deepseek_small", "deepseek_small", {}, "MHA", False, "tab:blue"),
    Row("deepseek_small_mtp1", "deepseek_small",
        {"model.mtp_depth": 1, "model.mtp_loss_coef": 0.3}, "MHA", True, "tab:cyan"),
    Row("deepseek_v3_small_mtp0", "deepseek_v3_small", {"model.mtp_depth": 0}, "MLA",
        False, "tab:red"),
    Row("deepseek_v3_small", "deepseek_v3_small", {}, "MLA", True, "tab:orange"),
)
ROW_BY_NAME = {r.name: r for r in ROWS}
ROW_NAMES = tuple(ROW_BY_NAME)
BASELINE = "deepseek_small"
# (with MTP, without MTP) at the same attention; (MLA, MHA) at the same objective.
MTP_PAIRS = (("deepseek_small_mtp1", "deepseek_small"),
             ("deepseek_v3_small", "deepseek_v3_small_mtp0"))
MLA_PAIRS = (("deepseek_v3_small_mtp0", "deepseek_small"),
             ("deepseek_v3_small", "deepseek_small_mtp1"))

_TINY = {  # smoke: every row alike, a few seconds per run
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
    "model.d_ff": 64, "moe.d_ff": 16, "moe.num_experts": 8, "mla.q_lora_rank": 16,
    "mla.kv_lora_rank": 8, "mla.qk_nope_head_dim": 8, "mla.qk_rope_head_dim": 8,
    "mla.v_head_dim": 16}

PRESETS: dict[str, dict[str, Any]] = {
    # The whole path in CI (train, resume, report, CSV, plots): tiny shapes, one seed,
    # the four rows, no throughput benchmark (it compiles every model once more).
    "smoke": dict(
        steps=2, seeds=1, rows=ROW_NAMES, model_overrides=_TINY, seq_len=32,
        batch_size=4, learning_rate=3e-3, warmup_steps=1, eval_every=1, eval_steps=1,
        final_eval_steps=1, log_every=1, checkpoint_every=2, bench_steps=0,
        bench_rounds=0),
    # The configs' own shapes and schedule (600 steps of 16 x 128 tokens, about 30
    # minutes a run on a 2-core CPU), 2 seeds: 8 runs, about 4 hours. The final eval
    # scores the whole validation split.
    "cpu_small": dict(
        steps=600, seeds=2, rows=ROW_NAMES, model_overrides={}, seq_len=128,
        batch_size=16, learning_rate=2e-3, warmup_steps=50, eval_every=50,
        eval_steps=8, final_eval_steps=0, log_every=25, checkpoint_every=100,
        bench_steps=10, bench_rounds=3),
}
# configs_dir: where the rows' config files are (experiments/configs).
OPTIONAL_SETTINGS = {"dataset": None, "threshold": None, "configs_dir": None}
DSV3_CSV_COLUMNS = CSV_COLUMNS + ("row", "mixer", "mtp_depth", "kv_cache_values_per_token",
                                  "eval_loss_at_equal_time", "equal_time_sec")


@dataclasses.dataclass(frozen=True)
class Dsv3Run(RunSpec):
  """A run of the grid: its row."""

  row: str = ""

  def columns(self) -> dict[str, Any]:
    r = ROW_BY_NAME[self.row]
    return {"family": self.row, "paper_model": r.config, "row": self.row,
            "mixer": r.mixer, "mtp_depth": self.config.model.get("mtp_depth", 0)}


def make_config(settings: dict[str, Any], row: Row, seed: int):
  """The training config of one run: the row's config file and overrides, the
  preset's shape overrides and training settings."""
  c = load_row_config(row.config, settings["configs_dir"])
  for key, value in {**row.overrides, **settings["model_overrides"]}.items():
    set_keys(c, {key: value})
  grid.set_training(c, settings, seed)
  if c.model.get("rope_scaling") == "yarn":  # YaRN's factor is over the training context
    c.model.rope_original_max_len = settings["seq_len"]
  return c


def build_grid(settings: dict[str, Any]) -> list[Dsv3Run]:
  """Every (row, seed) run, seed-major so a partial grid covers all rows."""
  return [Dsv3Run(f"{name}_s{seed}", seed, make_config(settings, ROW_BY_NAME[name],
                                                       seed), row=name)
          for seed in range(settings["seeds"]) for name in settings["rows"]]


def _check(settings: dict[str, Any]) -> list[str]:
  if not settings["configs_dir"]:
    return ["configs_dir is unset; pass the directory of the rows' config files "
            "(configs_dir=\"experiments/configs\")."]
  settings["rows"] = tuple(settings["rows"])
  bad = [r for r in settings["rows"] if r not in ROW_BY_NAME]
  if bad:
    return [f"--rows has unknown {', '.join(bad)}; use a subset of "
            f"{', '.join(ROW_NAMES)}."]
  return []


def resolve_settings(preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: unknown preset, unknown override, or a value that cannot work.
  """
  return grid.resolve_settings(GRID, preset, **overrides)


def kv_cache_values_per_token(config) -> int:
  """Cached values per token, summed over the blocks, read off the cache variables of
  the model ``config`` builds (abstractly: no weights are allocated).

  MLA caches the normed latent and the shared rotary key (``R + Dr`` per block);
  attention caches keys and values (``2 * N_kv * D_head``). Positions (int32
  bookkeeping) are left out.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moe_jax.inference import decode  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel

  def cache_shapes():
    model = build.make_model(config)
    decode.init_cache(model, 1, 1)
    return nnx.state(model, nnx.Cache)

  state = jax.eval_shape(cache_shapes)
  return sum(math.prod(leaf.shape) for path, leaf in
             jax.tree_util.tree_flatten_with_path(state)[0]
             if "position" not in jax.tree_util.keystr(path)
             and leaf.dtype != jax.numpy.int32)


def summarize(workdir: str, run: Dsv3Run) -> dict[str, Any] | None:
  """:func:`moe_jax.compare.aggregation.summarize_run` plus the row's KV-cache values
  per token."""
  row = summarize_run(workdir, run)
  if row is not None:
    row["kv_cache_values_per_token"] = kv_cache_values_per_token(run.config)
  return row


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------


def loss_at_time(row: dict[str, Any], seconds: float) -> float | None:
  """The run's eval loss at ``seconds`` of training (see
  :func:`moe_jax.compare.aggregation.value_at_time`)."""
  return value_at_time(row, seconds)


def _noise(a: Stat, b: Stat) -> bool:
  if a.std is None or b.std is None:
    return False
  return abs(a.mean - b.mean) < math.hypot(a.std, b.std)


def _pair_line(by, first: str, second: str, key: str, what: str) -> str | None:
  a, b = by.get(first), by.get(second)
  if a is None or b is None or a.get(key) is None or b.get(key) is None:
    return None
  sa, sb = a[key], b[key]
  diff = sa.mean - sb.mean
  verdict = ("lower" if diff < 0 else "higher") + (
      " (within seed noise)" if _noise(sa, sb) else "")
  return (f"- {what}: `{first}` {sa.fmt('.4f')} vs `{second}` {sb.fmt('.4f')}: "
          f"{diff:+.4f}, {verdict}.")


def report(workdir: str, runs, rows, settings: dict[str, Any],
           meta: dict[str, Any]) -> dict[str, Any]:
  """``report.md``'s text and the plots (eval loss vs step and vs training time,
  throughput)."""
  bench = runner.read_benchmark(workdir)
  by_model: dict[str, list] = {}
  for r in rows:
    by_model.setdefault(r["family"], []).append(r)
  base = by_model.get(BASELINE)
  threshold = settings.get("threshold")
  if threshold is None:
    threshold = (statistics.fmean(r["final_eval_loss"] for r in base) if base
                 else min(r["final_eval_loss"] for r in rows))
  threshold = -threshold if threshold < 0 else threshold
  for r in rows:
    add_threshold(r, threshold)
  budget = equal_time_budget(rows)
  for r in rows:
    r["equal_time_sec"] = budget
    r["eval_loss_at_equal_time"] = loss_at_time(r, budget)
  order = {n: i for i, n in enumerate(ROW_NAMES)}
  aggs = aggregate(rows, bench, order=lambda key: order[key[0]])
  by = {}
  for a in aggs:
    a["loss"] = Stat([r["final_eval_loss"] for r in a["rows"]])
    at_t = [r["eval_loss_at_equal_time"] for r in a["rows"]]
    a["loss_equal_time"] = Stat(at_t) if None not in at_t else None
    a["kv"] = a["rows"][0]["kv_cache_values_per_token"]
    by[a["family"]] = a
  c0 = runs[0].config
  out = [f"# {', '.join(ROW_NAMES)}: MLA and MTP on deepseek_small's MoE", "",
         f"Command: `{meta.get('command', '')}`", "",
         f"Preset `{settings['preset']}`: {settings['steps']} steps of "
         f"{c0.batch_size} x {c0.data.seq_len} tokens, {settings['seeds']} seed(s). "
         "`eval_loss` is the main next-token loss in every row (MTP modules are skipped "
         "at evaluation). Training time is steps / the run's measured steps per second.",
         ""]
  if "PARTIAL" in meta:
    out += [f"**PARTIAL**: {meta['PARTIAL']}.", ""]
  out += ["## Rows", "",
          "| row | attention | MTP | active FLOPs/token | params | KV-cache values/token "
          "(all blocks) | final eval loss | eval stderr | eval loss at equal time | "
          "time to threshold | steps to threshold | train tokens/s | bench tokens/s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt_time = lambda s: s.fmt(".0f") + " s"
  for a in aggs:
    row = ROW_BY_NAME[a["family"]]
    bench_cell = (Stat([t for t in bench[a["rows"][0]["run"].rsplit("_s", 1)[0]]])
                  .fmt(",.0f") if bench and a["rows"][0]["run"].rsplit("_s", 1)[0]
                  in bench else "—")
    t_cell, s_cell = threshold_cell(a, fmt_time)
    out.append(
        f"| `{a['family']}` | {row.mixer} | {'yes' if row.mtp else 'no'} | "
        f"{a['flops_per_token_active']:,} | {a['params_total']:,} | {a['kv']:,} | "
        f"{a['loss'].fmt('.4f')} | {stderr_cell(a['eval_stderr'])} | "
        f"{a['loss_equal_time'].fmt('.4f') if a['loss_equal_time'] else '—'} | "
        f"{t_cell} | {s_cell} | {a['tokens_per_sec'].fmt(',.0f')} | {bench_cell} |")
  out += ["", "Active FLOPs/token are the forward pass's per token, the MTP module's "
          "included where a row has one (it runs in training only; decoding costs the "
          "row without it). KV-cache values per token are summed over the blocks, read "
          "off the built model's cache variables (MTP modules keep no cache).",
          "", f"Equal time: {budget:.0f} s of training, the fastest run's training "
          f"time; threshold: eval loss {threshold:.4f} ("
          + ("set with --threshold" if settings.get("threshold") is not None else
             f"`{BASELINE}`'s final eval loss, mean over seeds" if base else
             "the best final eval loss, no baseline run") + ")."]
  ranked = sorted(aggs, key=lambda a: a["loss"].mean)
  best = ranked[0]
  losers = [a["family"] for a in ranked[1:] if not _noise(a["loss"], best["loss"])]
  behind = ("behind it (one seed: no spread to judge the gaps by)"
            if settings["seeds"] == 1 else
            "behind it by more than the seeds' combined standard deviation")
  out += ["", "## Losing rows", "",
          f"At equal steps the lowest final eval loss is `{best['family']}`'s; "
          + (f"{behind}: {', '.join(f'`{n}`' for n in losers)}." if losers else
             "no other row is behind it by more than the seeds' spread.")]
  timed = [a for a in aggs if a["loss_equal_time"]]
  if timed:
    best_t = min(timed, key=lambda a: a["loss_equal_time"].mean)
    losers_t = [a["family"] for a in timed if a is not best_t
                and not _noise(a["loss_equal_time"], best_t["loss_equal_time"])]
    out.append(f"At equal time ({budget:.0f} s) the lowest is `{best_t['family']}`'s; "
               + (f"{behind}: {', '.join(f'`{n}`' for n in losers_t)}." if losers_t else
                  "no other row is behind it by more than the seeds' spread."))
  out += ["", "## MTP on and off (the main loss)", ""]
  for on, off in MTP_PAIRS:
    for key, what in (("loss", "final eval loss, equal steps"),
                      ("loss_equal_time", "eval loss at equal time")):
      line = _pair_line(by, on, off, key, what)
      if line:
        out.append(line)
  out += ["", "## MLA against multi-head attention", ""]
  for mla, mha in MLA_PAIRS:
    for key, what in (("loss", "final eval loss, equal steps"),
                      ("loss_equal_time", "eval loss at equal time")):
      line = _pair_line(by, mla, mha, key, what)
      if line:
        out.append(line)
    if mla in by and mha in by:
      out.append(f"- KV cache: `{mla}` {by[mla]['kv']:,} values/token against "
                 f"`{mha}` {by[mha]['kv']:,} ({by[mla]['kv'] / by[mha]['kv']:.3f}x).")
  out += ["", "Plots: eval_loss_vs_step.png, eval_loss_vs_time.png (the equal-time "
          "view), throughput.png.", "", *run_section(meta), ""]
  paths = plots.write_plots(workdir, aggs, threshold, label=lambda a: a["family"],
                            color=lambda a: ROW_BY_NAME[a["family"]].color,
                            linestyle=lambda a: "--" if ROW_BY_NAME[a["family"]].mtp
                            else "-")
  return {"markdown": "\n".join(out), "plots": paths}


GRID = grid.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check,
                 build=build_grid, report=report, summarize=summarize,
                 csv_columns=DSV3_CSV_COLUMNS)


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the DeepSeek-V3 grid in ``workdir`` and writes its report."""
  return grid.run_comparison(GRID, settings, workdir, command=command,
                             train_fn=train_fn, log=log)
