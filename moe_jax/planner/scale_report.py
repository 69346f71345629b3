"""The scale-plan report (``docs/results/scale_plan/``): markdown tables and the
memory figure, from the rows that :mod:`moe_jax.planner.scale` compiled.

Rows are JSON objects, one per compile: ``part`` ("train", "serve", "dispatch"),
``config``, ``chip``, ``topology``, ``fits`` and, when the compile succeeded, the
plan's keys (:func:`moe_jax.planner.compile.plan`); ``error`` when it did not.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from moe_jax.planner import memory_report
from moe_jax.planner.table import human_bytes, human_count

GiB = 2 ** 30


def _gib(n) -> str:
  return "-" if n is None else f"{n / GiB:.1f}"


# Marks a peak that is arguments + outputs + temp - alias rather than the compiler's
# own (rows compiled before the planner read it; on TPU that sum overstates the peak).
SUM_PEAK_MARK = "*"


def _peak_cell(r) -> str:
  memory = r.get("memory") or r.get("prefill", {}).get("memory") or {}
  mark = "" if memory.get("peak_source") == "compiler" else SUM_PEAK_MARK
  return f"{_gib(r['bytes_per_device']['peak'])}{mark}"


def _a2a(row) -> float:
  c = row.get("collectives", {})
  return sum(v["bytes"] for k, v in c.items() if "all-to-all" in k)


def _mesh(row) -> str:
  """``fsdp8 expert64``: the mesh axes above 1."""
  return " ".join(f"{k}{v}" for k, v in row["mesh"].items() if v > 1) or "one device"


def _fit_row(rows, part, config, chip):
  fits = [r for r in rows if r["part"] == part and r["config"] == config
          and r["chip"] == chip and r.get("fits")]
  return min(fits, key=lambda r: r["devices"]) if fits else None


def _tried(rows, part, config, chip) -> str:
  out = []
  for r in sorted((r for r in rows if r["part"] == part and r["config"] == config
                   and r["chip"] == chip), key=lambda r: r["devices"]):
    out.append(f"{r['topology']} {'fits' if r.get('fits') else 'no'}")
  return ", ".join(out)


def _search_table(rows, part: str, configs, chips, columns: Sequence[str],
                  cells) -> str:
  """One row per config and chip: ``cells(row)`` of the smallest fitting compile, or
  why there is none, then the compiles the search made."""
  lines = ["| config | chip | smallest topology (devices) | mesh | " +
           " | ".join(columns) + " | compiles tried |",
           "|" + "---|" * (len(columns) + 5)]
  for config in configs:
    for chip in chips:
      r = _fit_row(rows, part, config, chip)
      tried = _tried(rows, part, config, chip)
      if r is None:
        what = "none fits" if tried else "not compiled in this run"
        lines.append(f"| {config} | {chip} | {what} | |" + " |" * len(columns) +
                     f" {tried} |")
        continue
      lines.append(f"| {config} | {chip} | {r['topology']} ({r['devices']}) | "
                   f"{_mesh(r)} | " + " | ".join(cells(r)) + f" | {tried} |")
  return "\n".join(lines)


def _kernel(row) -> str:
  """A row's attention kernel (rows from before the key: dense)."""
  return row.get("attention_kernel", "dense")


def training_setting(row) -> tuple[str, int]:
  """(attention kernel, loss chunk) of a training row, chunk 0 for the whole logits
  at once (rows from before these keys: dense, 0)."""
  return _kernel(row), row.get("loss_chunk", 0)


def serving_setting(row) -> tuple[str, int, str]:
  """(attention kernel, prefill chunk, serving mesh rule) of a serving row, chunk 0
  for a prefill of the whole context at once (rows from before these keys: dense,
  whole, ``"tensor"``; planner.scale.SERVING_MESHES)."""
  return _kernel(row), row.get("serve_chunk", 0), row.get("serve_mesh", "tensor")


