"""Routing read-outs of a model: the capacity sweep and per-token routing of every MoE layer.

Shapes use the project legend: B, L batch and length; E, K experts and choices per
token.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.layers import moe_layer
from moe_jax import routing


def capacity_sweep(
    logits: Any,
    capacity_factors: Sequence[float],
    *,
    top_k: int = 1,
    min_capacity: int = 1,
    **route_kwargs: Any,
) -> dict[str, np.ndarray]:
  """Routes fixed ``logits`` at each capacity factor; one entry per factor.

  Args:
    logits: f32[G, S, E] router logits.
    capacity_factors: the factors to try; ``C = expert_capacity(S, E, cf, min_capacity)``.
    top_k: K.
    min_capacity: lower bound on C (1 so that small factors really bite).
    **route_kwargs: passed to :func:`moe_jax.routing.route` (``second_policy``,
      ``second_threshold``, ``batch_priority``, ``rng``, ...).

  Returns:
    ``capacity`` i64[n], and f64[n] ``dropped_fraction`` (tokens with no kept choice),
    ``second_kept_fraction`` and ``kept_gate_mass`` (sum of kept gates over the sum of
    all gates the policy wanted, i.e. how much of the router's weight survives).
  """
  logits = jnp.asarray(logits, jnp.float32)
  _, group_size, num_experts = logits.shape
  out = collections.defaultdict(list)
  full = routing.route(logits, top_k=top_k, capacity=group_size, **route_kwargs)
  wanted_mass = float(jnp.sum(full.gates))
  for cf in capacity_factors:
    cap = routing.expert_capacity(group_size, num_experts, cf, min_capacity)
    r = routing.route(logits, top_k=top_k, capacity=cap, **route_kwargs)
    out["capacity"].append(cap)
    out["dropped_fraction"].append(float(r.metrics["dropped_fraction"]))
    out["second_kept_fraction"].append(float(r.metrics["second_kept_fraction"]))
    out["kept_gate_mass"].append(float(jnp.sum(r.gates)) / max(wanted_mass, 1e-30))
  return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------
# Per-token routing of a model
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerRouting:
  """Where the tokens of one MoE layer went, as host numpy arrays.

  Attributes:
    path: the layer's path in the model, e.g. ``"blocks/1/ffn"``.
    logits: f32[B, L, E] router logits.
    expert_index: i32[B, L, K] the expert of each choice (choice 0 is the argmax).
    kept: bool[B, L, K] the choice survived the second-expert policy and capacity.
    gates: f32[B, L, K] combine weight of each choice (0 where not kept).
    capacity: C of the call.
  """

  path: str
  logits: np.ndarray
  expert_index: np.ndarray
  kept: np.ndarray
  gates: np.ndarray
  capacity: int

  @property
  def num_experts(self) -> int:
    return self.logits.shape[-1]

  @property
  def probs(self) -> np.ndarray:
    """f32[B, L, E] router probabilities."""
    z = self.logits - self.logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)

  @property
  def top1(self) -> np.ndarray:
    """i32[B, L] first-choice expert, before capacity."""
    return self.expert_index[..., 0]

  @property
  def confidence(self) -> np.ndarray:
    """f32[B, L] probability of the first choice."""
    return self.probs.max(axis=-1)

  @property
  def entropy(self) -> np.ndarray:
    """f32[B, L] entropy of the routing distribution, nats."""
    p = self.probs
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=-1)

  @property
  def dropped(self) -> np.ndarray:
    """bool[B, L] tokens with no kept choice (their MoE output is 0)."""
    return ~self.kept.any(axis=-1)


def path_str(path: Iterable[Any]) -> str:
  return "/".join(str(p) for p in path)


def _captured(intermediates: Any, path: tuple) -> tuple:
  node = intermediates
  for key in path:
    if key not in node:
      return ()
    node = node[key]
  value = node.get_value() if isinstance(node, nnx.Variable) else node
  return tuple(value)


def _trace(model, inputs, deterministic, call_kwargs):
  _, intermediates = nnx.capture(model, nnx.Intermediate,
                                 method_outputs=nnx.Intermediate)(
                                     *inputs, deterministic=deterministic,
                                     **dict(call_kwargs))
  out = {}
  for path, layer in nnx.iter_modules(model):
    if not isinstance(layer, moe_layer.MoeLayer):
      continue
    calls = _captured(intermediates, tuple(path) + ("__call__",))
    routed = _captured(intermediates, tuple(path) + ("routing",))
    if len(calls) != 1 or len(routed) != 1:
      raise ValueError(f"MoE layer {path_str(path)!r} ran {len(calls)} times in one "
                       "forward pass; trace_routing needs exactly one call per layer.")
    y, _ = calls[0]
    r = routed[0]  # the RoutingOutput the layer dispatched with
    batch_shape = y.shape[:-1]
    num_tokens = math.prod(batch_shape)
    num_groups, group_size = r.expert_index.shape[:2]
    logits_calls = _captured(intermediates, tuple(path) + ("router", "__call__"))
    if logits_calls:
      logits = logits_calls[0]  # f32[G, S, E]
    else:  # no router (a fixed assignment): a point mass on the token's choices
      hot = jnp.any(jax.nn.one_hot(r.expert_index, r.metrics["expert_load"].shape[-1],
                                   dtype=jnp.bool_), axis=-2)
      logits = jnp.where(hot, 0.0, -jnp.inf)

    def per_token(a):
      a = a.reshape((num_groups * group_size,) + a.shape[2:])[:num_tokens]
      return a.reshape(batch_shape + a.shape[1:])

    out[path_str(path)] = {
        "logits": per_token(logits), "expert_index": per_token(r.expert_index),
        "kept": per_token(r.kept), "gates": per_token(r.gates),
        "capacity": jnp.asarray(r.capacity, jnp.int32)}
  return out


# One compiled program per model structure and mode (eager tracing of a model compiles
# every operation separately, which is much slower the first time).
_trace_jit = nnx.jit(_trace, static_argnames=("deterministic", "call_kwargs"))


def trace_routing(model: nnx.Module, *inputs: Any, deterministic: bool = True,
                  **call_kwargs: Any) -> dict[str, LayerRouting]:
  """Runs ``model(*inputs, deterministic=..., **call_kwargs)`` once and returns the
  routing of every :class:`~moe_jax.layers.moe_layer.MoeLayer` in it, by path.

  Each layer records, with ``nnx.capture`` and its ``sow_routing`` switch (set for the
  call and reset afterwards), the :class:`~moe_jax.routing.RoutingOutput` it dispatched
  with, so ``expert_index``, ``kept`` and ``gates`` are those of the forward pass
  (its noise and random second choices included; nothing is routed again), and its
  router's logits. Each MoE layer must be called exactly once per forward pass. The
  forward pass is jitted; the model's RNG state advances as in a normal call.

  Args:
    model: any nnx module containing MoE layers (a ``Transformer``, a ``MoeLayer``).
    *inputs: the model's positional inputs; the leading dimensions of each MoE layer's
      input ``[B, L, M]`` become the ``[B, L]`` of the result.
    deterministic: evaluation mode (``eval_capacity_factor``, no jitter), the default.
      With ``False`` the jittered logits of this call are the ones recorded.
    **call_kwargs: more keyword arguments for the model (hashable values).

  Raises:
    ValueError: for a scanned model (trace its ``unrolled()`` copy).

  Returns:
    ``{path: LayerRouting}`` in the model's graph order. A layer whose family has no
    router (no logits) reports as ``logits`` a point mass on each token's choices
    (0 there, -inf elsewhere).
  """
  if getattr(getattr(model, "cfg", None), "scan_layers", False):
    raise ValueError("trace_routing: a scanned model (model.scan_layers=True) calls its "
                     "MoE layers inside a scan; trace model.unrolled(), the same model "
                     "unrolled, instead.")
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, moe_layer.MoeLayer)]
  for layer in layers:
    layer.sow_routing = True
  try:
    out = _trace_jit(model, inputs, deterministic=deterministic,
                     call_kwargs=tuple(sorted(call_kwargs.items())))
  finally:
    for layer in layers:
      layer.sow_routing = False
  return {path: LayerRouting(path=path, capacity=int(v.pop("capacity")),
                             **{k: np.asarray(a) for k, a in v.items()})
          for path, v in out.items()}
