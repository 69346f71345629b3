"""Mixture-of-Depths routing math (Raposo et al. 2024): pure functions, no parameters.

A routed block's router gives each token a scalar weight ``r`` (f32[B, L]). In each
sequence the ``k = ceil(capacity * L)`` tokens with the largest ``r`` go through the
block; the others skip it. The functions here pick those tokens, score a predictor of
that choice (the causal stand-in used at sampling) and report the block's metrics.
The block that uses them is :class:`moe_jax.models.mod.RoutedBlock`; docs/mod.md has the
formulas and the causality argument.

Shapes: ``B, L`` batch and sequence length, ``k`` the tokens a routed block selects
per sequence.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

# Predictors of the top-k choice that sampling routes with (Raposo et al. 2024, Sec. 3.5).
# moe_jax.models.mod.PREDICTORS holds their modules under the same names.
PREDICTOR_NAMES = ("router_bce", "mlp")


def depth_capacity(length: int, capacity: float) -> int:
  """k = ``ceil(capacity * L)``, the tokens a routed block takes from each sequence.

  The small epsilon keeps a product that lands a hair above an integer (0.3 * 10 =
  3.0000000000000004) from rounding up, as :func:`moe_jax.routing.expert_capacity`
  does. Raises if ``k`` is not in ``[1, L]``.
  """
  k = math.ceil(capacity * length - 1e-9)
  if not 1 <= k <= length:
    raise ValueError(
        f"mod_capacity={capacity!r} selects k = ceil({capacity!r} * {length}) = {k} of "
        f"{length} tokens; use a capacity in (0, 1] (Raposo et al. 2024: 0.125).")
  return k


def select_top_k(weights: jax.Array, k: int,
                 token_mask: jax.Array | None = None) -> jax.Array:
  """i32[B, k]: the positions of the ``k`` largest router weights of each row, ascending.

  Ties go to the lower position (a stable sort on ``-weights``). Padding
  (``token_mask`` False) ranks below every real token, so it is picked only when a row
  has fewer than ``k`` real tokens.

  Args:
    weights: f32[B, L] router weights ``r``.
    k: tokens per row, ``1 <= k <= L``.
    token_mask: optional bool[B, L], False on padding.
  """
  length = weights.shape[-1]
  if not 1 <= k <= length:
    raise ValueError(f"k={k} must be in [1, L={length}].")
  scores = weights.astype(jnp.float32)
  if token_mask is not None:
    scores = jnp.where(token_mask, scores, -jnp.inf)
  order = jnp.argsort(-scores, axis=-1, stable=True)[:, :k]
  return jnp.sort(order, axis=-1).astype(jnp.int32)


def membership(selected: jax.Array, length: int) -> jax.Array:
  """bool[B, L]: True at the positions listed in ``selected`` i32[B, k]."""
  hot = jax.nn.one_hot(selected, length, dtype=jnp.bool_)  # [B, k, L]
  return jnp.any(hot, axis=1)


def pack_routed(routed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Orders every row's routed tokens first, for a gather of all ``L`` tokens.

  The predictor routes a varying number of tokens, so a forward pass that routes with
  it (sampling without a cache) gathers all ``L`` tokens: the routed ones first, in
  position order, then the others (whose outputs the block throws away).

  Args:
    routed: bool[B, L].

  Returns:
    ``(order i32[B, L], first bool[B, L])``: the source position of each gathered
    token, and whether it is a routed one.
  """
  order = jnp.argsort(~routed, axis=-1, stable=True).astype(jnp.int32)
  return order, jnp.take_along_axis(routed, order, axis=-1)


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """[B, L, ...] -> [B, k, ...]: the rows' tokens at i32[B, k] ``index``.

  vmapped over B, so the gather keeps B as a batch dimension and stays local to the
  device that holds the row.
  """
  return jax.vmap(lambda row, i: jnp.take(row, i, axis=0))(x, index)


def scatter_add(x: jax.Array, index: jax.Array, delta: jax.Array) -> jax.Array:
  """``x`` [B, L, M] with ``delta`` [B, k, M] added at the distinct positions
  i32[B, k] ``index`` of each row; every other token is ``x`` exactly."""
  return jax.vmap(lambda row, i, d: row.at[i].add(d))(x, index, delta)


