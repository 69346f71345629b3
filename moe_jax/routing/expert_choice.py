"""Expert choice: each expert picks its tokens (Zhou et al. 2022).

Every expert takes the ``C`` tokens of the group it scores highest, so the load is
balanced by construction and a token may get any number of experts, including none.
A token's routing depends on the other tokens of its group: expert choice is not
causal, and a causal language model must not use it without knowing that.

Capacity here is the same ``C`` as everywhere (:func:`expert_capacity`); the paper's
``k = S * c / E`` is ``expert_capacity(S, E, c)`` up to rounding (flaxformer rounds,
we take the ceiling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import common
from moe_jax.routing.common import RoutingOutput


def expert_choice(
    logits: jax.Array,
    capacity: int,
    token_mask: jax.Array | None = None,
) -> RoutingOutput:
  """Each expert picks up to ``capacity`` tokens of each group.

  ``s = softmax(logits)`` over experts, in float32. In each group, expert e picks the
  ``min(capacity, T)`` valid tokens with the largest ``s[:, e]`` (T valid tokens; ties
  go to the lower token index); padding is never picked.

  Args:
    logits: f32[G, S, E] router outputs; any float dtype is cast to float32.
    capacity: C, tokens each expert picks per group, ``1 <= C <= S``.
    token_mask: optional bool[G, S]; False marks padding.

  Returns:
    A :class:`RoutingOutput` in per-choice form with K = E: ``expert_index[g, s, j] =
    j``; ``kept[g, s, j]`` says whether expert j picked token s; ``position[g, s, j]``
    is the token's rank among j's candidates (0 = highest score; the picked ones are
    ranks < C); ``gates = s`` where kept, else 0. ``aux_loss`` is 0 (the load is
    balanced by construction) and ``z_loss`` the mean of ``logsumexp(logits)^2`` over
    valid tokens.

    ``metrics``: ``dropped_fraction`` (valid tokens no expert picked),
    ``experts_per_token`` (mean number of experts per valid token), ``expert_load``
    f32[E] (each expert's share of all picks), ``expert_fill`` f32[E] (picks per
    slot), ``choice_counts`` f32[E] (picks per expert over all groups),
    ``router_confidence`` (mean of each token's largest ``s``), ``router_entropy``
    (mean entropy of ``s``, nats), and ``second_kept_fraction``, which is 0: there are
    no second choices, the key is there so every router reports the same metrics.
  """
  common.check_logits(logits, "logits")
  common.check_capacity(capacity)
  logits = logits.astype(jnp.float32)
  num_groups, group_size, num_experts = logits.shape
  if capacity > group_size:
    raise ValueError(
        f"capacity={capacity} exceeds the group size S={group_size}: an expert can "
        "pick each token at most once; use capacity <= S.")
  valid = common.valid_tokens(token_mask, num_groups, group_size)

  scores = jax.nn.softmax(logits, axis=-1)  # f32[G, S, E]
  candidates = jnp.where(valid[..., None] > 0, scores, -jnp.inf)
  # A stable sort keeps ties in token order; padding (-inf) sorts last.
  order = jnp.argsort(-candidates, axis=1, stable=True)  # [g, r, e]: token of rank r
  rank = jnp.argsort(order, axis=1).astype(jnp.int32)  # [g, s, e]: rank of token s
  kept = (rank < capacity) & (valid[..., None] > 0)  # bool[G, S, E]
  gates = jnp.where(kept, scores, 0.0)
  expert_index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                                  kept.shape)

  total_valid = jnp.maximum(jnp.sum(valid), 1.0)
  picks_per_token = jnp.sum(kept, axis=-1).astype(jnp.float32)  # f32[G, S]
  picks_per_expert = jnp.sum(kept, axis=(0, 1)).astype(jnp.float32)  # f32[E]
  metrics = {
      "dropped_fraction": jnp.sum((picks_per_token == 0) * valid) / total_valid,
      "experts_per_token": jnp.sum(picks_per_token * valid) / total_valid,
      "expert_load": picks_per_expert / jnp.maximum(jnp.sum(picks_per_expert), 1.0),
      "expert_fill": picks_per_expert / (num_groups * capacity),
      "choice_counts": picks_per_expert,
      "router_confidence": jnp.sum(jnp.max(scores, axis=-1) * valid) / total_valid,
      "router_entropy": common.mean_entropy(scores, valid),
      "second_kept_fraction": jnp.zeros((), jnp.float32),
  }
  return RoutingOutput(
      expert_index=expert_index,
      position=rank,
      kept=kept,
      gates=gates,
      aux_loss=jnp.zeros((), jnp.float32),
      z_loss=common.z_loss(logits, valid),
      metrics=metrics,
      capacity=int(capacity),
  )
