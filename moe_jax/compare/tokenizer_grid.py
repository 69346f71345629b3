"""A subword tokenizer against bytes on one model, in bits per byte: the grid.

Two rows train the same config file (``switch_small`` by default) on the same source,
differing only in ``data.tokenizer``:

* ``byte`` -- the byte tokenizer (256 ids and the specials);
* ``bpe`` -- a byte-level BPE (``bpe_tokenizer``: a ``tokenizer.json``, its path
  relative to the grid's work directory; ``experiments/compare_tokenizers.py`` trains
  it on the source's training split first).

The model's vocabulary comes from the tokenizer, so the BPE row has a larger embedding
and output layer (its extra FLOPs per token are in the table). A step is the same
``batch x seq_len`` tokens in both rows, so at equal steps the BPE row has read more
text; losses in nats per token do not compare across tokenizers, so the report ranks on
``eval_bits_per_byte`` (bits per UTF-8 byte of the eval text) at equal steps and at an
equal training-time budget. Training time is steps over the interleaved benchmark's
steps per second when the preset benchmarks (every row timed in the same rounds, so a
shared machine's load falls on both alike), else over the run's own training
throughput. ``experiments/compare_tokenizers.py`` is the command line;
docs/results/data_cpu/tokenizers/ holds the results.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any, Callable

from moe_jax.compare import grid, runner
from moe_jax.compare.aggregation import (Stat, aggregate, equal_time_budget,
                                         train_seconds, value_at_time)
from moe_jax.compare.report import CSV_COLUMNS, run_section, stderr_cell
from moe_jax.compare.router_rows import load_row_config
from moe_jax.compare.runner import RunSpec
from moe_jax.training.config import set_keys

ROWS = ("byte", "bpe")
COLORS = {"byte": "tab:blue", "bpe": "tab:orange"}

PRESETS: dict[str, dict[str, Any]] = {
    # The whole path in CI: tiny shapes, one seed, no benchmark.
    "smoke": dict(
        steps=2, seeds=1, config="switch_small", bpe_vocab_size=300,
        model_overrides={"model.num_layers": 2, "model.d_model": 32,
                         "model.num_heads": 2, "model.d_ff": 64},
        seq_len=32, batch_size=4, learning_rate=3e-3, warmup_steps=1, eval_every=1,
        eval_steps=1, final_eval_steps=1, log_every=1, checkpoint_every=2,
        bench_steps=0, bench_rounds=0),
    # The config's own shapes and schedule (600 steps of 16 x 128 tokens), 2 seeds, a
    # BPE of 4096; the final eval scores the whole validation split.
    "cpu_small": dict(
        steps=600, seeds=2, config="switch_small", bpe_vocab_size=4096,
        model_overrides={}, seq_len=128, batch_size=16, learning_rate=2e-3,
        warmup_steps=50, eval_every=50, eval_steps=8, final_eval_steps=0, log_every=25,
        checkpoint_every=100, bench_steps=10, bench_rounds=3),
}
# bpe_tokenizer: the BPE's tokenizer.json, relative to the work directory (the command
# line sets it to the one it trained); configs_dir: experiments/configs.
OPTIONAL_SETTINGS = {"dataset": None, "configs_dir": None, "bpe_tokenizer": None}
TOKENIZER_CSV_COLUMNS = CSV_COLUMNS + (
    "row", "tokenizer", "vocab_size", "eval_bits_per_byte", "bits_per_byte_at_equal_time",
    "equal_time_sec", "seconds_per_step")


@dataclasses.dataclass(frozen=True)
class TokenizerRun(RunSpec):
  """A run of the grid: its row."""

  row: str = ""

  def columns(self) -> dict[str, Any]:
    return {"family": self.row, "paper_model": self.config.name if "name" in self.config
            else "", "row": self.row, "tokenizer": self.config.data.tokenizer}


def bpe_spec(settings: dict[str, Any]) -> str:
  """The BPE row's ``data.tokenizer``: ``hf:`` and the tokenizer's path relative to a
  run's directory (``WORKDIR/runs/NAME``), so the runs' configs name no absolute path."""
  return "hf:" + os.path.join("..", "..", settings["bpe_tokenizer"])


def make_config(settings: dict[str, Any], row: str, seed: int):
  """The training config of one run: the config file, the preset's shape overrides and
  training settings, and the row's tokenizer."""
  c = load_row_config(settings["config"], settings["configs_dir"])
  set_keys(c, settings["model_overrides"])
  grid.set_training(c, settings, seed)
  c.data.tokenizer = "byte" if row == "byte" else bpe_spec(settings)
  return c


