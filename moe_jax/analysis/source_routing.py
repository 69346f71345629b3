"""Expert load by data source: which experts each source of a mixture is routed to.

The MoE question a mixture asks (docs/data.md, "Mixtures") is whether the experts
specialise by domain. :func:`expert_load_by_source` runs a model over each source's
batches (for a run: its fixed eval documents, ``eval_parts()`` of the streaming data)
and counts, per MoE layer, the routed choices that each expert kept for each source's
tokens. From the count table ``[S, E]`` (sources x experts) follow each source's
expert shares (rows normalised) and the mutual information between a token's source
and its expert (:func:`moe_jax.analysis.categories.mutual_information`, normalised by
the experts' entropy: 0 when the source says nothing about the expert, 1 when it
decides it).

Tokens with weight 0 (padding) do not count, nor do choices that were dropped
(capacity, second-expert policy): the table is the load the experts processed.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from moe_jax.analysis.categories import mutual_information, normalize_rows, routing_table
from moe_jax.analysis.trace import trace_routing


def expert_load_by_source(model: nnx.Module,
                          batches: Mapping[str, Iterable[Mapping[str, Any]]]
                          ) -> dict[str, dict[str, Any]]:
  """Per MoE layer, the expert load of each source.

  Args:
    model: an unscanned model with MoE layers, called as ``model(inputs,
      deterministic=True)``.
    batches: source name -> its batches, each with ``inputs`` i32[B, L] and
      optionally ``weights`` f32[B, L] (0: padding, not counted).

  Returns:
    ``{layer path: {"sources": [S names], "counts": f64[S, E] kept choices,
    "shares": f64[S, E] (each row sums to 1), "tokens": f64[S] counted tokens,
    "mi": nats, "mi_normalized": in [0, 1]}}``.
  """
  sources = list(batches)
  counts: dict[str, np.ndarray] = {}
  tokens = np.zeros(len(sources))
  for s, name in enumerate(sources):
    for batch in batches[name]:
      inputs = np.asarray(batch["inputs"])
      # [B, L] token weights (every token 1 without "weights").
      weights = np.asarray(batch.get("weights", np.ones(inputs.shape[:2])), np.float64)
      tokens[s] += weights.sum()
      for path, layer in trace_routing(model, inputs).items():
        table = counts.setdefault(path, np.zeros((len(sources), layer.num_experts)))
        # Every kept choice of a counted token is one token-slot of its expert.
        table += routing_table(np.full(layer.expert_index.shape, s), layer.expert_index,
                               len(sources), layer.num_experts,
                               weights=layer.kept * weights[..., None])
  return {path: {"sources": sources, "counts": table, "shares": normalize_rows(table),
                 "tokens": tokens.copy(), "mi": mutual_information(table),
                 "mi_normalized": mutual_information(table, normalize=True)}
          for path, table in counts.items()}


def markdown(result: Mapping[str, Mapping[str, Any]], *, title: str = "") -> str:
  """One table per MoE layer: each source's share of kept choices per expert, with
  the normalised mutual information."""
  lines = [f"### {title}", ""] if title else []
  for path, r in result.items():
    num_experts = r["counts"].shape[1]
    lines += [f"`{path}`: I(source; expert) / H(expert) = {r['mi_normalized']:.3f} "
              f"({r['mi']:.4f} nats)", "",
              "| source | tokens | " + " | ".join(f"e{e}" for e in range(num_experts))
              + " |", "|---|---|" + "---|" * num_experts]
    for s, name in enumerate(r["sources"]):
      lines.append(f"| {name} | {r['tokens'][s]:,.0f} | "
                   + " | ".join(f"{v:.3f}" for v in r["shares"][s]) + " |")
    lines.append("")
  return "\n".join(lines)
