"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

``H = clean + N(0, 1) * noise_std``; each token takes the top k of ``H`` and gates them
with the softmax over those k noisy logits (eq. 3-5). Balance comes from two losses on
squared coefficients of variation: importance (the gates each expert receives) and load
(the smooth estimate of how many tokens each expert receives, eq. 8-10). At inference
(``rng=None``) the noise is off and the load is the count of tokens that chose e.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import balance, common
from moe_jax.routing.common import RoutingOutput


def smooth_load(clean: jax.Array, noisy: jax.Array, noise_std: jax.Array,
                expert_index: jax.Array, valid: jax.Array) -> jax.Array:
  """f32[G, E]: Shazeer's ``load_e = sum_t Phi((clean_te - thr_te) / noise_std_te)``.

  ``thr_te`` is ``kth_excluding(noisy_t, k, e)``: the token's (k+1)-th largest noisy
  logit when e is among its k choices, its k-th largest otherwise. Each term is the
  probability that e stays in the token's top k under a fresh draw of its own noise,
  the other noisy logits held fixed (eq. 9). Needs ``k < E``.
  """
  num_experts = clean.shape[-1]
  top_k = expert_index.shape[-1]
  top_values = jax.lax.top_k(noisy, top_k + 1)[0]  # f32[G, S, K+1], descending
  in_top = jnp.any(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.bool_), axis=-2)
  thr = jnp.where(in_top, top_values[..., top_k:top_k + 1],
                  top_values[..., top_k - 1:top_k])
  prob = jax.scipy.stats.norm.cdf((clean - thr) / noise_std)
  return jnp.sum(prob * valid[..., None], axis=1)


def noisy_top_k(
    clean_logits: jax.Array,
    noise_std: jax.Array,
    top_k: int,
    capacity: int,
    rng: jax.Array | None = None,
    token_mask: jax.Array | None = None,
    queue_order: str = "choice_major",
    balance_scope: str = "group",
) -> RoutingOutput:
  """Shazeer et al. 2017 noisy top-k gating with capacity.

  Args:
    clean_logits: f32[G, S, E] router outputs ``x W_g``; cast to float32 (float64
      stays float64).
    noise_std: f32[G, S, E] > 0, the noise scale (``softplus(x W_noise)`` in the paper).
    top_k: choices per token, K.
    capacity: C, slots per expert and group.
    rng: PRNG key of the noise; None turns the noise off (inference).
    token_mask: optional bool[G, S]; False marks padding.
    queue_order: ``"choice_major"`` or ``"token_major"``, as in :func:`route`.
    balance_scope: ``"group"`` (default) or ``"batch"``: importance and load per group,
      or summed over the valid tokens of all groups at once (Shazeer et al. count them
      over the batch; the layer's ``"noisy_topk"`` router defaults to ``"batch"``).

  Returns:
    A :class:`RoutingOutput`. With ``rng``, ``noisy = clean + normal(rng) * noise_std``
    (float32), else ``noisy = clean``. Choices are the top k of ``noisy`` by repeated
    argmax (ties to the lowest index); gates are the softmax over the k chosen noisy
    logits. Capacity and priority are those of :func:`route` with policy ``"all"``
    (tokens in position order, choices interleaved by ``queue_order``); dropped
    choices get gate 0 and the others are not renormalised.

    ``aux_loss`` is the mean over groups of ``cv2(importance) + cv2(load)``, both per
    group over valid tokens and before capacity (with ``balance_scope="batch"``, one
    ``cv2`` each of the sums over all groups): ``importance_e`` sums the gates given
    to e; ``load_e`` is :func:`smooth_load` with ``rng`` and ``top_k < E``, and
    otherwise the number of tokens that chose e. ``cv2`` is :func:`cv2`. ``z_loss`` is
    that of :func:`route` on the clean logits.

    ``metrics`` are those of :func:`route` (``router_confidence`` and
    ``router_entropy`` of ``softmax(noisy)`` over all experts), plus
    ``importance_cv2`` and ``load_cv2``, the two terms of ``aux_loss``.
  """
  common.check_logits(clean_logits, "clean_logits")
  num_groups, group_size, num_experts = clean_logits.shape
  common.check_top_k(top_k, num_experts)
  common.check_capacity(capacity)
  common.check_queue_order(queue_order)
  balance.check_scope(balance_scope)
  if tuple(jnp.shape(noise_std)) != tuple(clean_logits.shape):
    raise ValueError(
        f"noise_std must have the shape of clean_logits {tuple(clean_logits.shape)}, "
        f"got {tuple(jnp.shape(noise_std))}.")
  dtype = common.router_dtype(clean_logits)
  clean = clean_logits.astype(dtype)
  noise_std = jnp.asarray(noise_std).astype(dtype)
  valid = common.valid_tokens(token_mask, num_groups, group_size)

  if rng is None:
    noisy = clean
  else:
    noisy = clean + jax.random.normal(rng, clean.shape, jnp.float32) * noise_std

  expert_index = common.top_k_by_argmax(noisy, top_k)  # i32[G, S, K]
  gates = jax.nn.softmax(common.take_experts(noisy, expert_index), axis=-1)
  wanted = jnp.broadcast_to(valid[..., None] > 0, gates.shape)
  position = common.queue_positions(expert_index, wanted, num_experts,
                                    queue_order=queue_order)
  kept = wanted & (position < capacity)
  kept_gates = jnp.where(kept, gates, 0.0)

  choice_hot = (jax.nn.one_hot(expert_index, num_experts)
                * valid[..., None, None])  # f32[G, S, K, E]
  importance = jnp.sum(choice_hot * gates[..., None], axis=(1, 2))  # f32[G, E]
  if rng is not None and top_k < num_experts:
    load = smooth_load(clean, noisy, noise_std, expert_index, valid)
  else:
    load = jnp.sum(choice_hot, axis=(1, 2))
  importance = balance.pool_groups(importance, balance_scope)  # f32[G or 1, E]
  load = balance.pool_groups(load, balance_scope)
  importance_cv2 = jnp.mean(balance.cv2(importance))
  load_cv2 = jnp.mean(balance.cv2(load))

  probs = jax.nn.softmax(noisy, axis=-1)
  metrics = common.token_choice_metrics(
      expert_index, kept, valid, common.take_experts(probs, expert_index)[..., 0],
      probs, capacity)
  metrics["importance_cv2"] = importance_cv2
  metrics["load_cv2"] = load_cv2
  return RoutingOutput(
      expert_index=expert_index,
      position=position,
      kept=kept,
      gates=kept_gates,
      aux_loss=importance_cv2 + load_cv2,
      z_loss=common.z_loss(clean, valid),
      metrics=metrics,
      capacity=int(capacity),
  )