# The setting of a search, by part: a search made with another setting is an earlier
# one, which the report lists below the current.
SETTINGS = {"train": training_setting, "serve": serving_setting}


def split_searches(rows, part: str) -> tuple[list[dict], list[dict]]:
  """(current, replaced) rows of ``part``: per config and chip, the rows of its newest
  search (the setting of its last row), and the rows of earlier searches of the same
  config and chip with another setting."""
  setting = SETTINGS[part]
  these = [r for r in rows if r["part"] == part]
  newest = {(r["config"], r["chip"]): setting(r) for r in these}
  current = [r for r in these if setting(r) == newest[(r["config"], r["chip"])]]
  return current, [r for r in these if setting(r) != newest[(r["config"], r["chip"])]]


def _chunk(chunk: int, whole: str) -> str:
  return str(chunk) if chunk else whole


def _earlier(old, part, configs, chips, columns, cells, intro) -> str:
  """The earlier searches of ``part``: per config, chip and setting, the smallest fit
  and the compiles tried; ``cells(setting)`` are the setting's columns."""
  if not old:
    return ""
  lines = ["", "", intro, "", "| config | chip | " + " | ".join(columns) +
           " | smallest fit | compiles tried |", "|" + "---|" * (len(columns) + 4)]
  for config in configs:
    for chip in chips:
      for setting in sorted({SETTINGS[part](r) for r in old
                             if (r["config"], r["chip"]) == (config, chip)}):
        these = [r for r in old if SETTINGS[part](r) == setting]
        fit = _fit_row(these, part, config, chip)
        smallest = f"{fit['topology']} ({fit['devices']})" if fit else "none"
        lines.append(f"| {config} | {chip} | " + " | ".join(cells(setting)) +
                     f" | {smallest} | {_tried(these, part, config, chip)} |")
  return "\n".join(lines)


def train_table(rows, configs: Sequence[str], chips: Sequence[str]) -> str:
  """The training searches (each config and chip's newest; see
  :func:`split_searches`), then the earlier searches they replaced."""
  current, old = split_searches(rows, "train")

  def cells(r):
    b = r["bytes_per_device"]
    return [r.get("mesh_reason", ""), _kernel(r),
            _chunk(r.get("loss_chunk", 0), "whole"), human_count(r["tokens_per_step"]),
            f"{_gib(b['params'])} / {_gib(b['optimizer'])} / {_gib(b['temp'])} / "
            f"{_peak_cell(r)}", _largest(r), human_count(r["flops_per_step"]),
            human_count(r["flops_per_step_model"]), human_bytes(_a2a(r)),
            f"{r['compile_s']:.0f}", f"{r['step_s_bound']:.3g}",
            f"{100 * (r['mfu_bound'] or 0):.0f}%"]

  table = _search_table(current, "train", configs, chips, [
      "why", "attention kernel", "loss chunk", "tokens/step",
      "params / optimizer / temp / peak per device (GiB)", "largest buffer",
      "FLOPs/step compiled", "FLOPs/step model", "all-to-all / device", "compile (s)",
      "step bound (s)", "MFU bound"], cells)
  return table + _earlier(
      old, "train", configs, chips, ["attention kernel", "loss chunk"],
      lambda s: [s[0], _chunk(s[1], "whole")],
      "Earlier searches, replaced by the ones above (the dense kernel saves each "
      "sequence's whole score matrix; an unchunked loss holds its whole logits):")


def serve_table(rows, configs, chips) -> str:
  """The serving searches (each config and chip's newest; see :func:`split_searches`),
  then the earlier searches they replaced."""
  current, old = split_searches(rows, "serve")

  def cells(r):
    b = r["bytes_per_device"]
    return [_kernel(r), f"{r['serve_batch']} x {human_count(r['serve_len'])}",
            _chunk(r.get("serve_chunk", 0), "whole context"),
            f"{_gib(b['params'])} / {_gib(b['kv_cache'])} / {_peak_cell(r)}",
            f"{1e3 * r['step_s_bound']:.2f}",
            f"{r['prefill']['compile_s']:.0f} + {r['decode']['compile_s']:.0f}"]

  table = _search_table(current, "serve", configs, chips, [
      "attention kernel", "batch x context", "prefill chunk",
      "weights / KV cache / peak per device "
      "(GiB)", "decode step bound (ms)", "prefill compile + decode compile (s)"], cells)
  return table + _earlier(
      old, "serve", configs, chips, ["attention kernel", "prefill chunk", "serving mesh"],
      lambda s: [s[0], _chunk(s[1], "whole context"), f"{s[2]} first"],
      "Earlier searches, replaced by the ones above (the dense kernel holds the whole "
      "score matrix; an unchunked prefill holds the whole context's activations):")


def other_rules(rows, fit) -> list[dict]:
  """The compiles of ``fit``'s config, chip and topology with its kernel and prefill
  chunk but another serving mesh rule (``part`` "serve_rule", or an earlier search's
  "serve" row)."""
  kernel, chunk, rule = serving_setting(fit)
  return [r for r in rows if r["part"] in ("serve", "serve_rule")
          and (r["config"], r["chip"], r["topology"]) ==
          (fit["config"], fit["chip"], fit["topology"])
          and serving_setting(r)[:2] == (kernel, chunk) and serving_setting(r)[2] != rule]


def serve_rules_table(rows) -> str:
  """Each serving fit (the current search's) against the other serving mesh rules
  compiled at its topology with its kernel and prefill chunk (:func:`other_rules`)."""
  current = split_searches(rows, "serve")[0]
  fits = [_fit_row(current, "serve", config, chip)
          for config, chip in sorted({(r["config"], r["chip"]) for r in current})]
  pairs = [(fit, r) for fit in fits if fit is not None for r in other_rules(rows, fit)
           if r.get("mesh") != fit["mesh"]]  # one device: the rules give the same mesh
  if not pairs:
    return ("No other mesh rule was compiled at a serving fit's topology (`python "
            "experiments/scale_plan.py --parts=serve_rules`).")

  def cell(r):
    if "bytes_per_device" not in r:
      need = r.get("peak_needed")
      return f"does not fit ({_gib(need)} GiB)" if need else "does not compile"
    return (f"{_mesh(r)}: {_peak_cell(r)} GiB, decode bound "
            f"{1e3 * r['step_s_bound']:.2f} ms{'' if r['fits'] else ' (does not fit)'}")

  lines = ["| config | chip | topology | the search's rule | its plan | other rule | "
           "its plan |", "|" + "---|" * 7]
  for fit, r in pairs:
    lines.append(f"| {fit['config']} | {fit['chip']} | {fit['topology']} | "
                 f"{serving_setting(fit)[2]} first | {cell(fit)} | "
                 f"{serving_setting(r)[2]} first | {cell(r)} |")
  return "\n".join(lines)


def dispatch_table(rows) -> str:
  head = ("| config | chip | topology | dispatch | attention kernel | compiled FLOPs/step "
          "| / model | all-to-all / device | temp / peak (GiB) | fits | error |\n|" +
          "---|" * 11)
  lines = [head]
  for r in sorted((r for r in rows if r["part"] == "dispatch"),
                  key=lambda r: (r["config"], r["chip"], r["dispatch"])):
    if "flops_per_step" not in r:
      lines.append(f"| {r['config']} | {r['chip']} | {r['topology']} | {r['dispatch']} | "
                   f"{_kernel(r)} | - | - | - | - | no | {r.get('error', '')[:160]} |")
      continue
    b = r["bytes_per_device"]
    lines.append(
        f"| {r['config']} | {r['chip']} | {r['topology']} | {r['dispatch']} | "
        f"{_kernel(r)} | {human_count(r['flops_per_step'])} | "
        f"{r['flops_per_step'] / r['flops_per_step_model']:.2f} | {human_bytes(_a2a(r))} | "
        f"{_gib(b['temp'])} / {_peak_cell(r)} | {'yes' if r['fits'] else 'no'} | "
        f"{r.get('error', '')[:160]} |")
  return "\n".join(lines)