def build_grid(settings: dict[str, Any]) -> list[TokenizerRun]:
  """Every (row, seed) run, seed-major so a partial grid covers both rows."""
  return [TokenizerRun(f"{row}_s{seed}", seed, make_config(settings, row, seed), row=row)
          for seed in range(settings["seeds"]) for row in ROWS]


def _check(settings: dict[str, Any]) -> list[str]:
  if not settings["configs_dir"]:
    return ["configs_dir is unset; pass the directory of the config files "
            "(configs_dir=\"experiments/configs\")."]
  if not settings["bpe_tokenizer"]:
    return ["bpe_tokenizer is unset; pass the BPE's tokenizer.json relative to the work "
            "directory (experiments/compare_tokenizers.py trains one)."]
  if not (isinstance(settings["bpe_vocab_size"], int) and settings["bpe_vocab_size"] > 258):
    return [f"--bpe_vocab_size={settings['bpe_vocab_size']!r} must be more than 258 "
            "(the 256 bytes and 2 specials)."]
  return []


def resolve_settings(preset: str, **overrides) -> dict[str, Any]:
  """The preset's settings with every non-None override applied.

  Raises:
    ValueError: unknown preset, unknown override, or a value that cannot work.
  """
  return grid.resolve_settings(GRID, preset, **overrides)


def vocab_and_bytes_per_token(spec: str, texts, base_dir: str | None = None
                               ) -> tuple[int, float]:
  """The vocabulary of the tokenizer ``spec`` and the UTF-8 bytes per token it makes of
  ``texts`` (no specials)."""
  from moe_jax.data.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
  tok = make_tokenizer(spec, base_dir=base_dir)
  docs = [t if isinstance(t, str) else bytes(t).decode("utf-8", errors="replace")
          for t in texts]
  tokens = sum(len(tok.encode(d)) for d in docs)
  return tok.vocab_size, sum(len(d.encode("utf-8")) for d in docs) / max(tokens, 1)


