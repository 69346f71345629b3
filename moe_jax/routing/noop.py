"""No-op experts (MoDE, Raposo et al. 2024, Sec. 3.5 "integrated" MoDE).

An MoE layer with ``N`` no-op experts routes over ``E + N`` logits: the last ``N``
experts compute nothing, so a token that picks one gets 0 from that choice and rides
the residual connection past the layer. Routing, gates, the balance loss and the
load metrics see all ``E + N`` experts; the dispatch paths see only the ``E`` real
ones (:attr:`RoutingOutput.num_experts`), whose buffers are the only compute.

The token-choice routers queue every expert's choices in an order that does not
depend on the capacity, so routing once with the larger of the two capacities and
cutting each expert's queue at its own capacity afterwards equals routing with
per-expert capacities. That cut is :func:`split_noop_experts`, the one place that
knows about no-op experts; every router family that supports them
(``RouterFamily.noop``) and every dispatch path works unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import common
from moe_jax.routing.common import RoutingOutput


def split_noop_experts(out: RoutingOutput, *, num_experts: int, capacity: int,
                       noop_capacity: int,
                       token_mask: jax.Array | None = None) -> RoutingOutput:
  """Cuts the queues of ``out`` to per-expert capacities and hides the no-op experts
  from dispatch.

  Args:
    out: token-choice routing over ``E + N`` experts (experts ``E .. E+N-1`` are the
      no-op ones) with a capacity of at least ``max(capacity, noop_capacity)``.
    num_experts: E, the experts that compute.
    capacity: C of each real expert (the dispatch buffers' size).
    noop_capacity: slots of each no-op expert. A no-op choice adds 0 whether it is
      kept or not, so this changes no output: it decides which no-op choices count
      as kept and which as dropped in the metrics.
    token_mask: bool[G, S] or None, False on padding (as given to the router).

  Returns:
    ``out`` with ``kept`` and ``gates`` cut (a choice is kept if its queue position is
    below its expert's capacity; no-op choices are never kept for dispatch, their
    gate is 0), ``capacity = C``, ``noop_experts = N`` and these metrics recomputed
    from the cut: ``dropped_fraction`` (tokens with no kept choice, real or no-op),
    ``expert_fill`` f32[E+N] (kept choices per slot, each expert over its own
    capacity), ``second_kept_fraction``; plus ``noop_fraction``, the valid tokens that
    chose a no-op expert and no real one that kept them: they skip the layer by
    choice, not for lack of capacity. ``expert_load`` and ``choice_counts`` keep all
    ``E + N`` experts. With N = 0, ``out`` is returned as it is.
  """
  total = out.metrics["expert_load"].shape[-1]
  noop = total - num_experts
  if noop == 0:
    return out
  if noop < 0:
    raise ValueError(f"num_experts={num_experts} exceeds the {total} experts routed.")
  num_groups, group_size, top_k = out.expert_index.shape
  is_noop = out.expert_index >= num_experts
  limit = jnp.where(is_noop, noop_capacity, capacity)
  kept = out.kept & (out.position < limit)  # each expert's own capacity
  kept_real = kept & ~is_noop
  valid = common.valid_tokens(token_mask, num_groups, group_size)
  total_valid = jnp.maximum(jnp.sum(valid), 1.0)

  metrics = dict(out.metrics)
  token_kept = jnp.any(kept, axis=-1).astype(jnp.float32)
  metrics["dropped_fraction"] = jnp.sum((1.0 - token_kept) * valid) / total_valid
  kept_per_expert = jnp.sum(jax.nn.one_hot(out.expert_index, total) * kept[..., None],
                            axis=(0, 1, 2))
  slots = jnp.where(jnp.arange(total) < num_experts, capacity, noop_capacity)
  metrics["expert_fill"] = kept_per_expert / (num_groups * slots)
  if top_k > 1:
    metrics["second_kept_fraction"] = jnp.sum(kept[..., 1:] * valid[..., None]) / (
        total_valid * (top_k - 1))
  skipped = jnp.any(kept & is_noop, axis=-1) & ~jnp.any(kept_real, axis=-1)
  metrics["noop_fraction"] = jnp.sum(skipped * valid) / total_valid
  return out.replace(kept=kept_real, gates=jnp.where(kept_real, out.gates, 0.0),
                     metrics=metrics, capacity=int(capacity), noop_experts=noop)
