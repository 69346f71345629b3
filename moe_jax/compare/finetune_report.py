"""The fine-tuning comparison's report: per base model and method, what a method costs,
what it gains on the new domain and what it forgets of the old one; which experts ESFT
picked, and whether the code experts are the verse experts.

Every number is read from the runs' outputs (:func:`summarize_finetune`):

* trainable parameters and their share of the total, the optimizer-state bytes:
  ``finetune.json`` (``params_trainable``, ``trainable_fraction``,
  ``optimizer_state_bytes``);
* checkpoint bytes: the files of the run's latest step folder,
  ``checkpoints/<step>``, on disk (:func:`latest_checkpoint`);
* steps per second: the median of the train lines' ``steps_per_sec`` (each the mean
  over its logging interval; the step that compiled is left out);
* the new domain's (``eval_loss``) and the old domain's (``old_eval_loss``) eval loss
  at step 0 (before) and at the last step (after), each with its standard error over
  the eval batches.

ESFT's optimizer state and checkpoint hold the whole ``[E, ...]`` expert stacks
(docs/peft.md, "What ESFT holds"); beside them the report gives the selected rows' own
cost, ``8 * params_trainable`` bytes of AdamW moments (two float32 per parameter) and
``4 * params_trainable`` bytes of float32 weights, labelled as such.

The ESFT analysis (:func:`domain_shares`, :func:`expert_overlap`) scores each base
model's experts on both corpora as ESFT scores them (:func:`moe_jax.peft.esft.
routing_shares` on the first training batches), once per base run (cached in its
directory), and compares the top experts of the two.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Sequence

import numpy as np

from moe_jax.compare.aggregation import summarize_run
from moe_jax.compare.finetune_rows import METHODS, FinetuneRun
from moe_jax.compare.report import run_section
from moe_jax.compare.runner import run_dir
from moe_jax.training.metrics import read_metrics

SHARES_FILE = "domain_shares.json"
# The ESFT method of finetune.json's plan: its optimizer state holds whole stacks.
ESFT = "esft"
# AdamW keeps two float32 moments per trainable parameter; the weights are float32.
ADAM_BYTES, WEIGHT_BYTES = 8, 4

CSV_COLUMNS = (
    "run", "base", "method", "seed", "steps", "params_total", "params_trainable",
    "trainable_fraction", "params_in_optimizer", "optimizer_state_bytes",
    "checkpoint_step", "checkpoint_bytes", "own_optimizer_state_bytes",
    "own_weight_bytes", "steps_per_sec",
    "new_eval_loss_before", "new_eval_loss_before_stderr", "new_eval_loss_after",
    "new_eval_loss_after_stderr", "new_gain",
    "old_eval_loss_before", "old_eval_loss_before_stderr", "old_eval_loss_after",
    "old_eval_loss_after_stderr", "forgetting",
    "eval_tokens", "old_eval_tokens", "elapsed_sec")


# ------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------


def latest_checkpoint(rdir: str) -> tuple[int | None, int | None]:
  """(step, bytes of its files) of the newest step folder in ``rdir/checkpoints``;
  (None, None) when there is none."""
  ckpt = os.path.join(rdir, "checkpoints")
  steps = sorted(int(d) for d in (os.listdir(ckpt) if os.path.isdir(ckpt) else [])
                 if d.isdigit())
  if not steps:
    return None, None
  total = 0
  for root, _, files in os.walk(os.path.join(ckpt, str(steps[-1]))):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return steps[-1], total


def _median_finite(values) -> float:
  values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  return statistics.median(values) if values else float("nan")


def summarize_base(workdir: str, run) -> dict[str, Any] | None:
  """One row for a finished pretraining run (None before its last eval)."""
  row = summarize_run(workdir, run)
  if row is None:
    return None
  step, size = latest_checkpoint(run_dir(workdir, run))
  row.update(base=run.base, method="pretrain", params_trainable=row["params_total"],
             trainable_fraction=1.0,
             steps_per_sec=row["tokens_per_sec"] / row["tokens_per_step"],
             checkpoint_step=step, checkpoint_bytes=size,
             old_eval_loss_after=row["final_eval_loss"],
             old_eval_loss_after_stderr=row["eval_loss_stderr"])
  return row


def summarize(workdir: str, run: FinetuneRun) -> dict[str, Any] | None:
  """:func:`summarize_base` of a pretraining run, :func:`summarize_finetune` of a
  fine-tuning one."""
  return (summarize_finetune if run.method else summarize_base)(workdir, run)


def summarize_finetune(workdir: str, run) -> dict[str, Any] | None:
  """One row for a finished fine-tuning run (None before its last eval)."""
  rdir = run_dir(workdir, run)
  lines = read_metrics(rdir)
  train = [l for l in lines if l.get("split") == "train"]
  evals = [l for l in lines if l.get("split") == "eval"]
  info_path = os.path.join(rdir, "finetune.json")
  if (not evals or evals[0]["step"] != 0 or evals[-1]["step"] < run.config.steps
      or not train or not os.path.exists(info_path)):
    return None
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  with open(os.path.join(rdir, "config.json"), encoding="utf-8") as f:
    optimizer = json.load(f)["optimizer"]
  before, after = evals[0], evals[-1]
  trainable = info["params_trainable"]
  own = info["plan"]["method"] == ESFT and optimizer == "adamw"
  step, size = latest_checkpoint(rdir)
  row = {
      "run": run.name, "base": run.base, "method": run.method, "seed": run.seed,
      "steps": after["step"], "peft_method": info["plan"]["method"],
      "plan": info["plan"], "optimizer": optimizer,
      "params_total": info["params_base"], "params_trainable": trainable,
      "trainable_fraction": info["trainable_fraction"],
      "params_in_optimizer": info["params_in_optimizer"],
      "optimizer_state_bytes": info["optimizer_state_bytes"],
      "checkpoint_step": step, "checkpoint_bytes": size,
      "own_optimizer_state_bytes": ADAM_BYTES * trainable if own else None,
      "own_weight_bytes": WEIGHT_BYTES * trainable if own else None,
      "steps_per_sec": _median_finite(l.get("steps_per_sec") for l in train),
      "eval_tokens": after.get("eval_tokens"),
      "old_eval_tokens": after.get("old_eval_tokens"),
      "elapsed_sec": float(train[-1]["elapsed_sec"]),
  }
  for domain, prefix in (("new", ""), ("old", "old_")):
    for when, line in (("before", before), ("after", after)):
      row[f"{domain}_eval_loss_{when}"] = float(line[f"{prefix}eval_loss"])
      row[f"{domain}_eval_loss_{when}_stderr"] = float(
          line.get(f"{prefix}eval_loss_stderr", "nan"))
    row[f"{domain}_curve"] = [(l["step"], float(l[f"{prefix}eval_loss"]),
                               float(l.get(f"{prefix}eval_loss_stderr", "nan")))
                              for l in evals]
  row["new_gain"] = row["new_eval_loss_before"] - row["new_eval_loss_after"]
  row["forgetting"] = row["old_eval_loss_after"] - row["old_eval_loss_before"]
  return row


# ------------------------------------------------------------------------------------
# ESFT: selection and the routing of each domain
# ------------------------------------------------------------------------------------


def domain_shares(base_dir: str, domains: Sequence[str], *, batches: int,
                  batch_size: int, seed: int, score: str) -> dict[str, dict[int, list]]:
  """``{domain: {MoE block: [E] share}}``: the base model's routing shares on the
  first ``batches`` training batches (``batch_size`` x the base's ``data.seq_len``,
  data order ``seed``) of each domain, as ESFT scores them
  (:func:`moe_jax.peft.esft.routing_shares`).

  Cached in ``base_dir/domain_shares.json`` with its settings and the base's
  checkpoint step; computed again only when they change.
  """
  key = {"domains": list(domains), "batches": batches, "batch_size": batch_size,
         "seed": seed, "score": score, "base_step": latest_checkpoint(base_dir)[0]}
  path = os.path.join(base_dir, SHARES_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached["key"] == key:
      return {d: {int(k): v for k, v in s.items()} for d, s in cached["shares"].items()}
  from moe_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moe_jax.peft import esft, finetune  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  model, config, _ = finetune.load_base(base_dir)
  tokenizer = build.tokenizer_of(config, workdir=base_dir)
  shares = {}
  for domain in domains:
    data = data_lib.make_lm_datasets(domain, data_dir=config.data.data_dir,
                                     seq_len=config.data.seq_len,
                                     batch_size=batch_size, seed=seed, tokenizer=tokenizer)
    it = data.train_iter()
    scored = esft.routing_shares(model, [next(it) for _ in range(batches)], score)
    shares[domain] = {int(k): v.tolist() for k, v in scored.items()}
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"key": key, "shares": shares}, f, indent=1)
  return shares


def _top(share: Sequence[float], k: int) -> list[int]:
  """The ``k`` experts of highest share, ties to the lower index (ESFT's order)."""
  return sorted(np.argsort(-np.asarray(share, np.float64), kind="stable")[:k].tolist())


def expert_overlap(new: dict[int, Sequence[float]], old: dict[int, Sequence[float]],
                   selected: dict[int, Sequence[bool]]) -> list[dict[str, Any]]:
  """Per MoE block: ESFT's selection against the old domain's routing.

  Args:
    new, old: ``{block: [E] share}`` on the new and the old domain.
    selected: ``{block: bool[E]}``, the experts ESFT selected (by their new-domain
      share); ``k`` is their number.

  Returns:
    Per block: ``selected``, ``top_new`` and ``top_old`` (the k experts of highest
    share on each domain), ``overlap`` (how many of ``top_new`` are in ``top_old``),
    ``chance`` (``k^2 / E``, the overlap expected of two random k-sets),
    ``selected_new`` / ``selected_old`` (the selected experts' summed share on each
    domain) and ``tv`` (total variation distance of the two shares,
    ``0.5 * sum |p - q|``: 0 when the domains route alike, 1 when apart).
  """
  out = []
  for block in sorted(selected):
    mask = np.asarray(selected[block], bool)
    p, q = np.asarray(new[block], np.float64), np.asarray(old[block], np.float64)
    k, num = int(mask.sum()), mask.size
    top_new, top_old = _top(p, k), _top(q, k)
    out.append({"block": block, "experts": num, "k": k,
                "selected": np.flatnonzero(mask).tolist(), "top_new": top_new,
                "top_old": top_old, "overlap": len(set(top_new) & set(top_old)),
                "chance": k * k / num, "selected_new": float(p[mask].sum()),
                "selected_old": float(q[mask].sum()),
                "tv": float(0.5 * np.abs(p - q).sum())})
  return out


def _top_p(config) -> float:
  """The ESFT threshold a fine-tuning config runs with (unset: the score's default)."""
  from moe_jax.peft import esft  # pylint: disable=import-outside-toplevel
  e = config.finetune.esft
  return esft.resolved_top_p(e.score, e.get("top_p"))


def _selection(row: dict[str, Any] | None, shares: dict[int, list], top_p: float):
  """ESFT's recorded selection (or, without an ESFT run, the one it would make)."""
  if row is not None:
    return {int(k): v for k, v in row["plan"]["selected"].items()}, "the ESFT run"
  from moe_jax.peft import esft  # pylint: disable=import-outside-toplevel
  chosen = esft.select_experts({k: np.asarray(v) for k, v in shares.items()}, top_p)
  return ({k: v.tolist() for k, v in chosen.items()},
          f"no ESFT run: the experts it would select at top_p {top_p:g}")


# ------------------------------------------------------------------------------------
# Tables and sentences
# ------------------------------------------------------------------------------------


def _mib(n) -> str:
  """Bytes in MiB (KiB below one MiB)."""
  if n is None:
    return "—"
  return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _loss(row, domain: str, when: str) -> str:
  return (f"{row[f'{domain}_eval_loss_{when}']:.4f} ± "
          f"{row[f'{domain}_eval_loss_{when}_stderr']:.4f}")


def finetune_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  """One line per fine-tuning run, in grid order, losing rows included."""
  lines = [
      "| Method | Seed | Trainable params (share of total) | Optimizer state | "
      "Checkpoint on disk (step) | Selected rows' own optimizer state (ESFT: 8 B × "
      "trainable) | Selected rows' own weights (ESFT: 4 B × trainable) | Steps/s | "
      "New domain before → after (gain) | Old domain before → after (forgetting) |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mark = " †" if r["peft_method"] == ESFT else ""
    lines.append(
        f"| `{r['method']}` | {r['seed']} | {r['params_trainable']:,} of "
        f"{r['params_total']:,} ({100 * r['trainable_fraction']:.3f}%) | "
        f"{_mib(r['optimizer_state_bytes'])}{mark} | "
        f"{_mib(r['checkpoint_bytes'])}{mark} ({r['checkpoint_step']}) | "
        f"{_mib(r['own_optimizer_state_bytes'])} | {_mib(r['own_weight_bytes'])} | "
        f"{r['steps_per_sec']:.3f} | {_loss(r, 'new', 'before')} → "
        f"{_loss(r, 'new', 'after')} ({r['new_gain']:+.4f}) | "
        f"{_loss(r, 'old', 'before')} → {_loss(r, 'old', 'after')} "
        f"({r['forgetting']:+.4f}) |")
  return lines


def _best(rows: Sequence[dict[str, Any]], key: str, stderr: str | None, what: str,
          fmt: str) -> str:
  """Which run has the lowest ``key``, and whether the runner-up is within the two
  runs' combined eval standard error."""
  ranked = sorted(rows, key=lambda r: r[key])
  first = ranked[0]
  text = f"{what}: `{first['method']}` ({format(first[key], fmt)})"
  if len(ranked) > 1:
    second = ranked[1]
    gap = second[key] - first[key]
    noise = math.hypot(first[stderr], second[stderr]) if stderr else 0.0
    text += (f", then `{second['method']}` ({format(second[key], fmt)}"
             + (", within their combined eval stderr" if stderr and gap < noise else "")
             + ")")
  return text


def summary_sentence(rows: Sequence[dict[str, Any]]) -> str:
  """The best method on each measure, from the rows (one run each)."""
  return "; ".join([
      _best(rows, "new_eval_loss_after", "new_eval_loss_after_stderr",
            "Lowest new-domain eval loss after", ".4f"),
      _best(rows, "forgetting", "old_eval_loss_after_stderr",
            "least forgetting (old-domain loss after − before)", "+.4f"),
      _best(rows, "params_trainable", None, "fewest trainable parameters", ",")]) + "."


def overlap_table(layers: Sequence[dict[str, Any]]) -> list[str]:
  lines = ["| MoE block | Experts | ESFT selected (k) | Top k by code share | Top k by "
           "verse share | Overlap (of k) | Chance (k²/E) | Selected experts' share: "
           "code / verse | Total variation, code vs verse |",
           "|---|---|---|---|---|---|---|---|---|"]
  for l in layers:
    lines.append(f"| {l['block']} | {l['experts']} | {l['selected']} ({l['k']}) | "
                 f"{l['top_new']} | {l['top_old']} | {l['overlap']} of {l['k']} | "
                 f"{l['chance']:.2f} | {l['selected_new']:.3f} / {l['selected_old']:.3f}"
                 f" | {l['tv']:.3f} |")
  return lines


def overlap_sentence(layers: Sequence[dict[str, Any]]) -> str:
  """Whether the code experts are the verse experts, in numbers."""
  k = sum(l["k"] for l in layers)
  overlap = sum(l["overlap"] for l in layers)
  chance = sum(l["chance"] for l in layers)
  tv = statistics.fmean(l["tv"] for l in layers)
  new = statistics.fmean(l["selected_new"] for l in layers)
  old = statistics.fmean(l["selected_old"] for l in layers)
  if overlap == k:
    verdict = "the top code experts are the top verse experts"
  elif overlap > chance:
    verdict = ("the top code experts are partly the top verse experts (more than "
               "chance)")
  else:
    verdict = ("the top code experts differ from the top verse experts (no more "
               "overlap than chance)")
  return (f"Over {len(layers)} MoE block(s), {overlap} of the {k} top code experts are "
          f"also top verse experts (chance {chance:.2f}): {verdict}. The selected "
          f"experts take {new:.3f} of the code routing and {old:.3f} of the verse "
          f"routing (mean over blocks); the two domains' shares differ by a total "
          f"variation of {tv:.3f} on average (0: alike, 1: disjoint).")


# ------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def write_curves(outdir: str, base: str, rows: Sequence[dict[str, Any]],
                 domains: tuple[str, str]) -> str:
  """``BASE_eval_loss_vs_step.png``: new- and old-domain eval loss (± stderr) against
  the fine-tuning step, one line per run."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, (domain, name) in zip(axes, zip(("new", "old"), domains)):
    for i, r in enumerate(rows):
      steps, losses, errs = zip(*r[f"{domain}_curve"])
      ax.errorbar(steps, losses, yerr=[0 if math.isnan(e) else e for e in errs],
                  fmt="-o", ms=3, lw=1.2, capsize=2,
                  color=plt.get_cmap("tab10")(i % 10),
                  label=f"{r['method']} (seed {r['seed']})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("eval loss (nats / byte)")
    ax.set_title(f"{base}: {'new' if domain == 'new' else 'old'} domain ({name})")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(outdir, f"{base}_eval_loss_vs_step.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_share_plot(outdir: str, name: str, shares: dict[str, dict[int, list]],
                     selected: dict[int, Sequence[bool]]) -> str:
  """``NAME_expert_shares.png``: per MoE block, each expert's routing share on both
  domains, ESFT's selected experts starred."""
  plt = _pyplot()
  (new_name, new), (old_name, old) = shares.items()
  blocks = sorted(selected)
  fig, axes = plt.subplots(len(blocks), 1, figsize=(10, 2.8 * len(blocks)),
                           squeeze=False)
  for ax, block in zip(axes[:, 0], blocks):
    e = np.arange(len(new[block]))
    ax.bar(e - 0.2, new[block], 0.4, label=new_name, color="tab:blue")
    ax.bar(e + 0.2, old[block], 0.4, label=old_name, color="tab:orange")
    for i in np.flatnonzero(np.asarray(selected[block], bool)):
      ax.annotate("*", (i - 0.2, new[block][i]), ha="center", fontsize=12)
    ax.set_xticks(e)
    ax.set_ylabel("routing share")
    ax.set_title(f"MoE block {block} (* ESFT selected)")
    ax.grid(axis="y", alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  axes[-1, 0].set_xlabel("expert")
  fig.tight_layout()
  path = os.path.join(outdir, f"{name}_expert_shares.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------


def _describe_base(run) -> str:
  c = run.config
  m = c.moe
  width = m.d_ff or c.model.d_ff
  shared = f" + {m.num_shared_experts} shared" if m.num_shared_experts else ""
  return (f"`experiments/configs/{run.base}.py`: {c.model.num_layers} blocks, d_model "
          f"{c.model.d_model}, MoE every {c.model.moe_every} blocks with "
          f"{m.num_experts} experts of width {width}{shared}, top-{m.top_k}, "
          f"dispatch `{m.dispatch}`; pretrained {c.steps} steps of {c.batch_size} x "
          f"{c.data.seq_len} bytes of `{c.data.name}` (warmup {c.warmup_steps}), "
          f"seed {run.seed}; its eval at the last step scores "
          + (f"{c.eval_steps} batches." if c.eval_steps else "the whole validation "
             "split."))


def _base_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  lines = ["| Base run | Params | Eval loss, old domain (± stderr) | Steps/s | "
           "Checkpoint on disk (step) |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| `{r['run']}` | {r['params_total']:,} | "
                 f"{r['final_eval_loss']:.4f} ± {r['eval_loss_stderr']:.4f} | "
                 f"{r['steps_per_sec']:.3f} | {_mib(r['checkpoint_bytes'])} "
                 f"({r['checkpoint_step']}) |")
  return lines


def _methods_table(runs, settings) -> list[str]:
  lines = ["| Method | What trains | Fine-tuning config keys | Learning rate |",
           "|---|---|---|---|"]
  for name in settings["methods"]:
    c = next(r.config for r in runs if r.method == name)
    keys = ", ".join(f"`{k}={v!r}`" for k, v in METHODS[name].overrides.items())
    lines.append(f"| `{name}` | {METHODS[name].what} | {keys} | {c.learning_rate:g} |")
  return lines


def report(workdir: str, runs: Sequence[FinetuneRun], rows: list[dict[str, Any]],
           settings: dict[str, Any], meta: dict[str, Any], *, stop=None
           ) -> dict[str, Any]:
  """``report.md``'s text and the plots of the finished runs' ``rows``
  (:func:`summarize`).

  ``stop`` (the grid's SIGTERM flag): once set, no base model is scored for the
  ESFT analysis (its section says so; the next invocation scores it).

  Returns:
    ``{"markdown", "analysis": {base run: [per-block dicts]}}``.
  """
  base_runs = [r for r in runs if not r.method]
  tuned_runs = [r for r in runs if r.method]
  base_names = {r.name for r in base_runs}
  base_rows = {row["run"]: row for row in rows if row["run"] in base_names}
  tuned_rows = [row for row in rows if row["run"] not in base_names]
  out: dict[str, Any] = {"analysis": {}}
  ft = tuned_runs[0].config
  new_domain = ft.data.name
  old_domain = base_runs[0].config.data.name
  s = settings
  lines = [
      f"# Fine-tuning MoE models on a new domain: `{new_domain}` after "
      f"`{old_domain}`",
      "",
      f"Preset `{s['preset']}`. Each base model pretrains on `{old_domain}`, then each "
      f"method fine-tunes it for {ft.steps} steps of {ft.batch_size} x the base's "
      f"sequence length on `{new_domain}` (warmup {ft.warmup_steps}, cosine decay, "
      f"weight decay {ft.weight_decay:g}; LoRA rank {ft.finetune.rank}, alpha "
      f"{ft.finetune.alpha:g}; ESFT scores by `{ft.finetune.esft.score}` share on "
      f"{ft.finetune.esft.batches} training batches, top_p {_top_p(ft):g})."
      f" Evals at step 0 (before) and every {ft.eval_every} steps, each on the same "
      f"fixed sample of {ft.eval_steps} batches of each domain for every method "
      "(`eval_loss`: the new domain; `old_eval_loss`: the old one, i.e. forgetting).",
      "",
      f"**Seeds: {s['seeds']}.** Each row is one run; ± is that run's eval standard "
      "error over its eval batches, not a spread over seeds, so a difference smaller "
      "than the two rows' combined stderr is not a result.",
      "",
      f"Command (plus `--workdir`): `{meta.get('command', '')}`",
      "",
      "## Methods",
      "",
      *_methods_table(tuned_runs, s),
      "",
      "Trainable parameters, their share of the total and the optimizer state come "
      "from each run's `finetune.json`; the checkpoint is the run's latest step folder "
      "(`checkpoints/<step>`, the trainable part and its optimizer state) measured on "
      "disk; steps/s is the median of the train lines' `steps_per_sec` (the runs ran "
      "one after another, each under the load of its time: see Run below).",
      "",
      "† **ESFT holds more than it trains**: its optimizer state and checkpoint hold "
      "the whole `[E, ...]` expert stacks of every scored layer, frozen rows included "
      "(docs/peft.md, \"What ESFT holds\"), so those two cells measure this "
      "implementation, not the method. The columns \"Selected rows' own\" give the "
      "method's cost: two float32 AdamW moments (8 bytes) and one float32 weight "
      "(4 bytes) per trainable parameter; its own checkpoint is about their sum.",
      "",
  ]
  for base_run in base_runs:
    base_row = base_rows.get(base_run.name)
    mine = [r for r in tuned_rows if r["base"] == base_run.base
            and r["seed"] == base_run.seed]
    lines += [f"## {base_run.base} (seed {base_run.seed})", "",
              _describe_base(base_run), ""]
    if base_row is None:
      lines += ["Not pretrained yet.", ""]
      continue
    lines += [*_base_table([base_row]), ""]
    if mine:
      lines += [*finetune_table(mine), "", summary_sentence(mine), ""]
      name = f"{base_run.base}_s{base_run.seed}"
      write_curves(workdir, name, mine, (new_domain, old_domain))
      lines += [f"Plot: `{name}_eval_loss_vs_step.png`.", ""]
    lines += ["### Which experts ESFT picked: code experts against verse experts", ""]
    esft_row = next((r for r in mine if r["peft_method"] == ESFT), None)
    if stop is not None and stop.requested and not os.path.exists(
        os.path.join(run_dir(workdir, base_run), SHARES_FILE)):
      lines += ["Not scored yet (stopped); the next invocation scores it.", ""]
      continue
    shares = domain_shares(run_dir(workdir, base_run), (new_domain, old_domain),
                           batches=ft.finetune.esft.batches,
                           batch_size=ft.batch_size, seed=base_run.seed,
                           score=ft.finetune.esft.score)
    selected, source = _selection(esft_row, shares[new_domain], _top_p(ft))
    layers = expert_overlap(shares[new_domain], shares[old_domain], selected)
    out["analysis"][base_run.name] = layers
    write_share_plot(workdir, base_run.name, shares, selected)
    lines += [
        f"The base model's routing shares (`{ft.finetune.esft.score}`, as ESFT scores "
        f"them) on the first {ft.finetune.esft.batches} training batches of "
        f"{ft.batch_size} sequences of each domain: code is `{new_domain}`, verse "
        f"`{old_domain}`. Selection: {source}; k is its size per block, and the top k "
        "experts by code share are the selection itself.",
        "",
        *overlap_table(layers),
        "",
        overlap_sentence(layers),
    ]
    if esft_row is not None and "shares" in esft_row["plan"]:
      diff = max(float(np.max(np.abs(np.asarray(v) - np.asarray(
          shares[new_domain][int(k)])))) for k, v in esft_row["plan"]["shares"].items())
      lines.append(f"(The ESFT run's own scores, in its `finetune.json`, differ from "
                   f"these code shares by at most {diff:.1e}.)")
    lines += ["", f"Plot: `{base_run.name}_expert_shares.png`.", ""]
  lines += [*run_section(meta), "", "Per-run numbers: `results.csv`.", ""]
  return {"markdown": "\n".join(lines), **out}
