"""Load balancing: auxiliary losses, the selection-bias update, balance statistics.

* :func:`load_balancing_loss`: the Switch loss (Fedus et al. 2021, eq. 4-6), generalised
  to count the first ``K'`` choices of each token. ``K' = 1`` is Switch; ``K' = k`` is
  the loss of Mixtral (HF ``load_balancing_loss_func``, which is k times this one) and
  of DeepSeek-MoE's expert-level balance loss.
* :func:`update_selection_bias`: DeepSeek-V3's auxiliary-loss-free balancing (Wang et
  al. 2024; DeepSeek-V3 report, section 2.1.2).
* :func:`cv2`: the squared coefficient of variation of Shazeer et al. 2017.
* :func:`pool_groups`: the scope of the balance statistics, per routing group
  (``"group"``) or pooled over the whole batch (``"batch"``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

BALANCE_CHOICES = ("first", "all")
# Where the balance statistics are counted: per routing group, or over every group of
# the (global) batch, as Shazeer et al. 2017 count Importance(X) and Load(X).
BALANCE_SCOPES = ("group", "batch")


def check_scope(balance_scope) -> None:
  """Raises unless ``balance_scope`` is one of :data:`BALANCE_SCOPES`."""
  if balance_scope not in BALANCE_SCOPES:
    raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got "
                     f"{balance_scope!r}.")


def pool_groups(stats: jax.Array, balance_scope: str) -> jax.Array:
  """Per-group statistics ``f32[G, ...]`` in the given scope.

  ``"group"`` returns them unchanged; ``"batch"`` sums them over G into one group,
  ``f32[1, ...]``. Under ``jit`` on a mesh that sum runs over the global G axis (XLA
  adds the cross-device reduction), so the pooled value is the same on every mesh.
  """
  if balance_scope == "group":
    return stats
  return jnp.sum(stats, axis=0, keepdims=True)


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array, valid: jax.Array,
                        num_choices: int, balance_scope: str = "group") -> jax.Array:
  """``E / (K' T) * sum_e c_e P_e`` per group, averaged over groups with tokens.

  Args:
    probs: f32[G, S, E] the routing distribution ``p`` of each token (sums to 1 over E).
    expert_index: i32[G, S, K] each token's choices, before policy and capacity.
    valid: f32[G, S] 1 for real tokens; T is their number per group.
    num_choices: K', how many leading choices count in ``c_e`` (1 <= K' <= K).
    balance_scope: ``"group"``, or ``"batch"``: ``c_e``, ``P_e`` and T over the valid
      tokens of all G groups at once (one value, not a mean over groups).

  ``c_e`` counts the first K' choices of valid tokens that picked e and ``P_e`` is the
  mean of ``p_e`` over valid tokens, so a uniform router scores exactly 1 for any K'.
  """
  check_scope(balance_scope)
  num_experts = probs.shape[-1]
  hot = (jax.nn.one_hot(expert_index[..., :num_choices], num_experts)
         * valid[..., None, None])  # f32[G, S, K', E]
  counts = pool_groups(jnp.sum(hot, axis=(1, 2)), balance_scope)  # f32[G, E]
  prob_sums = pool_groups(jnp.sum(probs * valid[..., None], axis=1), balance_scope)
  num_valid = pool_groups(jnp.sum(valid, axis=-1), balance_scope)  # f32[G]
  safe_valid = jnp.maximum(num_valid, 1.0)
  frac_tokens = counts / (safe_valid[:, None] * num_choices)
  frac_probs = prob_sums / safe_valid[:, None]
  group_has_tokens = (num_valid > 0).astype(jnp.float32)
  per_group = num_experts * jnp.sum(frac_tokens * frac_probs, axis=-1)
  return jnp.sum(per_group * group_has_tokens) / jnp.maximum(
      jnp.sum(group_has_tokens), 1.0)


def update_selection_bias(bias: jax.Array, choice_counts: jax.Array,
                          rate: float | jax.Array) -> jax.Array:
  """DeepSeek-V3's bias update: ``bias + rate * sign(mean(counts) - counts)``, f32[E].

  Overloaded experts (more choices than the mean) are pushed down by ``rate``,
  underloaded ones up, and an expert exactly at the mean keeps its bias
  (``sign(0) = 0``). ``choice_counts`` is ``RoutingOutput.metrics["choice_counts"]``
  summed over the whole batch. The update sits outside the gradient: call it after the
  optimizer step.
  """
  bias = jnp.asarray(bias, jnp.float32)
  counts = jnp.asarray(choice_counts, jnp.float32)
  if bias.shape != counts.shape or bias.ndim != 1:
    raise ValueError(
        f"bias and choice_counts must both have shape [E], got {bias.shape} and "
        f"{counts.shape}.")
  rate = jnp.asarray(rate, jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(counts) - counts)


def cv2(x: jax.Array) -> jax.Array:
  """Squared coefficient of variation over the last axis: ``var / (mean^2 + 1e-10)``.

  ``var`` is the population variance (divides by E), as in Shazeer et al. 2017.
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
  return jnp.var(x, axis=-1) / (jnp.mean(x, axis=-1) ** 2 + 1e-10)


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
