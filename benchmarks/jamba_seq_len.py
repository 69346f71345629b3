r"""Training tokens/s and peak memory against sequence length: jamba_small against an
attention-only model with the same active parameters.

For each ``--seq_lens`` L, both models' jitted train steps (forward, backward, AdamW
update; ``moe_jax.training.train.make_train_step``) are compiled on the same random
batch of ``--tokens_per_step`` tokens (batch ``tokens_per_step // L`` rows, at least 1),
then timed interleaved (jamba, attention, jamba, ...) so machine noise hits both alike.
Reported per model and L: the median step time, tokens/s, and the compiled step's
peak memory from XLA's memory analysis (arguments + outputs + temporaries - donated
aliases: weights, optimizer state, batch and activations), plus the active forward
FLOPs per token. Data loading is left out.

The attention-only baseline is the jamba config with every mixer attention
(``attn_layer_period=1, attn_layer_offset=0``) and rotary positions (an attention-only
LM needs positions; Jamba's Mamba layers carry the order instead), and everything else
the same: width, heads, the MoE pattern, the 16 experts of the same width, top-2. Its
7 attention mixers have fewer weights than Jamba's 7 Mamba mixers (4 M^2 against
``mamba.mixer_cost``), so the width of its dense (non-MoE) FFNs, ``model.d_ff``, is
raised until its active parameters per token (``count_params``) match jamba's as
closely as multiples of 8 allow; the experts keep their width (``moe.d_ff`` pinned).
Both counts are in the output. The match is on parameters, not FLOPs: the attention
term ``4 L M`` per layer grows with L and Mamba's scan does not, which is what the
curves show.

A configuration whose compiled step would need more than ``--max_gib`` is skipped with
its size (attention's ``[B, heads, L, L]`` scores grow as L^2 per row).

  python benchmarks/jamba_seq_len.py --json=jamba_seq_len.json \
      --markdown=jamba_seq_len.md
  python benchmarks/jamba_seq_len.py --seq_lens=256,1024 --repeats=3
  # Table and plot again from a written JSON, measuring nothing:
  python benchmarks/jamba_seq_len.py --from_json=jamba_seq_len.json \
      --markdown=jamba_seq_len.md --png=jamba_seq_len.png
"""

from __future__ import annotations

import json
import platform
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import configs as config_files  # benchmarks/configs.py
import harness  # benchmarks/harness.py
from moe_jax.training import build as build_lib, train as train_lib
from moe_jax.training.config import check_config, expert_d_ff
from moe_jax.models.sizes import count_params, flops_per_token

_CONFIG = flags.DEFINE_string("config", "jamba_small", "The hybrid config of "
                              "experiments/configs/ (the baseline is derived from it).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "512", "1024", "2048", "4096"],
                              "Sequence lengths L.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 8192, "Tokens per train step; the "
                               "batch is tokens_per_step // L rows (at least 1).",
                               lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed interleaved rounds per L.",
                                lower_bound=1)
_OVERRIDES = flags.DEFINE_list("config_overrides", [], "KEY=VALUE overrides applied to "
                               "the hybrid config before the baseline is derived, e.g. "
                               "model.num_layers=4,model.d_model=64.")
_MAX_GIB = flags.DEFINE_float("max_gib", 16.0, "Skip a model at an L whose compiled step "
                              "needs more memory than this (GiB).", lower_bound=0.0)
_JSON = flags.DEFINE_string("json", None, "Write meta and rows as JSON to this file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the Markdown table to this file.")
_PNG = flags.DEFINE_string("png", None, "Plot tokens/s and peak memory against L to this "
                           "PNG file.")
_FROM_JSON = flags.DEFINE_string("from_json", None, "Measure nothing: read meta and rows "
                                 "from this JSON (as --json writes it) and write the "
                                 "table and the plot.")

HYBRID, ATTENTION = "jamba", "attention"


def _active_params(config) -> int:
  model = nnx.eval_shape(lambda: build_lib.make_model(config))  # shapes only
  return count_params(model)["active"]