def report(workdir: str, runs, rows, settings: dict[str, Any],
           meta: dict[str, Any]) -> dict[str, Any]:
  """``report.md``'s text and the plots."""
  from moe_jax.data.sources import load_text_source  # pylint: disable=import-outside-toplevel
  bench = runner.read_benchmark(workdir)
  for r in rows:
    model = r["run"].rsplit("_s", 1)[0]
    tps = (bench or {}).get(model)
    r["seconds_per_step"] = (r["tokens_per_step"] / statistics.median(tps) if tps
                             else None)
    r["quality"] = -r["eval_bits_per_byte"]
  budget = equal_time_budget(rows)
  for r in rows:
    r["equal_time_sec"] = budget
    r["bits_per_byte_at_equal_time"] = value_at_time(r, budget, "bpb_curve")
  aggs = aggregate(rows, bench, order=lambda key: ROWS.index(key[0]))
  c0 = runs[0].config
  source = load_text_source(c0.data.name)
  by, bpt = {}, {}
  for a in aggs:
    at_t = [r["bits_per_byte_at_equal_time"] for r in a["rows"]]
    a["bpb_equal_time"] = Stat(at_t) if None not in at_t else None
    a["vocab"], bpt[a["family"]] = vocab_and_bytes_per_token(
        a["rows"][0]["tokenizer"], source.eval, runner.run_dir(workdir, runs[0]))
    for r in a["rows"]:
      r["vocab_size"] = a["vocab"]
    by[a["family"]] = a
  time_axis = ("steps / the interleaved benchmark's steps per second (median of its "
               "rounds)" if bench else "steps / the run's training steps per second")
  out = [f"# {settings['bpe_vocab_size']}-token BPE against bytes on "
         f"`{settings['config']}`, in bits per byte", "",
         f"Command: `{meta.get('command', '')}`", "",
         f"Preset `{settings['preset']}`: {settings['steps']} steps of "
         f"{c0.batch_size} x {c0.data.seq_len} tokens on `{c0.data.name}`, "
         f"{settings['seeds']} seed(s), the same init rule and data order. A step is "
         "the same number of tokens in both rows, so the BPE row reads more text per "
         "step. Bits per byte are of the eval text's UTF-8 bytes (the final eval scores "
         + ("the whole validation split" if settings["final_eval_steps"] == 0 else
            f"{settings['final_eval_steps']} fixed batches")
         + f"). Training time is {time_axis}.", ""]
  if "PARTIAL" in meta:
    out += [f"**PARTIAL**: {meta['PARTIAL']}.", ""]
  out += ["| row | tokenizer | vocab | params | active FLOPs/token | eval bytes/token | "
          "active FLOPs/byte | final eval bits/byte | eval stderr (nats/token) | "
          "eval loss (nats/token) | bits/byte at equal time | train tokens/s | "
          "bench tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for a in aggs:
    name = a["family"]
    tps = (bench or {}).get(a["rows"][0]["run"].rsplit("_s", 1)[0])
    out.append(
        f"| `{name}` | `{a['rows'][0]['tokenizer']}` | {a['vocab']:,} | "
        f"{a['params_total']:,} | {a['flops_per_token_active']:,} | {bpt[name]:.2f} | "
        f"{a['flops_per_token_active'] / bpt[name]:,.0f} | "
        f"{a['bits_per_byte'].fmt('.4f')} | {stderr_cell(a['eval_stderr'])} | "
        f"{Stat([r['final_eval_loss'] for r in a['rows']]).fmt('.4f')} | "
        f"{a['bpb_equal_time'].fmt('.4f') if a['bpb_equal_time'] else '—'} | "
        f"{a['tokens_per_sec'].fmt(',.0f')} | "
        f"{Stat(tps).fmt(',.0f') if tps else '—'} |")
  out += ["", f"Equal time: {budget:.0f} s of training, the fastest run's training time."]
  if settings["final_eval_steps"] != settings["eval_steps"]:
    out += ["", f"The evaluations before the last score {settings['eval_steps'] or 'all'} "
            "fixed batches, and a batch of BPE tokens holds more text than one of "
            "bytes, so only the final evaluation (the same text for both rows) compares "
            "exactly; an equal-time value that falls between a run's last two "
            "evaluations interpolates between the two kinds (the step in the curves at "
            "the last point is that change of eval set)."]
  out += ["", "## Which wins", ""]
  if "byte" in by and "bpe" in by:
    for key, what in (("bits_per_byte", "equal steps"),
                      ("bpb_equal_time", f"equal time ({budget:.0f} s)")):
      a, b = by["bpe"][key], by["byte"][key]
      if a is None or b is None:
        continue
      paired = _paired(by, key)
      spread = ("" if paired is None else f" (paired over seeds: {paired.mean:+.4f}"
                + (f" ± {paired.std:.4f})" if paired.std is not None else ")"))
      noise = paired is not None and paired.std is not None and abs(paired.mean) < (
          paired.std)
      out.append(f"- At {what}: BPE {a.fmt('.4f')} against bytes {b.fmt('.4f')} bits "
                 f"per byte, BPE − bytes {a.mean - b.mean:+.4f}{spread}: "
                 f"{'BPE' if a.mean < b.mean else 'bytes'} lower"
                 + (", within the seeds' spread" if noise else "") + ".")
  out += ["", "Plot: bits_per_byte.png (eval bits per byte against step and against "
          "training time, one line per seed).", "", *run_section(meta), ""]
  return {"markdown": "\n".join(out), "plots": [_bpb_plot(workdir, aggs)]}


def _paired(by, key: str) -> Stat | None:
  """BPE minus bytes of the same seed, over the seeds both rows have."""
  col = {"bits_per_byte": "eval_bits_per_byte",
         "bpb_equal_time": "bits_per_byte_at_equal_time"}[key]
  seeds = {r["seed"]: r[col] for r in by["byte"]["rows"]}
  diffs = [r[col] - seeds[r["seed"]] for r in by["bpe"]["rows"] if r["seed"] in seeds]
  return Stat(diffs) if diffs else None


def _bpb_plot(workdir: str, aggs) -> str:
  """bits_per_byte.png: eval bits per byte against step and against training time."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, xkind in zip(axes, ("step", "time")):
    for a in aggs:
      for i, r in enumerate(a["rows"]):
        xs = [s if xkind == "step" else train_seconds(r, s) for s, _ in r["bpb_curve"]]
        ax.plot(xs, [v for _, v in r["bpb_curve"]], color=COLORS[a["family"]],
                alpha=0.85, label=a["family"] if i == 0 else None)
    ax.set_xlabel("training step" if xkind == "step" else "training seconds")
    ax.set_ylabel("eval bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, "bits_per_byte.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


GRID = grid.Grid(presets=PRESETS, optional=OPTIONAL_SETTINGS, check=_check,
                 build=build_grid, report=report,
                 csv_columns=TOKENIZER_CSV_COLUMNS)


def run_comparison(settings: dict[str, Any], workdir: str, *, command: str = "",
                   train_fn: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the tokenizer grid in ``workdir`` and writes its report."""
  return grid.run_comparison(GRID, settings, workdir, command=command,
                             train_fn=train_fn, log=log)
