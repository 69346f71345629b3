r"""Eval-loss curves of training runs against steps, training time or training FLOPs.

Reads each run's ``metrics.jsonl``, ``config.json`` and ``model_info.json`` and writes
``OUT/curves.csv`` (one row per eval) and ``OUT/eval_loss_vs_X.png`` for each ``--x``:

* ``step``: the training step of the eval;
* ``train_sec``: seconds spent in training steps up to it, from the train lines'
  ``tokens_per_sec`` (each logging interval's tokens over its rate), so compilation,
  evals and checkpoints are left out; linear between logged steps, and at the last
  interval's rate after the last logged step (a run stopped between logging steps);
* ``train_flops``: ``3 x`` forward FLOPs per token (``flops_per_token_active`` plus the
  router's, ``moe_jax.models.sizes``) ``x`` tokens trained (``step x batch_size x
  seq_len``); ``3 x`` forward is the usual forward + backward count.

Error bars are the eval's standard error over batches (``eval_loss_stderr``). A
Mixture-of-Depths run also gets its ``eval_loss_predictor`` (dashed): the loss when the
routed blocks route with the causal predictor, as sampling does.

  python experiments/curves.py --runs=dense=/tmp/dense,mod=/tmp/mod --x=train_flops,step \
      --out=/tmp/curves
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Sequence

from moe_jax.training.metrics import read_metrics

XS = ("step", "train_sec", "train_flops")
X_LABELS = {"step": "training step", "train_sec": "training seconds (evals left out)",
            "train_flops": "training FLOPs (3 x forward)"}
COLUMNS = ("run", "step", "train_sec", "train_flops", "eval_loss", "eval_loss_stderr",
           "eval_tokens", "eval_loss_predictor")


def train_seconds(train_rows: Sequence[dict[str, Any]], tokens_per_step: int
                  ) -> list[tuple[int, float]]:
  """``[(step, seconds of training up to it)]`` at 0 and at every logged step."""
  out, seconds, last = [(0, 0.0)], 0.0, 0
  for r in sorted(train_rows, key=lambda r: r["step"]):
    seconds += (r["step"] - last) * tokens_per_step / r["tokens_per_sec"]
    last = r["step"]
    out.append((last, seconds))
  return out


def _interp(points: Sequence[tuple[int, float]], step: int) -> float | None:
  """Linear in ``points``; past the last one, at the last segment's slope."""
  for (s0, v0), (s1, v1) in zip(points, points[1:]):
    if s0 <= step <= s1:
      return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
  if len(points) >= 2 and step > points[-1][0]:
    (s0, v0), (s1, v1) = points[-2:]
    return v1 + (v1 - v0) * (step - s1) / (s1 - s0)
  return None


def read_curve(name: str, workdir: str) -> list[dict[str, Any]]:
  """One row per eval of the run in ``workdir`` (columns: ``COLUMNS``)."""
  rows = read_metrics(workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  with open(os.path.join(workdir, "model_info.json"), encoding="utf-8") as f:
    info = json.load(f)
  tokens_per_step = config["batch_size"] * config["data"]["seq_len"]
  flops = info["flops_per_token_active"] + info.get("flops_per_token_router", 0)
  seconds = train_seconds([r for r in rows if r["split"] == "train"], tokens_per_step)
  curve = []
  for r in rows:
    if r["split"] != "eval":
      continue
    curve.append(dict(
        run=name, step=r["step"], train_sec=_interp(seconds, r["step"]),
        train_flops=3 * flops * r["step"] * tokens_per_step, eval_loss=r["eval_loss"],
        eval_loss_stderr=r.get("eval_loss_stderr"), eval_tokens=r.get("eval_tokens"),
        eval_loss_predictor=r.get("eval_loss_predictor")))
  return curve


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})


def plot(path: str, rows: Sequence[dict[str, Any]], x: str, title: str = "") -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name in dict.fromkeys(r["run"] for r in rows):
    pts = [r for r in rows if r["run"] == name and r[x] is not None]
    line = ax.errorbar([r[x] for r in pts], [r["eval_loss"] for r in pts],
                       yerr=[r["eval_loss_stderr"] or 0.0 for r in pts], marker="o",
                       capsize=3, label=name)
    pred = [r for r in pts if r["eval_loss_predictor"] is not None]
    if pred:
      ax.plot([r[x] for r in pred], [r["eval_loss_predictor"] for r in pred], ls="--",
              marker="x", color=line[0].get_color(), label=f"{name} (predictor routing)")
  ax.set_xlabel(X_LABELS[x])
  ax.set_ylabel("eval loss (nats per byte)")
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str]) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", required=True,
                      help="NAME=WORKDIR pairs, comma-separated, in legend order.")
  parser.add_argument("--x", default="step,train_sec,train_flops",
                      help=f"Comma-separated x axes, of {','.join(XS)}.")
  parser.add_argument("--out", required=True, help="Output directory.")
  parser.add_argument("--title", default="", help="Plot title.")
  args = parser.parse_args(argv)
  xs = args.x.split(",")
  bad = [x for x in xs if x not in XS]
  if bad:
    parser.error(f"--x: {','.join(bad)} not in {','.join(XS)}.")
  runs = []
  for item in args.runs.split(","):
    name, sep, workdir = item.partition("=")
    if not sep or not name or not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
      parser.error(f"--runs: {item!r} is not NAME=WORKDIR of a run with metrics.jsonl.")
    runs.append((name, workdir))
  rows = [r for name, workdir in runs for r in read_curve(name, workdir)]
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, "curves.csv"), rows)
  for x in xs:
    plot(os.path.join(args.out, f"eval_loss_vs_{x}.png"), rows, x, args.title)
  for r in rows:
    print(", ".join(f"{k}={r[k]}" for k in COLUMNS if r.get(k) is not None))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
