"""The comparison plots (matplotlib, imported only when plotting): eval loss against
training step and training time, training throughput per model, and expert balance
and dropped tokens over training.

Grid-independent: the grid says how a model is named, coloured and drawn.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Callable, Sequence

from moe_jax.compare.aggregation import train_seconds


def write_plots(outdir: str, aggs: Sequence[dict[str, Any]], threshold: float, *,
                label: Callable[[dict[str, Any]], str],
                color: Callable[[dict[str, Any]], Any],
                linestyle: Callable[[dict[str, Any]], str] = lambda agg: "-",
                prefix: str = "") -> list[str]:
  """eval_loss_vs_step.png, eval_loss_vs_time.png and throughput.png in ``outdir``
  (each name after ``prefix``).

  Args:
    outdir: where the PNGs go.
    aggs: from :func:`moe_jax.compare.aggregation.aggregate`, in the grid's order.
    threshold: the quality threshold (eval loss), drawn as a line.
    label, color, linestyle: a model's legend name, matplotlib colour and line style
      (``"-"``, ``"--"``), from its aggregate.
  """
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
      line_color, style = color(a), linestyle(a)
      runs_xy = []
      for i, (curve, row) in enumerate(zip(a["curves"], a["rows"])):
        xs = [s for s, _ in curve]
        if xkind == "time":
          xs = [train_seconds(row, s) for s in xs]
        ys = [l for _, l in curve]
        runs_xy.append((xs, ys))
        ax.plot(xs, ys, style, color=line_color, lw=1.2,
                label=label(a) if i == 0 else None, alpha=0.85)
      n = min(len(ys) for _, ys in runs_xy)
      mean_x = [statistics.fmean(xs[j] for xs, _ in runs_xy) for j in range(n)]
      mean_y = [statistics.fmean(ys[j] for _, ys in runs_xy) for j in range(n)]
      keep = [j for j in range(n) if j >= int(0.6 * n)]
      zoom.plot([mean_x[j] for j in keep], [mean_y[j] for j in keep], style + "o",
                color=line_color, lw=1.4, ms=3, label=label(a))
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
    path = os.path.join(outdir, f"{prefix}eval_loss_vs_{xkind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(7, 4))
  names = [label(a) for a in aggs]
  colors = [color(a) for a in aggs]
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
  path = os.path.join(outdir, f"{prefix}throughput.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)
  return paths


def _seed_mean(curves: Sequence[Sequence[tuple]], index: int) -> tuple[list, list]:
  """Steps and the mean over seeds of column ``index`` of per-seed ``[(step, ...)]``."""
  n = min(len(c) for c in curves)
  steps = [curves[0][j][0] for j in range(n)]
  return steps, [statistics.fmean(c[j][index] for c in curves) for j in range(n)]


def write_balance_plots(outdir: str, aggs: Sequence[dict[str, Any]], *,
                        label: Callable[[dict[str, Any]], str],
                        color: Callable[[dict[str, Any]], Any],
                        prefix: str = "") -> list[str]:
  """expert_balance.png (expert-load CV and max/mean per MoE layer over training) and
  dropped_fraction.png (train dropped fraction over training), means over seeds; rows
  without MoE layers are left out. Nothing is written when no row has any."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  moe = [a for a in aggs if a["rows"][0].get("balance_curves")]
  if not moe:
    return []
  layers = sorted({k for a in moe for k in a["rows"][0]["balance_curves"]},
                  key=lambda k: int(k.rsplit("_", 1)[-1]))
  fig, axes = plt.subplots(2, len(layers), figsize=(5.5 * len(layers), 7), squeeze=False)
  for j, layer in enumerate(layers):
    for a in moe:
      curves = [r["balance_curves"].get(layer) for r in a["rows"]]
      if not all(curves):
        continue
      for i, ylabel in ((1, "expert-load CV (std / mean over experts)"),
                        (2, "max / mean expert load")):
        steps, ys = _seed_mean(curves, i)
        axes[i - 1][j].plot(steps, ys, "-o", ms=2, color=color(a), lw=1.2,
                            label=label(a))
        axes[i - 1][j].set_ylabel(ylabel)
    for i in range(2):
      axes[i][j].set_xlabel("training step")
      axes[i][j].set_title(f"MoE {layer.replace('_', ' ')} (mean over seeds)")
      axes[i][j].grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  paths = [os.path.join(outdir, f"{prefix}expert_balance.png")]
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4))
  for a in moe:
    steps, ys = _seed_mean([r["dropped_curve"] for r in a["rows"]], 1)
    ax.plot(steps, ys, "-o", ms=2, color=color(a), lw=1.2, label=label(a))
  ax.set_xlabel("training step")
  ax.set_ylabel("dropped fraction (train, layer mean)")
  ax.set_title("Tokens dropped for capacity (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(outdir, f"{prefix}dropped_fraction.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths
