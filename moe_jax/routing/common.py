"""What every router shares: the typed result, capacity, queueing, metrics, z-loss.

Nothing here holds parameters or state. Shapes use the legend of the project:

  G, S  routing groups, tokens per group      E, C, K  experts, capacity, choices
  M, H  model width, expert hidden width

Conventions (and where the anchor codebases differ):

* Capacity has no factor of k (Switch / Mesh-TF): ``C = ceil(cf * S / E)``. GShard's
  ``2N/E`` for top-2 therefore corresponds to ``capacity_factor=2.0``.
* Priority: by default all first choices (in priority order within the group) are
  queued before any second choice, GShard-style, so a second choice can never take a
  slot from a first one. That order looks ahead: a token's second choice competes with
  the first choices of later tokens. ``queue_order="token_major"`` queues each token's
  choices together, in position order, as MaxText does; it is the causal order a
  causal LM with capacity and ``K > 1`` needs (see docs/routing.md).
* Dropped choices get combine weight 0 and the kept ones are not renormalised, so a token
  with no kept choice has MoE output exactly 0 and rides the residual connection.
"""

from __future__ import annotations

import math

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
  """The result of every router, kept in compact per-choice form.

  Token-choice routers have K = ``top_k``; expert choice has K = E with
  ``expert_index[..., j] = j``. The ``[G, S, E, C]`` tensors ``dispatch_mask`` and
  ``combine_weights`` are derived on demand, so an index-based dispatch never
  materialises them (under ``jit`` they cost nothing unless read).

  Attributes:
    expert_index: i32[G, S, K] the expert of each choice (choice 0 is the argmax).
    position: i32[G, S, K] the choice's place in its expert's queue (may be >= C).
    kept: bool[G, S, K] the choice survived the second-expert policy and capacity.
    gates: f32[G, S, K] combine weight of each choice; 0 where not kept.
    capacity: C, static.
    noop_experts: N, static: choices of experts ``E .. E+N-1`` are no-op choices,
      never kept for dispatch (0 without MoDE).
    aux_loss: f32[] load-balancing loss of the router, unscaled.
    z_loss: f32[] ST-MoE router z-loss, unscaled.
    metrics: dict of scalars and ``f32[E]`` vectors, see each router.
  """

  expert_index: jax.Array
  position: jax.Array
  kept: jax.Array
  gates: jax.Array
  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: dict[str, jax.Array]
  capacity: int = flax.struct.field(pytree_node=False)
  noop_experts: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_experts(self) -> int:
    """E, the experts the dispatch paths fill. The metrics count ``noop_experts``
    more (MoDE's no-op experts, the last indices), which compute nothing and have no
    buffers (:func:`moe_jax.routing.noop.split_noop_experts`)."""
    return self.metrics["expert_load"].shape[-1] - self.noop_experts

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


# ----------------------------------------------------------------------------
# Argument checks shared by the routers
# ----------------------------------------------------------------------------


def check_logits(router_logits, name: str = "router_logits") -> None:
  if getattr(router_logits, "ndim", None) != 3:
    raise ValueError(
        f"{name} must have rank 3 [G, S, E] (groups, tokens per group, "
        f"experts), got shape {getattr(router_logits, 'shape', None)}.")


def check_top_k(top_k, num_experts: int) -> None:
  if int(top_k) != top_k or not 1 <= top_k <= num_experts:
    raise ValueError(
        f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}.")


def check_capacity(capacity) -> None:
  if int(capacity) != capacity or capacity < 1:
    raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}.")


