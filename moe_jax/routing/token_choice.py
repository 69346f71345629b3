"""Token choice: each token picks its top-k experts (Switch, GShard, Mixtral, DeepSeek).

One function covers the family; the papers differ only in arguments:

| model | arguments |
|---|---|
| Switch (Fedus et al. 2021) | ``top_k=1`` |
| GShard (Lepikhin et al. 2020) | ``top_k=2, second_policy="random", normalize_gates=True`` |
| Mixtral (Jiang et al. 2024) | ``top_k=2, normalize_gates=True, balance_choices="all"`` |
| DeepSeek-V3 (2024) | ``score_fn="sigmoid", selection_bias=b, expert_groups, top_groups, gate_scale`` |

Conventions (and where the anchors differ, see docs/routing.md):

* Top-k gates are renormalised over the k choices when ``normalize_gates`` (GShard,
  Mixtral, DeepSeek-V3); flaxformer keeps the raw softmax probabilities. Top-1 always
  keeps the raw score, as in Switch (a renormalised top-1 gate would be 1 and the
  router would get no gradient from the combine).
* Mixtral's "softmax over the top-k logits" equals the softmax over all experts
  renormalised over the top k, so it is ``score_fn="softmax", normalize_gates=True``.
* The selection bias changes which experts are chosen, never the gates (DeepSeek-V3).
* Other groups are masked with ``-inf`` after the bias is added, as DeepSeek-V3's
  inference ``Gate`` does (the HF modeling code of V2 and V3 fills them with 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import balance, common
from moe_jax.routing.common import SECOND_POLICIES, RoutingOutput

SCORE_FNS = ("softmax", "sigmoid")


def _check_route_args(router_logits, top_k, capacity, second_policy,
                      second_threshold, rng, score_fn, selection_bias, expert_groups,
                      top_groups, gate_scale, balance_choices, queue_order):
  common.check_logits(router_logits)
  common.check_queue_order(queue_order)
  num_experts = router_logits.shape[-1]
  common.check_top_k(top_k, num_experts)
  common.check_capacity(capacity)
  if second_policy not in SECOND_POLICIES:
    raise ValueError(
        f"second_policy must be one of {SECOND_POLICIES}, got {second_policy!r}.")
  if second_policy == "random" and top_k > 1:
    if rng is None:
      raise ValueError(
          "second_policy='random' needs a PRNG key: pass rng=jax.random.key(...).")
    if not second_threshold > 0:
      raise ValueError(
          "second_threshold must be > 0 with second_policy='random', got "
          f"{second_threshold!r}.")
  if score_fn not in SCORE_FNS:
    raise ValueError(f"score_fn must be one of {SCORE_FNS}, got {score_fn!r}.")
  if balance_choices not in balance.BALANCE_CHOICES:
    raise ValueError(
        f"balance_choices must be one of {balance.BALANCE_CHOICES}, got "
        f"{balance_choices!r}.")
  if selection_bias is not None and tuple(jnp.shape(selection_bias)) != (num_experts,):
    raise ValueError(
        f"selection_bias must have shape [E] = ({num_experts},), got "
        f"{tuple(jnp.shape(selection_bias))}.")
  if isinstance(gate_scale, (int, float)) and not gate_scale > 0:
    raise ValueError(f"gate_scale must be > 0, got {gate_scale!r}.")
  if (isinstance(expert_groups, bool) or int(expert_groups) != expert_groups
      or expert_groups < 1):
    raise ValueError(f"expert_groups must be an integer >= 1, got {expert_groups!r}.")
  if expert_groups > 1:
    if num_experts % expert_groups:
      raise ValueError(
          f"expert_groups={expert_groups} must divide num_experts={num_experts}.")
    if top_groups is None:
      raise ValueError(
          f"top_groups is required with expert_groups={expert_groups}: pass how many "
          f"groups each token keeps, 1 <= top_groups <= {expert_groups}.")
    if int(top_groups) != top_groups or not 1 <= top_groups <= expert_groups:
      raise ValueError(
          f"top_groups must be an integer in [1, expert_groups={expert_groups}], got "
          f"{top_groups!r}.")
    kept_experts = top_groups * (num_experts // expert_groups)
    if top_k > kept_experts:
      raise ValueError(
          f"top_k={top_k} exceeds the {kept_experts} experts in the top_groups="
          f"{top_groups} kept groups of {num_experts // expert_groups}; raise "
          "top_groups or lower top_k.")
  elif top_groups is not None and top_groups != 1:
    raise ValueError(
        f"top_groups={top_groups!r} needs expert_groups > 1 (got expert_groups=1); "
        "leave top_groups=None.")


def mask_to_top_groups(u: jax.Array, expert_groups: int, top_groups: int) -> jax.Array:
  """f32[G, S, E]: ``u`` with the experts outside each token's best groups at -inf.

  Experts form ``expert_groups`` contiguous groups. A group scores the sum of its two
  largest ``u`` (the largest alone for one-expert groups), as in DeepSeek-V3; the
  ``top_groups`` best groups are kept, ties to the lower group index.
  """
  num_groups, group_size, num_experts = u.shape
  per_group = num_experts // expert_groups
  grouped = u.reshape(num_groups, group_size, expert_groups, per_group)
  if per_group == 1:
    group_score = grouped[..., 0]
  else:
    top2 = common.top_k_by_argmax(grouped, 2)  # i32[G, S, groups, 2]
    group_score = jnp.sum(jnp.take_along_axis(grouped, top2, axis=-1), axis=-1)
  chosen = common.top_k_by_argmax(group_score, top_groups)  # i32[G, S, top_groups]
  keep_group = jnp.any(jax.nn.one_hot(chosen, expert_groups, dtype=jnp.bool_), axis=-2)
  keep = jnp.repeat(keep_group, per_group, axis=-1)  # bool[G, S, E]
  return jnp.where(keep, u, -jnp.inf)


def route(
    router_logits: jax.Array,
    *,
    top_k: int = 1,
    capacity: int,
    second_policy: str = "all",
    second_threshold: float = 0.2,
    normalize_gates: bool = True,
    batch_priority: bool = False,
    rng: jax.Array | None = None,
    token_mask: jax.Array | None = None,
    score_fn: str = "softmax",
    selection_bias: jax.Array | None = None,
    expert_groups: int = 1,
    top_groups: int | None = None,
    gate_scale: float = 1.0,
    balance_choices: str = "first",
    queue_order: str = "choice_major",
    balance_scope: str = "group",
) -> RoutingOutput:
  """Routes each token to up to ``top_k`` experts with a fixed capacity per expert.

  In this order:

  1. Scores ``s = softmax(logits)`` over experts, or ``sigmoid(logits)``, in float32.
  2. Selection scores ``u = s + selection_bias`` (``u = s`` when it is None).
  3. With ``expert_groups > 1``, experts outside each token's ``top_groups`` best
     groups get ``u = -inf`` (see :func:`mask_to_top_groups`).
  4. Choices: top-k of ``u`` by repeated argmax, ties to the lowest index.
  5. Gates from the unbiased scores, ``g_j = s[choice_j]``, divided by their sum over
     the k choices when ``normalize_gates`` and ``top_k > 1``.
  6. The second-expert policy judges these ``g``.
  7. Kept gates are multiplied by ``gate_scale``.
  8. Priority and capacity: the wanted choices queue per expert in ``queue_order``
     (tokens in position order, or by the unbiased score of their first choice with
     Batch Prioritized Routing), and the first C of each queue are kept.
  9. Losses and metrics (below).

  Args:
    router_logits: f32[G, S, E] router outputs; any narrower float dtype is cast to
      float32 (float64 stays float64).
    top_k: choices per token, K. 1 is Switch, 2 is GShard; larger k is supported and
      applies the second-expert policy to every choice after the first.
    capacity: C, slots per expert and group (see :func:`expert_capacity`).
    second_policy: what to do with choices after the first, judged on their
      (normalised) gate g: ``"all"`` keeps them, ``"threshold"`` keeps them when
      ``g > second_threshold``, ``"random"`` keeps them with probability
      ``min(1, g / second_threshold)`` (GShard is threshold 0.5; Mesh-TF and ST-MoE 0.2).
    second_threshold: the threshold of the two policies above.
    normalize_gates: renormalise the top-k gates to sum to 1 (GShard) when ``top_k > 1``.
    batch_priority: V-MoE Batch Prioritized Routing: tokens queue by their first
      choice's score, highest first (ties by position), instead of by position. It
      looks at the whole group, so it is for non-causal use only.
    rng: PRNG key, needed only for ``second_policy="random"``.
    token_mask: optional bool[G, S]; False marks padding, which is never routed and is
      left out of every loss and metric.
    score_fn: ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3's affinities).
    selection_bias: optional f32[E] added to the scores for choosing only
      (DeepSeek-V3's auxiliary-loss-free balancing, see :func:`update_selection_bias`).
    expert_groups: contiguous groups of ``E / expert_groups`` experts for group-limited
      routing (DeepSeek-V2/V3); 1 turns it off.
    top_groups: groups kept per token; required when ``expert_groups > 1``.
    gate_scale: multiplies the kept gates (DeepSeek's ``routed_scaling_factor``).
    balance_choices: ``"first"`` (Switch) or ``"all"`` (Mixtral, DeepSeek): which
      choices the auxiliary loss counts.
    queue_order: how the choices of a group queue for the capacity (see
      :func:`moe_jax.routing.common.queue_positions`): ``"choice_major"`` (GShard:
      every first choice before any second one) or ``"token_major"`` (each token's
      choices together, at place ``t*K + j``; MaxText). Only ``"token_major"`` (or
      ``top_k=1``, or a capacity that never drops) keeps a token's routing free of
      later tokens, as a causal LM needs.
    balance_scope: ``"group"`` (default) or ``"batch"``: where ``aux_loss`` counts
      ``c_e``, ``P_e`` and T, per group or over the valid tokens of all groups at once
      (the whole global batch when the layer routes it in one call).

  Returns:
    A :class:`RoutingOutput`.

    ``aux_loss`` is, per group with T valid tokens, ``E / (K' T) * sum_e c_e P_e``
    averaged over groups that have tokens (with ``balance_scope="batch"``, the same
    formula once over all valid tokens of all groups): ``K' = 1`` for ``"first"`` and ``top_k``
    for ``"all"``; ``c_e`` counts the first K' choices of valid tokens that picked e,
    before policy and capacity; ``P_e`` is the mean over valid tokens of ``p_e`` with
    ``p = s`` for softmax and ``p = s / sum_e s`` for sigmoid. A uniform router scores 1
    either way; HF's Mixtral loss is ``top_k`` times the ``"all"`` value.
    ``z_loss`` is the mean of ``logsumexp(logits)^2`` over valid tokens.

    ``metrics`` holds ``dropped_fraction`` (tokens with no kept choice),
    ``expert_load`` f32[E] (fraction of tokens whose first choice is e, before
    capacity; sums to 1), ``expert_fill`` f32[E] (kept choices per slot),
    ``router_confidence`` (mean score of the first choice), ``router_entropy`` (mean
    entropy of ``p``, nats), ``second_kept_fraction`` (choices after the first that
    survived policy and capacity; 0 for top-1) and ``choice_counts`` f32[E] (choices,
    all K, of valid tokens per expert over all groups, before policy and capacity: the
    input of :func:`update_selection_bias`).
  """
  _check_route_args(router_logits, top_k, capacity, second_policy, second_threshold,
                    rng, score_fn, selection_bias, expert_groups, top_groups,
                    gate_scale, balance_choices, queue_order)
  balance.check_scope(balance_scope)
  logits = router_logits.astype(common.router_dtype(router_logits))
  num_groups, group_size, num_experts = logits.shape
  valid = common.valid_tokens(token_mask, num_groups, group_size)

  if score_fn == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)  # f32[G, S, E]
    probs = scores
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)

  select = scores
  if selection_bias is not None:
    # The bias only steers the argmax below; no gradient reaches it.
    select = select + jax.lax.stop_gradient(
        jnp.asarray(selection_bias, jnp.float32).astype(logits.dtype))
  if expert_groups > 1:
    select = mask_to_top_groups(select, expert_groups, top_groups)

  expert_index = common.top_k_by_argmax(select, top_k)  # i32[G, S, K]
  raw_gates = common.take_experts(scores, expert_index)  # f32[G, S, K]
  gates = raw_gates
  if normalize_gates and top_k > 1:
    denom = jnp.sum(gates, axis=-1, keepdims=True)
    gates = gates / jnp.where(denom > 0, denom, 1.0)

  # Second-expert policy, on the (normalised) gates of choices 2..K.
  wanted = jnp.broadcast_to(valid[..., None] > 0, gates.shape)
  if top_k > 1:
    later = gates[..., 1:]
    if second_policy == "threshold":
      keep_later = later > second_threshold
    elif second_policy == "random":
      draw = jax.random.uniform(rng, later.shape, jnp.float32)
      keep_later = draw < later / second_threshold
    else:
      keep_later = jnp.ones_like(later, jnp.bool_)
    wanted = wanted.at[..., 1:].set(wanted[..., 1:] & keep_later)

  order = None
  if batch_priority:
    # Stable sort on -s keeps ties in position order.
    order = jnp.argsort(-raw_gates[..., 0], axis=-1, stable=True)  # i32[G, S]
  position = common.queue_positions(expert_index, wanted, num_experts, order,
                                    queue_order)
  kept = wanted & (position < capacity)
  kept_gates = jnp.where(kept, gates, 0.0) * gate_scale

  num_choices = 1 if balance_choices == "first" else top_k
  aux_loss = balance.load_balancing_loss(probs, expert_index, valid, num_choices,
                                         balance_scope)
  metrics = common.token_choice_metrics(expert_index, kept, valid, raw_gates[..., 0],
                                        probs, capacity)
  return RoutingOutput(
      expert_index=expert_index,
      position=position,
      kept=kept,
      gates=kept_gates,
      aux_loss=aux_loss,
      z_loss=common.z_loss(logits, valid),
      metrics=metrics,
      capacity=int(capacity),
  )
