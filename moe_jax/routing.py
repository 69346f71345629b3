"""Routing math: pure functions from router logits to dispatch/combine and losses.

Nothing here holds parameters or state, so a test or a notebook can feed logits by
hand and read the masks back. Shapes use the legend of the project:

  G, S  routing groups, tokens per group      E, C, K  experts, capacity, top_k
  M, H  model width, expert hidden width

Conventions (and where the anchor codebases differ):

* Capacity has no factor of k (Switch / Mesh-TF): ``C = ceil(cf * S / E)``. GShard's
  ``2N/E`` for top-2 therefore corresponds to ``capacity_factor=2.0``.
* Top-k gates are renormalised over the k choices when ``normalize_gates`` (GShard);
  flaxformer keeps the raw softmax probabilities. Top-1 always keeps the raw probability,
  as in Switch (a renormalised top-1 gate would be 1 and the router would get no gradient
  from the combine).
* Priority: all first choices (in token order within the group) are queued before any
  second choice, GShard-style, so a second choice can never take a slot from a first one.
* Dropped choices get combine weight 0 and the kept ones are not renormalised, so a token
  with no kept choice has MoE output exactly 0 and rides the residual connection.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

SECOND_POLICIES = ("all", "random", "threshold")


def expert_capacity(
    group_size: int,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int = 4,
) -> int:
  """Slots per expert and group: ``min(S, max(min_capacity, ceil(cf * S / E)))``.

  This is the Switch / Mesh-TF convention with no factor of ``top_k``: a top-2 layer at
  ``capacity_factor=2.0`` has GShard's ``2N/E`` slots. Capacity never exceeds the group
  size, since an expert can receive each token at most once.
  """
  if int(group_size) != group_size or group_size < 1:
    raise ValueError(f"group_size must be a positive integer, got {group_size!r}.")
  if int(num_experts) != num_experts or num_experts < 1:
    raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
  if not capacity_factor > 0:
    raise ValueError(
        f"capacity_factor must be > 0, got {capacity_factor!r}; 1.0 gives each expert "
        "an even share of the group's tokens.")
  if int(min_capacity) != min_capacity or min_capacity < 1:
    raise ValueError(f"min_capacity must be an integer >= 1, got {min_capacity!r}.")
  # The small epsilon keeps e.g. 1.25 * 1024 / 8 = 160.0 from rounding up to 161 when
  # the float product lands a hair above the integer.
  raw = math.ceil(capacity_factor * group_size / num_experts - 1e-9)
  return int(min(group_size, max(min_capacity, raw)))


@flax.struct.dataclass
class RoutingOutput:
  """The result of :func:`route`, kept in compact per-choice form.

  The ``[G, S, E, C]`` tensors ``dispatch_mask`` and ``combine_weights`` are derived on
  demand, so an index-based dispatch never materialises them (under ``jit`` they cost
  nothing unless read).

  Attributes:
    expert_index: i32[G, S, K] the expert of each choice (choice 0 is the argmax).
    position: i32[G, S, K] the choice's place in its expert's queue (may be >= C).
    kept: bool[G, S, K] the choice survived the second-expert policy and capacity.
    gates: f32[G, S, K] combine weight of each choice; 0 where not kept.
    capacity: C, static.
    aux_loss: f32[] Switch load-balancing loss, unscaled.
    z_loss: f32[] ST-MoE router z-loss, unscaled.
    metrics: dict of scalars and ``f32[E]`` vectors, see :func:`route`.
  """

  expert_index: jax.Array
  position: jax.Array
  kept: jax.Array
  gates: jax.Array
  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: dict[str, jax.Array]
  capacity: int = flax.struct.field(pytree_node=False)

  @property
  def num_experts(self) -> int:
    return self.metrics["expert_load"].shape[-1]

  @property
  def slot_mask(self) -> jax.Array:
    """bool[G, S, K, E, C]: one-hot (expert, slot) of each kept choice."""
    e_hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.bool_)
    c_hot = jax.nn.one_hot(self.position, self.capacity, dtype=jnp.bool_)
    return (e_hot[..., :, None] & c_hot[..., None, :]) & self.kept[..., None, None]

  @property
  def dispatch_mask(self) -> jax.Array:
    """bool[G, S, E, C]: token s of group g goes to slot c of expert e."""
    return jnp.any(self.slot_mask, axis=2)

  @property
  def combine_weights(self) -> jax.Array:
    """f32[G, S, E, C]: the gate of each kept (token, expert, slot); 0 elsewhere."""
    return jnp.einsum("GSKEC,GSK->GSEC", self.slot_mask.astype(jnp.float32),
                      self.gates)


def _check_route_args(router_logits, top_k, capacity, second_policy,
                      second_threshold, rng):
  if getattr(router_logits, "ndim", None) != 3:
    raise ValueError(
        "router_logits must have rank 3 [G, S, E] (groups, tokens per group, "
        f"experts), got shape {getattr(router_logits, 'shape', None)}.")
  num_experts = router_logits.shape[-1]
  if int(top_k) != top_k or not 1 <= top_k <= num_experts:
    raise ValueError(
        f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}.")
  if int(capacity) != capacity or capacity < 1:
    raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}.")
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
) -> RoutingOutput:
  """Routes each token to up to ``top_k`` experts with a fixed capacity per expert.

  Args:
    router_logits: f32[G, S, E] router outputs; any float dtype is cast to float32.
    top_k: choices per token, K. 1 is Switch, 2 is GShard; larger k is supported and
      applies the second-expert policy to every choice after the first.
    capacity: C, slots per expert and group (see :func:`expert_capacity`).
    second_policy: what to do with choices after the first, judged on their
      (normalised) gate g: ``"all"`` keeps them, ``"threshold"`` keeps them when
      ``g > second_threshold``, ``"random"`` keeps them with probability
      ``min(1, g / second_threshold)`` (GShard is threshold 0.5; Mesh-TF and ST-MoE 0.2).
    second_threshold: the threshold of the two policies above.
    normalize_gates: renormalise the top-k gates to sum to 1 (GShard) when ``top_k > 1``.
    batch_priority: V-MoE Batch Prioritized Routing: tokens queue by raw top-1
      probability, highest first (ties by position), instead of by position. It looks
      at the whole group, so it is for non-causal use only.
    rng: PRNG key, needed only for ``second_policy="random"``.
    token_mask: optional bool[G, S]; False marks padding, which is never routed and is
      left out of every loss and metric.

  Returns:
    A :class:`RoutingOutput`. ``metrics`` holds ``dropped_fraction`` (tokens with no
    kept choice), ``expert_load`` f32[E] (fraction of tokens whose first choice is e,
    before capacity; sums to 1), ``expert_fill`` f32[E] (kept choices per slot),
    ``router_confidence`` (mean top-1 probability), ``router_entropy`` (mean entropy
    of the routing distribution, nats) and ``second_kept_fraction`` (choices after the
    first that survived policy and capacity; 0 for top-1).
  """
  _check_route_args(router_logits, top_k, capacity, second_policy,
                    second_threshold, rng)
  logits = router_logits.astype(jnp.float32)
  num_groups, group_size, num_experts = logits.shape
  if token_mask is None:
    valid = jnp.ones((num_groups, group_size), jnp.float32)
  else:
    if token_mask.shape != (num_groups, group_size):
      raise ValueError(
          f"token_mask must have shape [G, S] = {(num_groups, group_size)}, got "
          f"{token_mask.shape}.")
    valid = token_mask.astype(jnp.float32)

  probs = jax.nn.softmax(logits, axis=-1)  # f32[G, S, E]

  # Top-k by repeated argmax: jnp.argmax returns the lowest index on ties, as the
  # contract requires (lax.top_k makes no such promise).
  expert_index, raw_gates = [], []
  remaining = probs
  for _ in range(top_k):
    idx = jnp.argmax(remaining, axis=-1)  # i32[G, S]
    expert_index.append(idx)
    raw_gates.append(jnp.take_along_axis(probs, idx[..., None], axis=-1)[..., 0])
    remaining = jnp.where(jax.nn.one_hot(idx, num_experts, dtype=jnp.bool_),
                          -jnp.inf, remaining)
  expert_index = jnp.stack(expert_index, axis=-1).astype(jnp.int32)  # i32[G, S, K]
  gates = jnp.stack(raw_gates, axis=-1)  # f32[G, S, K]
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
      u = jax.random.uniform(rng, later.shape, jnp.float32)
      keep_later = u < later / second_threshold
    else:
      keep_later = jnp.ones_like(later, jnp.bool_)
    wanted = wanted.at[..., 1:].set(wanted[..., 1:] & keep_later)

  # Queue order: choice-major, then tokens in priority order (position or BPR score).
  if batch_priority:
    # Stable sort on -p keeps ties in position order.
    order = jnp.argsort(-raw_gates[0], axis=-1, stable=True)  # i32[G, S]
  else:
    order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))
  choice_hot = (jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
                * wanted[..., None])  # i32[G, S, K, E]
  queued = jnp.take_along_axis(choice_hot, order[:, :, None, None], axis=1)
  queued = queued.transpose(0, 2, 1, 3).reshape(num_groups, top_k * group_size,
                                                num_experts)
  ahead = jnp.cumsum(queued, axis=1) - queued  # choices for e ahead of this one
  pos_sorted = jnp.sum(ahead * queued, axis=-1).reshape(num_groups, top_k, group_size)
  inverse = jnp.argsort(order, axis=-1)
  position = jnp.take_along_axis(pos_sorted.transpose(0, 2, 1), inverse[..., None],
                                 axis=1)  # i32[G, S, K]

  kept = wanted & (position < capacity)
  kept_gates = jnp.where(kept, gates, 0.0)

  # Losses and metrics, over valid tokens only.
  num_valid = jnp.sum(valid, axis=-1)  # f32[G]
  safe_valid = jnp.maximum(num_valid, 1.0)
  first_hot = jax.nn.one_hot(expert_index[..., 0], num_experts) * valid[..., None]
  # Switch: f_e counts first choices before capacity (Fedus et al. 2021, eq. 4-6).
  frac_tokens = jnp.sum(first_hot, axis=1) / safe_valid[:, None]  # f32[G, E]
  frac_probs = jnp.sum(probs * valid[..., None], axis=1) / safe_valid[:, None]
  group_has_tokens = (num_valid > 0).astype(jnp.float32)
  per_group_aux = num_experts * jnp.sum(frac_tokens * frac_probs, axis=-1)
  aux_loss = jnp.sum(per_group_aux * group_has_tokens) / jnp.maximum(
      jnp.sum(group_has_tokens), 1.0)
  total_valid = jnp.maximum(jnp.sum(valid), 1.0)
  # ST-MoE z-loss: on the logits, not the probabilities (Zoph et al. 2022, eq. 5).
  z_loss = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * valid) / total_valid

  token_kept = jnp.any(kept, axis=-1).astype(jnp.float32)
  dropped_fraction = jnp.sum((1.0 - token_kept) * valid) / total_valid
  kept_per_expert = jnp.sum(
      jax.nn.one_hot(expert_index, num_experts) * kept[..., None], axis=(0, 1, 2))
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  if top_k > 1:
    second_kept = jnp.sum(kept[..., 1:] * valid[..., None]) / (
        total_valid * (top_k - 1))
  else:
    second_kept = jnp.zeros((), jnp.float32)
  metrics = {
      "dropped_fraction": dropped_fraction,
      "expert_load": jnp.sum(first_hot, axis=(0, 1)) / total_valid,
      "expert_fill": kept_per_expert / (num_groups * capacity),
      "router_confidence": jnp.sum(raw_gates[0] * valid) / total_valid,
      "router_entropy": jnp.sum(entropy * valid) / total_valid,
      "second_kept_fraction": second_kept,
  }
  return RoutingOutput(
      expert_index=expert_index,
      position=position.astype(jnp.int32),
      kept=kept,
      gates=kept_gates,
      aux_loss=aux_loss,
      z_loss=z_loss,
      metrics=metrics,
      capacity=int(capacity),
  )


def load_balance_summary(expert_load: Any) -> dict[str, float]:
  """Host-side balance statistics of an ``f32[E]`` load vector (sums to 1).

  ``cv`` is the coefficient of variation (0 is perfectly balanced); ``max_over_mean``
  is the busiest expert's load relative to an even share.
  """
  import numpy as np
  load = np.asarray(expert_load, dtype=np.float64)
  mean = load.mean()
  return {
      "cv": float(load.std() / mean) if mean > 0 else float("nan"),
      "max_over_mean": float(load.max() / mean) if mean > 0 else float("nan"),
      "min": float(load.min()),
      "max": float(load.max()),
  }
