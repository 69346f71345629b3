"""Routing math: pure functions from router logits to a :class:`RoutingOutput`.

Nothing here holds parameters or state, so a test or a notebook can feed logits by
hand and read the masks back. One module per family, all returning the same typed
result in per-choice form, so every dispatch path consumes any of them:

* :mod:`~moe_jax.routing.token_choice`: :func:`route`, tokens pick their top-k experts
  (Switch, GShard, Mixtral, DeepSeek: sigmoid scores, selection bias, group-limited
  routing, gate scale).
* :mod:`~moe_jax.routing.expert_choice`: :func:`expert_choice`, experts pick their
  tokens (Zhou et al. 2022).
* :mod:`~moe_jax.routing.noisy`: :func:`noisy_top_k`, noisy top-k gating with the
  importance and load losses (Shazeer et al. 2017).
* :mod:`~moe_jax.routing.hash`: :func:`hash_route`, hash layers (Roller et al. 2021):
  each token id goes to a fixed expert by a fixed random hash, no learned router.
* :mod:`~moe_jax.routing.balance`: the auxiliary losses, DeepSeek-V3's
  :func:`update_selection_bias`, :func:`cv2` and :func:`pool_groups` (per-group or
  whole-batch balance statistics).
* :mod:`~moe_jax.routing.noop`: :func:`split_noop_experts`, MoDE's no-op experts
  (Raposo et al. 2024).
* :mod:`~moe_jax.routing.depth`: Mixture-of-Depths (Raposo et al. 2024): per-sequence
  top-k of the router weights (:func:`select_top_k`), the predictor's loss and the
  routed block's metrics.
* :mod:`~moe_jax.routing.common`: :class:`RoutingOutput`, :func:`expert_capacity`,
  queueing, metrics and the z-loss, shared by all of them.

See docs/routing.md for the formulas as built and where the anchors differ.
"""

from moe_jax.routing.balance import (BALANCE_CHOICES, BALANCE_SCOPES, cv2,
                                     load_balance_summary, load_balancing_loss,
                                     pool_groups, update_selection_bias)
from moe_jax.routing.common import (QUEUE_ORDERS, SECOND_POLICIES, RoutingOutput,
                                    expert_capacity, gate_mass)
from moe_jax.routing.depth import depth_capacity, select_top_k
from moe_jax.routing.expert_choice import expert_choice
from moe_jax.routing.hash import hash_route
from moe_jax.routing.noisy import noisy_top_k, smooth_load
from moe_jax.routing.noop import split_noop_experts
from moe_jax.routing.token_choice import SCORE_FNS, mask_to_top_groups, route

__all__ = [
    "BALANCE_CHOICES",
    "BALANCE_SCOPES",
    "QUEUE_ORDERS",
    "SCORE_FNS",
    "SECOND_POLICIES",
    "RoutingOutput",
    "cv2",
    "depth_capacity",
    "expert_capacity",
    "expert_choice",
    "gate_mass",
    "hash_route",
    "load_balance_summary",
    "load_balancing_loss",
    "mask_to_top_groups",
    "noisy_top_k",
    "pool_groups",
    "route",
    "select_top_k",
    "smooth_load",
    "split_noop_experts",
    "update_selection_bias",
]