def _largest(r) -> str:
  buffers = r.get("largest_buffers") or []
  return memory_report.describe(buffers[0]) if buffers else "-"


def published_table(rows) -> str:
  head = ("| published setup | variant | topology | fits | peak / HBM per device (GiB) | "
          "largest buffer | compiled FLOPs / model | our MFU bound |\n|" + "---|" * 8)
  lines = [head]
  published = [r for r in rows if r["part"] == "published"]
  if not published:
    return ("None was compiled in this run (`python experiments/scale_plan.py "
            "--parts=published`).")
  reported = {}
  for r in published:
    setup = r["setup"]
    reported[setup] = r["reported"]
    variant = r.get("variant", "dense attention")
    if "flops_per_step" not in r:
      need = r.get("peak_needed")
      need = _gib(need) if need else "-"
      lines.append(f"| {setup} | {variant} | {r['chip']}:{r['topology']} | no | "
                   f"{need} / - | {_largest(r)} | - | - |")
      continue
    b = r["bytes_per_device"]
    lines.append(
        f"| {setup} | {variant} | {r['chip']}:{r['topology']} ({r['devices']}) | "
        f"{'yes' if r['fits'] else 'no'} | {_peak_cell(r)} / {_gib(b['hbm'])} | "
        f"{_largest(r)} | {r['flops_per_step'] / r['flops_per_step_model']:.2f} | "
        f"{100 * (r['mfu_bound'] or 0):.0f}% |")
  lines.append("")
  lines.extend(f"- `{k}`: {v}" for k, v in reported.items())
  return "\n".join(lines)


def memory_figure(rows, configs, chips, path: str) -> str:
  """Stacked bars per config and chip of the fitting training plan's bytes per
  device: parameters, optimizer state, and the rest of the peak (temporaries)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = split_searches(rows, "train")[0]
  labels, params, opt, other, hbm = [], [], [], [], []
  for config in configs:
    for chip in chips:
      r = _fit_row(rows, "train", config, chip)
      if r is None:
        continue
      b = r["bytes_per_device"]
      labels.append(f"{config}\n{chip} {r['topology']}")
      params.append(b["params"] / GiB)
      opt.append(b["optimizer"] / GiB)
      other.append(max(b["peak"] - b["params"] - b["optimizer"], 0) / GiB)
      hbm.append(b["hbm"] / GiB)
  fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 5))
  x = range(len(labels))
  ax.bar(x, params, label="parameters (fp32)")
  ax.bar(x, opt, bottom=params, label="Adam moments (fp32)")
  ax.bar(x, other, bottom=[p + o for p, o in zip(params, opt)],
         label="rest of the peak (temporaries, gradients, activations)")
  ax.scatter(x, hbm, marker="_", s=400, color="k", label="HBM per device")
  ax.set_xticks(list(x))
  ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("GiB per device (compiled)")
  ax.set_title("Training step memory per device at the smallest fitting topology")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(outdir: str, rows: list[dict[str, Any]], configs, chips, *,
                 intro: str, notes: str) -> list[str]:
  os.makedirs(outdir, exist_ok=True)
  fig = memory_figure(rows, configs, chips, os.path.join(outdir, "memory.png"))
  text = "\n\n".join([
      intro,
      "## Training: the smallest fitting topology\n\n" + train_table(rows, configs, chips),
      "![memory per device](memory.png)",
      "## Serving: bf16 weights, KV cache\n\n" + serve_table(rows, configs, chips),
      "## Serving mesh rules compared\n\n" + serve_rules_table(rows),
      "## Dispatch paths compared\n\n" + dispatch_table(rows),
      "## Published setups planned as published\n\n" + published_table(rows),
      notes])
  path = os.path.join(outdir, "README.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.rstrip() + "\n")
  return [path, fig]