def router_dtype(x) -> jnp.dtype:
  """The dtype routing math runs in: float32, or float64 for float64 inputs (with
  ``jax_enable_x64``, as the gradient checks use); never narrower than float32."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def valid_tokens(token_mask, num_groups: int, group_size: int) -> jax.Array:
  """f32[G, S]: 1 for real tokens, 0 for padding (all ones when ``token_mask`` is None)."""
  if token_mask is None:
    return jnp.ones((num_groups, group_size), jnp.float32)
  if token_mask.shape != (num_groups, group_size):
    raise ValueError(
        f"token_mask must have shape [G, S] = {(num_groups, group_size)}, got "
        f"{token_mask.shape}.")
  return token_mask.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Choices and queueing
# ----------------------------------------------------------------------------


def top_k_by_argmax(scores: jax.Array, top_k: int) -> jax.Array:
  """i32[..., K]: the k largest of f32[..., E] along the last axis, by repeated argmax.

  ``jnp.argmax`` returns the lowest index on ties, which is the tie rule of every
  router here (``lax.top_k`` makes no such promise).
  """
  num_experts = scores.shape[-1]
  expert_index = []
  remaining = scores
  for _ in range(top_k):
    idx = jnp.argmax(remaining, axis=-1)
    expert_index.append(idx)
    remaining = jnp.where(jax.nn.one_hot(idx, num_experts, dtype=jnp.bool_),
                          -jnp.inf, remaining)
  return jnp.stack(expert_index, axis=-1).astype(jnp.int32)


def take_experts(values: jax.Array, expert_index: jax.Array) -> jax.Array:
  """f32[G, S, K]: ``values[g, s, expert_index[g, s, k]]``."""
  return jnp.take_along_axis(values, expert_index, axis=-1)


QUEUE_ORDERS = ("choice_major", "token_major")


def check_queue_order(queue_order) -> None:
  if queue_order not in QUEUE_ORDERS:
    raise ValueError(
        f"queue_order must be one of {QUEUE_ORDERS}, got {queue_order!r}.")


def queue_positions(expert_index: jax.Array, wanted: jax.Array, num_experts: int,
                    order: jax.Array | None = None,
                    queue_order: str = "choice_major") -> jax.Array:
  """i32[G, S, K]: each wanted choice's place in its expert's queue.

  Tokens take their turns in ``order`` (i32[G, S], a permutation of the tokens; token
  order when None). ``queue_order`` says how the K choices of the tokens interleave:

  * ``"choice_major"`` (GShard, flaxformer): every wanted first choice in token order,
    then every wanted second choice in the same order, and so on. A second choice never
    takes a slot from a first one, but whether token t's second choice is kept depends
    on the first choices of the tokens after t.
  * ``"token_major"`` (MaxText's cumsum over ``S*K``): (token 0, choice 0), (token 0,
    choice 1), ..., (token 1, choice 0), ...; the choice ``(t, j)`` is at place
    ``t*K + j``. With ``order`` in position order, nothing a token gets depends on later
    tokens, which is what a causal LM needs.

  Choices that are not wanted take no place; their position is meaningless (read it
  together with ``wanted``). For ``K = 1`` the two orders are the same.
  """
  check_queue_order(queue_order)
  num_groups, group_size, top_k = expert_index.shape
  if order is None:
    order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))
  choice_hot = (jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
                * wanted[..., None])  # i32[G, S, K, E]
  queued = jnp.take_along_axis(choice_hot, order[:, :, None, None], axis=1)
  if queue_order == "choice_major":
    queued = queued.transpose(0, 2, 1, 3)  # i32[G, K, S, E]
  queued = queued.reshape(num_groups, top_k * group_size, num_experts)
  ahead = jnp.cumsum(queued, axis=1) - queued  # choices for e ahead of this one
  pos_sorted = jnp.sum(ahead * queued, axis=-1)  # i32[G, K*S] or i32[G, S*K]
  if queue_order == "choice_major":
    pos_sorted = pos_sorted.reshape(num_groups, top_k, group_size).transpose(0, 2, 1)
  else:
    pos_sorted = pos_sorted.reshape(num_groups, group_size, top_k)
  inverse = jnp.argsort(order, axis=-1)
  position = jnp.take_along_axis(pos_sorted, inverse[..., None], axis=1)
  return position.astype(jnp.int32)


# ----------------------------------------------------------------------------
# Losses and metrics
# ----------------------------------------------------------------------------


def z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over valid tokens of ``logsumexp(logits)^2``.

  On the logits, not the probabilities (Zoph et al. 2022, eq. 5).
  """
  total_valid = jnp.maximum(jnp.sum(valid), 1.0)
  return jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * valid) / total_valid


def mean_entropy(probs: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean over valid tokens of the entropy (nats) of f32[G, S, E] distributions."""
  total_valid = jnp.maximum(jnp.sum(valid), 1.0)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return jnp.sum(entropy * valid) / total_valid


def choice_counts(expert_index: jax.Array, valid: jax.Array,
                  num_experts: int) -> jax.Array:
  """f32[E]: choices (all K) of valid tokens per expert, summed over groups."""
  hot = jax.nn.one_hot(expert_index, num_experts) * valid[..., None, None]
  return jnp.sum(hot, axis=(0, 1, 2))


def gate_mass(out: RoutingOutput) -> jax.Array:
  """f32[E(+N)]: the combine weight each expert received, summed over all choices.

  ``gates`` are 0 for dropped and padding choices, so this is the mass of the kept
  ones: DeepSeek's ``sum_t g_{i,t}``, the numerator of ESFT's average gate score
  (Wang et al. 2024, eq. 5; :mod:`moe_jax.peft.esft`).
  """
  num_experts = out.metrics["expert_load"].shape[-1]
  hot = jax.nn.one_hot(out.expert_index, num_experts, dtype=jnp.float32)
  return jnp.sum(hot * out.gates.astype(jnp.float32)[..., None], axis=(0, 1, 2))


def token_choice_metrics(expert_index: jax.Array, kept: jax.Array, valid: jax.Array,
                         top1_prob: jax.Array, probs: jax.Array,
                         capacity: int) -> dict[str, jax.Array]:
  """The metrics of a token-choice router (see :func:`moe_jax.routing.route`).

  ``top1_prob`` f32[G, S] is the probability of each token's first choice and
  ``probs`` f32[G, S, E] the distribution whose entropy is reported.
  """
  num_groups, _, top_k = expert_index.shape
  num_experts = probs.shape[-1]
  total_valid = jnp.maximum(jnp.sum(valid), 1.0)
  first_hot = jax.nn.one_hot(expert_index[..., 0], num_experts) * valid[..., None]
  token_kept = jnp.any(kept, axis=-1).astype(jnp.float32)
  kept_per_expert = jnp.sum(
      jax.nn.one_hot(expert_index, num_experts) * kept[..., None], axis=(0, 1, 2))
  if top_k > 1:
    second_kept = jnp.sum(kept[..., 1:] * valid[..., None]) / (
        total_valid * (top_k - 1))
  else:
    second_kept = jnp.zeros((), jnp.float32)
  return {
      "dropped_fraction": jnp.sum((1.0 - token_kept) * valid) / total_valid,
      "expert_load": jnp.sum(first_hot, axis=(0, 1)) / total_valid,
      "expert_fill": kept_per_expert / (num_groups * capacity),
      "router_confidence": jnp.sum(top1_prob * valid) / total_valid,
      "router_entropy": mean_entropy(probs, valid),
      "second_kept_fraction": second_kept,
      "choice_counts": choice_counts(expert_index, valid, num_experts),
  }