def attention_baseline(config):
  """``(baseline config, its active params, the hybrid's)``: ``config`` with every
  mixer attention, rotary positions, the experts' width pinned and the dense FFN width
  chosen (a multiple of 8) to match the hybrid's active parameters."""
  target = _active_params(config)
  base = config.copy_and_resolve_references()
  base.model.attn_layer_period, base.model.attn_layer_offset = 1, 0
  base.model.position = "rotary"
  base.moe.d_ff = expert_d_ff(config)
  d0 = base.model.d_ff
  # Active parameters are linear in the dense FFN width: solve, then round to 8.
  a0 = _active_params(base)
  base.model.d_ff = d0 + 8
  slope = (_active_params(base) - a0) / 8
  if slope <= 0:  # no dense FFN block: nothing to widen
    base.model.d_ff = d0
    return base, a0, target
  base.model.d_ff = max(8, d0 + round((target - a0) / slope / 8) * 8)
  return base, _active_params(base), target


def _batch(config, batch_size: int, seq_len: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(batch_size, seq_len + 1), dtype=np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def build(config, seq_len: int, batch_size: int) -> dict:
  """A compiled train step for ``config`` at ``seq_len``, its state and batch, its
  memory analysis; ``skipped`` instead of the step when it needs more than
  ``--max_gib``."""
  config = config.copy_and_resolve_references()
  config.data.seq_len, config.batch_size = seq_len, batch_size
  check_config(config, num_devices=1)
  model = build_lib.make_model(config)
  tx, _ = build_lib.make_optimizer(config)
  state, state_sharding = train_lib.init_train_state(model, tx, seed=config.seed)
  batch = _batch(config, batch_size, seq_len)
  compiled = train_lib.make_train_step(model, tx, config, state_sharding=state_sharding
                                       ).lower(state, batch).compile()
  out = {"flops_per_token_active": flops_per_token(model, seq_len)["active"],
         "params_active": count_params(model)["active"]}
  try:
    m = compiled.memory_analysis()
    out.update(
        peak_bytes=int(m.argument_size_in_bytes + m.output_size_in_bytes
                       + m.temp_size_in_bytes - m.alias_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes))
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    out.update(peak_bytes=None, temp_bytes=None)
  if out["peak_bytes"] is not None and out["peak_bytes"] > _MAX_GIB.value * 2**30:
    out["skipped"] = (f"needs {out['peak_bytes'] / 2**30:.2f} GiB > --max_gib="
                      f"{_MAX_GIB.value:g}")
    return out
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  out.update(step=compiled, state=state, batch=batch)
  return out


def measure(configs: dict, seq_len: int) -> list[dict]:
  """One row per model at ``seq_len``; timed rounds interleave the models."""
  batch_size = max(1, _TOKENS.value // seq_len)
  runs = {name: build(c, seq_len, batch_size) for name, c in configs.items()}
  live = {n: r for n, r in runs.items() if "skipped" not in r}
  times = harness.interleaved_step_times(live, _REPEATS.value)
  rows = []
  for name, run in runs.items():
    row = dict(model=name, seq_len=seq_len, batch_size=batch_size,
               tokens=batch_size * seq_len, peak_bytes=run["peak_bytes"],
               temp_bytes=run["temp_bytes"], params_active=run["params_active"],
               flops_per_token_active=run["flops_per_token_active"])
    if name in live:
      med = statistics.median(times[name])
      row.update(step_ms=med * 1e3, tokens_per_sec=batch_size * seq_len / med)
    else:
      row["skipped"] = run["skipped"]
    rows.append(row)
  return rows


def crossing(rows: list[dict], key: str, higher_is_better: bool) -> int | None:
  """The shortest measured L from which jamba is better than attention on ``key`` at
  every longer measured L (both measured), or None."""
  by_len = {}
  for r in rows:
    if key in r and r[key] is not None:
      by_len.setdefault(r["seq_len"], {})[r["model"]] = r[key]
  lens = sorted(l for l, v in by_len.items() if len(v) == 2)
  better = [(by_len[l][HYBRID] > by_len[l][ATTENTION]) if higher_is_better
            else (by_len[l][HYBRID] < by_len[l][ATTENTION]) for l in lens]
  start = None
  for l, b in zip(lens, better):
    start = (start or l) if b else None
  return start


def to_markdown(data: dict) -> str:
  meta, rows = data["meta"], data["rows"]
  mib = lambda v: "n/a" if v is None else f"{v / 2**20:.0f}"
  out = [f"backend `{meta['backend']}` ({meta['device']}), jax {meta['jax']}, "
         f"{meta['tokens_per_step']} tokens per step, median of {meta['repeats']} "
         f"interleaved steps. {meta['config']}: {meta['params_active'][HYBRID]:,} active "
         f"parameters; attention-only baseline (model.d_ff={meta['baseline_d_ff']}): "
         f"{meta['params_active'][ATTENTION]:,}.", "",
         "| L | batch | jamba tokens/s | attention tokens/s | jamba / attention | "
         "jamba peak MiB | attention peak MiB | jamba GFLOP/token | attention "
         "GFLOP/token |", "|---|---|---|---|---|---|---|---|---|"]
  for l in sorted({r["seq_len"] for r in rows}):
    pair = {r["model"]: r for r in rows if r["seq_len"] == l}
    h, a = pair[HYBRID], pair[ATTENTION]
    tps = lambda r: f"{r['tokens_per_sec']:.0f}" if "tokens_per_sec" in r else (
        f"skipped ({r['skipped']})")
    ratio = (f"{h['tokens_per_sec'] / a['tokens_per_sec']:.2f}"
             if "tokens_per_sec" in h and "tokens_per_sec" in a else "-")
    out.append(f"| {l} | {h['batch_size']} | {tps(h)} | {tps(a)} | {ratio} | "
               f"{mib(h['peak_bytes'])} | {mib(a['peak_bytes'])} | "
               f"{h['flops_per_token_active'] / 1e9:.4f} | "
               f"{a['flops_per_token_active'] / 1e9:.4f} |")
  for what, key, hib in (("tokens/s", "tokens_per_sec", True),
                         ("peak memory", "peak_bytes", False)):
    at = crossing(rows, key, hib)
    out.append("")
    out.append(f"Crossing ({what}): jamba_small is ahead from L={at} on." if at else
               f"Crossing ({what}): jamba_small is not ahead at the longest measured L.")
  return "\n".join(out) + "\n"


def plot(data: dict, path: str) -> None:
  """Tokens/s and peak memory of both models against L (log-log), one panel each."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label, scale in ((axes[0], "tokens_per_sec", "training tokens/s", 1),
                                (axes[1], "peak_bytes", "compiled step peak MiB",
                                 2**-20)):
    for model in (HYBRID, ATTENTION):
      pts = sorted((r["seq_len"], r[key] * scale) for r in data["rows"]
                   if r["model"] == model and r.get(key) is not None)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              label=f"{data['meta']['config']}" if model == HYBRID
              else "attention-only, same active params")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  meta = data["meta"]
  fig.suptitle(f"{meta['tokens_per_step']} tokens per step (batch tokens/L, at least "
               f"1 row), median of {meta['repeats']}, {meta['backend']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  if _FROM_JSON.value:
    with open(_FROM_JSON.value, encoding="utf-8") as f:
      data = json.load(f)
    harness.write_results(data, markdown_path=_MARKDOWN.value, to_markdown=to_markdown)
    if _PNG.value:
      plot(data, _PNG.value)
    return
  for v in _SEQ_LENS.value:
    if not v.isdigit() or int(v) < 1:
      raise app.UsageError(f"--seq_lens: {v!r} is not a positive integer.")
  hybrid = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
  hybrid.progress_bar = False
  baseline, base_active, hybrid_active = attention_baseline(hybrid)
  configs = {HYBRID: hybrid, ATTENTION: baseline}
  meta = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
              cpu=platform.processor() or platform.machine(), jax=jax.__version__,
              config=_CONFIG.value, config_overrides=list(_OVERRIDES.value),
              tokens_per_step=_TOKENS.value, repeats=_REPEATS.value,
              baseline_d_ff=baseline.model.d_ff, expert_d_ff=baseline.moe.d_ff,
              params_active={HYBRID: hybrid_active, ATTENTION: base_active})
  print(f"# {_CONFIG.value}: {hybrid_active:,} active params; attention-only with "
        f"model.d_ff={baseline.model.d_ff}: {base_active:,}", flush=True)
  rows = []
  for l in sorted(int(v) for v in _SEQ_LENS.value):
    rows.extend(measure(configs, l))
    print(f"# L={l} done", flush=True)
  data = dict(meta=meta, rows=rows)
  harness.write_results(data, json_path=_JSON.value, markdown_path=_MARKDOWN.value,
                        to_markdown=to_markdown)
  if _PNG.value:
    plot(data, _PNG.value)


if __name__ == "__main__":
  app.run(main)