def predictor_bce(logits: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
  """f32[]: mean over valid tokens of the binary cross-entropy of ``sigmoid(logits)``
  against ``target`` (the top-k membership), ``softplus(z) - y z``."""
  z = logits.astype(jnp.float32)
  y = target.astype(jnp.float32)
  valid = valid.astype(jnp.float32)
  bce = jax.nn.softplus(z) - y * z
  return jnp.sum(bce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def predicted(logits: jax.Array) -> jax.Array:
  """bool: the predictor routes a token when ``sigmoid(logit) > 0.5``, i.e. logit > 0."""
  return logits > 0


def depth_metrics(weights: jax.Array, predictor_logits: jax.Array, target: jax.Array,
                  routed: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """The metrics of one routed block, means over valid tokens (all f32[]).

  Args:
    weights: f32[B, L] router weights ``r``.
    predictor_logits: f32[B, L] (``r`` itself for ``"router_bce"``).
    target: bool[B, L] top-k membership.
    routed: bool[B, L] the tokens the block ran on in this pass (``target`` in
      training; the predictor's choice at sampling).
    valid: bool[B, L], False on padding.

  Returns:
    ``routed_fraction`` (tokens that went through the block), ``predicted_fraction``
    (tokens the predictor would route), ``predictor_accuracy`` (predictor agrees with
    the top-k membership), ``router_mean`` and ``router_std`` of ``r``.
  """
  valid = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(valid), 1.0)

  def mean(v):
    return jnp.sum(v.astype(jnp.float32) * valid) / count

  guess = predicted(predictor_logits)
  r = weights.astype(jnp.float32)
  r_mean = mean(r)
  return {
      "routed_fraction": mean(routed),
      "predicted_fraction": mean(guess),
      "predictor_accuracy": mean(guess == target),
      "router_mean": r_mean,
      "router_std": jnp.sqrt(mean((r - r_mean) ** 2)),
  }


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_routed_layer(index: int, mod_every: int) -> bool:
  """Block ``index`` is a routed block: ``mod_every > 0 and index % mod_every ==
  mod_every - 1`` (2: blocks 1, 3, ...; the first block is always a full one)."""
  return mod_every > 0 and index % mod_every == mod_every - 1


def depth_errors(num_layers, mod_every, mod_capacity, mod_predictor, *,
                 seq_len=None, prefix: str = "") -> list[str]:
  """Every problem with the Mixture-of-Depths keys, one sentence each naming the
  value and the fix. ``prefix`` goes before the key names (``"model."``)."""
  p = prefix
  errors = []
  every_ok = _is_int(mod_every) and (mod_every == 0 or mod_every >= 2)
  if not every_ok:
    errors.append(f"{p}mod_every={mod_every!r} must be 0 (no routed block) or an integer "
                  ">= 2: routed blocks alternate with full blocks (Raposo et al. 2024: "
                  "2, every other block).")
  elif (mod_every and _is_int(num_layers) and num_layers >= 1
        and not any(is_routed_layer(i, mod_every) for i in range(num_layers))):
    errors.append(f"{p}mod_every={mod_every} places no routed block among "
                  f"{p}num_layers={num_layers} (block i is routed when i % mod_every == "
                  "mod_every - 1); use at least mod_every layers, or mod_every=0.")
  if not (_is_real(mod_capacity) and 0 < mod_capacity <= 1):
    if _is_real(mod_capacity) and mod_capacity <= 0:
      what = f"selects k = ceil({mod_capacity!r} * L) <= 0 tokens per sequence"
    elif _is_real(mod_capacity):
      what = "would select more than the L tokens of a sequence"
    else:
      what = "is not a number"
    errors.append(f"{p}mod_capacity={mod_capacity!r} {what}; use a fraction in (0, 1] "
                  "(Raposo et al. 2024: 0.125).")
  elif _is_int(seq_len) and seq_len >= 1 and math.ceil(mod_capacity * seq_len - 1e-9) < 1:
    errors.append(f"{p}mod_capacity={mod_capacity!r} selects 0 of the {seq_len} tokens "
                  "of a sequence; raise it.")
  if mod_predictor not in PREDICTOR_NAMES:
    errors.append(f"{p}mod_predictor={mod_predictor!r} is unknown; use 'router_bce' "
                  "(BCE on the router's logits) or 'mlp' (a small MLP on stop-gradient "
                  "inputs).")
  return errors
