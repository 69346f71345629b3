"""The resumable grid runner: one training run per :class:`RunSpec`, in its own folder.

Grid-independent: :func:`run_grid` trains the runs (skipping finished ones, resuming
unfinished ones from their checkpoints), :func:`benchmark_once` times every model's
throughput in interleaved rounds, and the work directory's bookkeeping records each
invocation's wall time and load. :func:`moe_jax.compare.grid.run_comparison` drives
them for every grid.

Layout of a work directory:

* ``runs/NAME/`` -- one run's checkpoints and metrics (:mod:`moe_jax.training.train`),
  plus ``done.json`` (its steps and training seconds) once it finished;
* ``throughput_bench.json`` -- :func:`measure_throughput`'s result;
* ``invocations.jsonl`` -- one line per invocation that trained or benchmarked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a grid; each grid subclasses it with its own fields (e.g.
  :class:`moe_jax.compare.switch_vs_top2.Table1Run`'s family and capacity factor).

  Attributes:
    name: directory name under ``WORKDIR/runs``, the model's name then ``_s`` and the
      seed (e.g. ``switch_cf1.25_s0``).
    seed: the run's seed (init, data order, routing noise).
    config: the full training ConfigDict.
  """

  name: str
  seed: int
  config: Any

  @property
  def model_key(self) -> str:
    """The model the run trains: its name without the seed (``switch_cf1.25``)."""
    return self.name.rsplit("_s", 1)[0]

  def columns(self) -> dict[str, Any]:
    """The grid's own ``results.csv`` columns of this run (e.g. ``family``)."""
    return {}


def cf_name(cf: float) -> str:
  """A capacity factor as run names and reports spell it (``1.0``, ``1.25``)."""
  return f"{cf:g}" if cf != int(cf) else f"{cf:.1f}"


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


def fmt_duration(seconds: float) -> str:
  """``1h02m03s``, ``2m03s`` or ``3s``."""
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _estimate_seconds(run: RunSpec, per_step: dict[str, float]) -> float | None:
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
  ones resume from their checkpoints
  (:func:`moe_jax.training.train.train_and_evaluate`). Before each run a progress line
  gives its index, the elapsed time and an ETA from the measured seconds per step of the
  models trained so far. Stops early, leaving the rest for the next invocation, when a
  run is preempted (SIGTERM).

  Returns:
    ``{"trained": [...names], "skipped": [...], "preempted": bool, "wall_sec": float}``.
  """
  if train_fn is None:
    from moe_jax.training import train  # pylint: disable=import-outside-toplevel
    train_fn = train.train_and_evaluate
  t0 = time.time()
  per_step: dict[str, float] = {}
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
           else f"ETA {fmt_duration(sum(remaining))}")
    index = runs.index(run) + 1
    log(f"[run {index}/{len(runs)}] {run.name} ({len(todo) - i} left; elapsed "
        f"{fmt_duration(time.time() - t0)}, {eta})")
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
                       log: Callable[[str], None] = print,
                       workdir: str | None = None) -> dict[str, list[float]]:
  """Training tokens/s of each model, measured in interleaved rounds.

  The runs' own throughput is measured hours apart, under whatever else the machine
  runs then; here every model (the seed-0 config of each) is compiled first and then
  timed for ``steps`` steps once per round, all models in turn, so a slow phase of the
  machine hits every model alike. Batches are random token ids: the step's cost does
  not depend on the data (capacity fixes the shapes).

  ``workdir`` is the grid's: a run's relative ``data.tokenizer`` path is read from its
  directory there, as in training.

  Returns:
    ``{model_name: [tokens/s of each round]}``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moe_jax.parallel import optimizer_sharding  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build, run_state, train  # pylint: disable=import-outside-toplevel

  models: dict[str, tuple] = {}
  for run in runs:
    name = run.model_key
    if name in models:
      continue
    c = run.config
    model = build.make_model(c, vocab_size=build.vocab_size_of(
        c, workdir=run_dir(workdir, run) if workdir else None))
    tx, _ = build.make_optimizer(c)
    _, params, _ = run_state.split_model(model)
    state = run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer_sharding.init_optimizer_state(tx, params),
                             rng=jax.random.key_data(jax.random.key(c.seed)),
                             # Selection biases from the start: the step returns them,
                             # and a state without them would compile a second time.
                             model_state=run_state.model_state(model))
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


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The JSON lines of ``path`` ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def benchmark_once(runs: Sequence[RunSpec], workdir: str, *, steps: int,
                   rounds: int | None,
                   log: Callable[[str], None] = print) -> bool:
  """Writes :func:`measure_throughput` to ``workdir/throughput_bench.json`` once.

  Only when ``rounds`` is set, every run has finished and no benchmark exists yet, so
  every model is timed in the same interleaved rounds. Returns whether it ran.
  """
  path = os.path.join(workdir, BENCH_FILE)
  if not rounds or os.path.exists(path) or not all(is_done(workdir, r) for r in runs):
    return False
  log(f"Interleaved throughput benchmark: {rounds} rounds of {steps} steps per model.")
  bench = measure_throughput(runs, steps=steps, rounds=rounds, log=log, workdir=workdir)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(bench, f, indent=1)
  return True


def read_benchmark(workdir: str) -> dict[str, list[float]] | None:
  """``throughput_bench.json`` of ``workdir`` (None before the benchmark ran)."""
  path = os.path.join(workdir, BENCH_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


INVOCATIONS_FILE = "invocations.jsonl"


def record_invocation(workdir: str, entry: dict[str, Any]) -> None:
  """Appends one invocation's ``entry`` (wall time, load, what it did) to
  ``workdir/invocations.jsonl``."""
  with open(os.path.join(workdir, INVOCATIONS_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry) + "\n")


def read_invocations(workdir: str) -> list[dict[str, Any]]:
  """Every invocation recorded in ``workdir`` so far, oldest first."""
  return read_jsonl(os.path.join(workdir, INVOCATIONS_FILE))
