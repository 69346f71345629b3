"""The metric schema: every key of the train and eval lines of ``metrics.jsonl``.

Each :class:`Metric` names one key, which line carries it, when a run logs it, and how
it is reduced: over the MoE (or routed Mixture-of-Depths) layers, and over the
microbatches of gradient accumulation. Every train line averages the steps of its
logging interval; eval lines average the eval batches weighted by their tokens. The
loss summary (:func:`moe_jax.training.losses.moe_summary`), the train line
(:func:`moe_jax.training.loop_utils.train_line`), the eval step and line
(:mod:`moe_jax.training.evaluation`) and the metrics table of docs/training.md
(:func:`markdown_table`) all read it.

A router family declares the metrics its routing adds to the common ones once, in its
:class:`moe_jax.layers.router_families.RouterFamily` (``metrics``); they are logged as
their mean over the MoE layers when the run uses that family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_jax.layers.router_families import ROUTERS

# When a run logs a key (Metric.when).
ALWAYS = "always"      # every run (dense models log 0 for the MoE losses)
MOE = "moe"            # the model has MoE blocks
NOOP = "noop"          # MoE blocks with MoDE's no-op experts (moe.noop_experts > 0)
MOD = "mod"            # the model has Mixture-of-Depths routed blocks
MTP = "mtp"            # the model has multi-token prediction modules (model.mtp_depth > 0)
LOOP = "loop"          # written by the training loop itself, not by the loss
FINETUNE = "finetune"  # the fine-tuning loop only (moe_jax.peft.finetune)
MIXTURE = "mixture"    # a data mixture (data.mixture): one key per source, <source>

#: The placeholder of per-source keys, replaced by each source of ``data.mixture``.
SOURCE = "<source>"


def router(family: str) -> str:
  """The ``when`` of a metric that the router family ``family`` adds."""
  return f"router={family}"


@dataclasses.dataclass(frozen=True)
class Metric:
  """One key of a ``metrics.jsonl`` line.

  Attributes:
    name: the key.
    line: ``"train"`` or ``"eval"``.
    when: which runs log it: :data:`ALWAYS`, :data:`MOE`, :data:`NOOP`, :data:`MOD`,
      :data:`LOOP`, :data:`FINETUNE` or ``router(family)``.
    layers: from the MoE layers' ``MoeAux`` (or the routed blocks' metrics for
      :data:`MOD`): ``"mean"`` over the layers, ``"per_layer"`` as ``{"layer_<i>":
      value}`` by block index; ``"per_depth"``: one key per multi-token prediction
      depth, the name's ``<k>`` replaced by 1..D (:func:`depth_keys`); None: not a
      per-layer metric.
    microbatches: how gradient accumulation combines the microbatches' values:
      ``"sum"`` (CE, already each microbatch's share), ``"mean"`` (means over
      routing groups and their slots), ``"tokens"`` (means over real tokens, weighted
      by each microbatch's); None: not from the loss.
    doc: what it is (one line of the docs' metrics table).
  """

  name: str
  line: str
  when: str
  doc: str
  layers: str | None = None
  microbatches: str | None = None


def _family_metrics() -> tuple[Metric, ...]:
  """The metrics the router families declare, each once (merged ``when`` if several
  families declare the same name)."""
  out: dict[str, Metric] = {}
  for family, spec in ROUTERS.items():
    for m in spec.metrics:
      when = router(family)
      if m.name in out:
        when = f"{out[m.name].when},{when}"
      out[m.name] = Metric(m.name, "train", when, m.doc, layers="mean",
                           microbatches="mean" if m.per_group else "tokens")
  return tuple(out.values())


_T = "train"
TRAIN: tuple[Metric, ...] = (
    Metric("loss", _T, ALWAYS, "cross-entropy only (masked LM: over the picked bytes)",
           microbatches="sum"),
    Metric("aux_loss", _T, ALWAYS, "balance loss, unscaled", "mean", "mean"),
    Metric("z_loss", _T, ALWAYS, "router z-loss, unscaled", "mean", "tokens"),
    Metric("dropped_fraction", _T, ALWAYS, "valid tokens that lost every choice to "
           "capacity", "mean", "tokens"),
    Metric("grad_norm", _T, ALWAYS, "global norm of the step's gradient"),
    Metric("router_confidence", _T, MOE, "mean top router probability", "mean",
           "tokens"),
    Metric("router_entropy", _T, MOE, "mean entropy of the router probabilities "
           "(nats)", "mean", "tokens"),
    Metric("second_kept_fraction", _T, MOE, "valid tokens whose second choice was "
           "kept (0 with one choice)", "mean", "tokens"),
    Metric("noop_fraction", _T, NOOP, "valid tokens that skip the layer by choosing a "
           "no-op expert", "mean", "tokens"),
    *_family_metrics(),
    Metric("expert_load", _T, MOE, "per expert, the fraction of tokens whose first "
           "choice it is, before capacity (`E + N` entries with no-op experts)",
           "per_layer", "tokens"),
    Metric("expert_fill", _T, MOE, "per expert, kept tokens per slot", "per_layer",
           "mean"),
    Metric("mod_aux_loss", _T, MOD, "the predictors' mean BCE", "mean", "tokens"),
    Metric("mod_routed_fraction", _T, MOD, "tokens the block routed", "per_layer",
           "tokens"),
    Metric("mod_predicted_fraction", _T, MOD, "tokens the predictor would route",
           "per_layer", "tokens"),
    Metric("mod_predictor_accuracy", _T, MOD, "predictor agreement with the top-k",
           "per_layer", "tokens"),
    Metric("mod_router_mean", _T, MOD, "mean router weight", "per_layer", "tokens"),
    Metric("mod_router_std", _T, MOD, "standard deviation of the router weights "
           "(pooled over microbatches)", "per_layer", "tokens"),
    Metric("mtp_loss", _T, MTP, "multi-token prediction loss added to the training "
           "loss, `(mtp_loss_coef / D) * sum_k` of the depths' CE", microbatches="tokens"),
    Metric("mtp_loss/depth_<k>", _T, MTP, "CE of MTP depth k (predicting the token k + 1 "
           "ahead), unscaled; k = 1 .. model.mtp_depth", "per_depth", "tokens"),
    Metric("tokens_per_sec", _T, LOOP, "training throughput over the interval"),
    Metric("steps_per_sec", _T, FINETUNE, "`tokens_per_sec` in steps"),
    Metric("elapsed_sec", _T, LOOP, "wall time since the run first started"),
    Metric("learning_rate", _T, LOOP, "rate of the line's last step"),
    Metric(f"data_share/{SOURCE}", _T, MIXTURE, "the source's share of the tokens "
           "trained on over the interval"),
)

_E = "eval"
EVAL: tuple[Metric, ...] = (
    Metric("eval_loss", _E, ALWAYS, "mean CE (nats) over the scored targets"),
    Metric("eval_loss_stderr", _E, ALWAYS, "standard error of `eval_loss` over "
           "batches"),
    Metric("eval_tokens", _E, ALWAYS, "scored target tokens"),
    Metric("eval_perplexity", _E, ALWAYS, "`exp(eval_loss)`"),
    Metric("eval_bits_per_byte", _E, ALWAYS, "CE over the text targets (not EOS) per "
           "UTF-8 byte they decode to, in bits, for any tokenizer"),
    Metric("eval_aux_loss", _E, ALWAYS, "`aux_loss`, token-weighted over batches",
           "mean"),
    Metric("eval_dropped_fraction", _E, ALWAYS, "`dropped_fraction`, token-weighted "
           "over batches", "mean"),
    Metric("eval_batches", _E, ALWAYS, "eval batches"),
    Metric("eval_loss_predictor", _E, MOD, "CE when the routed blocks route with "
           "their predictors"),
    Metric("eval_mod_predictor_accuracy", _E, MOD, "per routed block, as in training",
           "per_layer"),
    Metric("eval_mod_predicted_fraction", _E, MOD, "per routed block, as in training",
           "per_layer"),
    Metric(f"eval_loss/{SOURCE}", _E, MIXTURE, "`eval_loss` over the source's eval "
           "documents"),
    Metric(f"eval_bits_per_byte/{SOURCE}", _E, MIXTURE, "`eval_bits_per_byte` over the "
           "source's eval documents"),
)

METRICS: tuple[Metric, ...] = TRAIN + EVAL

# The step metric holding the MTP depths' CE, f32[D] (a train line's per-depth keys).
MTP_DEPTH_LOSS = "mtp_loss/depth_<k>"


def depth_keys(name: str, depth: int) -> tuple[str, ...]:
  """The line keys of a ``"per_depth"`` metric: ``name`` with ``<k>`` = 1 .. depth."""
  return tuple(name.replace("<k>", str(k)) for k in range(1, depth + 1))

# Keys on every line: which line, its step, and the writer's tags.
LINE_KEYS = ("split", "step", "objective")


def moe_layer_metrics() -> tuple[Metric, ...]:
  """The train metrics read from the MoE layers' ``MoeAux`` (``aux_loss`` and
  ``z_loss`` its fields, the others its ``metrics``), in line order."""
  return tuple(m for m in TRAIN if m.layers and m.when not in (MOD, MTP))


def eval_layer_means() -> tuple[str, ...]:
  """The MoE layer means the eval step sums per batch: ``eval_<name>`` for each."""
  return tuple(m.name[len("eval_"):] for m in EVAL if m.layers and m.when == ALWAYS)


def microbatch_means() -> frozenset[str]:
  """The train metrics gradient accumulation averages over microbatches."""
  return frozenset(m.name for m in TRAIN if m.microbatches == "mean")


def emitted(config: Any, line: str = "train", *, finetune: bool = False
            ) -> tuple[str, ...]:
  """The keys a run of ``config`` logs on its ``line`` lines (besides
  :data:`LINE_KEYS`): what a test checks every line for."""
  has_moe = bool(config.model.get("moe_every", 0))
  has_mod = bool(config.model.get("mod_every", 0))
  mtp_depth = config.model.get("mtp_depth", 0)
  on = {ALWAYS, LOOP}
  if has_moe:
    on.add(MOE)
    on.add(router(config.moe.router))
    if config.moe.get("noop_experts", 0):
      on.add(NOOP)
  if has_mod:
    on.add(MOD)
  if mtp_depth:
    on.add(MTP)
  if finetune:
    on.add(FINETUNE)
  mixture = config.get("data", {}).get("mixture", "") if hasattr(config, "get") else ""
  sources = [e.strip().rpartition(":")[0] for e in mixture.split(",")] if mixture else []
  if sources:
    on.add(MIXTURE)
  names = []
  for m in METRICS:
    if m.line == line and on.intersection(m.when.split(",")):
      names.extend(depth_keys(m.name, mtp_depth) if m.layers == "per_depth"
                   else (m.name,))
  return tuple(n.replace(SOURCE, s) for n in names
               for s in (sources if SOURCE in n else [SOURCE]))


def markdown_table() -> str:
  """The metrics table of docs/training.md (a test keeps the docs equal to it)."""
  rows = ["| key | line | logged | over layers | meaning |", "|---|---|---|---|---|"]
  for m in METRICS:
    rows.append(f"| `{m.name}` | {m.line} | {m.when.replace(',', ', ')} | "
                f"{m.layers or ''} | {m.doc} |")
  return "\n".join(rows) + "\n"
