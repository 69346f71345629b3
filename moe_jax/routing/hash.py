"""Hash routing (Roller et al. 2021, "Hash Layers for Large Sparse Models"): each token
goes to a fixed expert chosen by a fixed random hash of its token id; nothing is learned.

The assignment (:func:`hash_experts`) is a *balanced* random one, computed from the id
alone (no table, no vocabulary size):

  ``expert(t) = (t mod E + r(t div E)) mod E``,  ``r(b) = fmix32(b xor HASH_SEED) mod E``

where ``fmix32`` is the 32-bit finaliser of MurmurHash3 (on uint32, wrapping) and
``HASH_SEED = 0x5EED``. The ids fall into blocks of E consecutive ids, and each block
is the experts ``0 .. E-1`` rotated by a pseudo-random amount ``r``: every block holds
each expert once, so over any vocabulary ``[0, V)`` the experts hold ``V / E`` ids each,
up to one, while which expert an id gets is decided by the hash. Roller et al. found
balanced assignments best; theirs balances by token *frequency* in the training data
(which needs the data's statistics), this one by vocabulary *types*. The hash is the
same in every layer, for training, evaluation and cached decoding, so a token id always
reaches the same expert.

Routing is top-1 with gate 1. With a capacity, the tokens of a group queue for their
expert in position order (token-major; top-1 has one choice per token), so a token's
routing never depends on later tokens (causal) and the overflow is dropped (output 0,
as for the other token-choice routers); ``capacity = S`` is dropless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.routing import common
from moe_jax.routing.common import RoutingOutput

HASH_SEED = 0x5EED


def fmix32(h: jax.Array) -> jax.Array:
  """u32[...] -> u32[...]: MurmurHash3's finaliser (a bijection on 32-bit integers)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_experts(token_ids: jax.Array, num_experts: int,
                 seed: int = HASH_SEED) -> jax.Array:
  """i32[...] token ids (>= 0) -> i32[...] their experts in ``[0, E)`` (see the module
  docstring)."""
  if int(num_experts) != num_experts or num_experts < 1:
    raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
  ids = jnp.asarray(token_ids).astype(jnp.uint32)
  e = np.uint32(num_experts)
  shift = fmix32((ids // e) ^ np.uint32(seed)) % e
  return ((ids % e + shift) % e).astype(jnp.int32)


def hash_route(token_ids: jax.Array, num_experts: int, *, capacity: int,
               token_mask: jax.Array | None = None,
               seed: int = HASH_SEED) -> RoutingOutput:
  """Routes i32[G, S] token ids to their hashed experts, top-1 with gate 1.

  Args:
    token_ids: i32[G, S] the tokens' ids (any value for padding).
    num_experts: E.
    capacity: C, slots per expert and group; tokens queue in position order and the
      ones past C are dropped (``C = S`` drops none).
    token_mask: bool[G, S] or None; False marks padding (never routed or counted).
    seed: the hash's seed (:data:`HASH_SEED`).

  Returns:
    A :class:`RoutingOutput` with K = 1. ``aux_loss`` and ``z_loss`` are 0 (there is
    no router to balance or regularise). ``metrics`` are those of
    :func:`moe_jax.routing.route` (``dropped_fraction``, ``expert_load``,
    ``expert_fill``, ``choice_counts`` count the hashed choices) with the
    distribution a point mass on the hashed expert: ``router_confidence`` 1,
    ``router_entropy`` 0, ``second_kept_fraction`` 0.
  """
  if getattr(token_ids, "ndim", None) != 2:
    raise ValueError(f"token_ids must have rank 2 [G, S], got shape "
                     f"{getattr(token_ids, 'shape', None)}.")
  common.check_capacity(capacity)
  num_groups, group_size = token_ids.shape
  valid = common.valid_tokens(token_mask, num_groups, group_size)
  expert_index = hash_experts(token_ids, num_experts, seed)[..., None]  # i32[G, S, 1]
  wanted = valid[..., None] > 0  # bool[G, S, 1]
  position = common.queue_positions(expert_index, wanted, num_experts,
                                    queue_order="token_major")
  kept = wanted & (position < capacity)
  probs = jax.nn.one_hot(expert_index[..., 0], num_experts, dtype=jnp.float32)
  metrics = common.token_choice_metrics(
      expert_index, kept, valid, jnp.ones((num_groups, group_size), jnp.float32),
      probs, capacity)
  zero = jnp.zeros((), jnp.float32)
  return RoutingOutput(expert_index=expert_index, position=position, kept=kept,
                       gates=kept.astype(jnp.float32), aux_loss=zero, z_loss=zero,
                       metrics=metrics, capacity=int(capacity))
