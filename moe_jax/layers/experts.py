"""Feed-forward experts with stacked weights, and the dense FFN they replace.

Experts hold their weights stacked along a leading E axis (``wi: [E, M, H]``,
``wo: [E, H, M]``) so that all experts run as one batched einsum, and so that sharding
the E axis over a mesh axis is expert parallelism. Both run their matmuls on 2-D token
rows (per expert for the experts), the form XLA:CPU runs fastest
(:mod:`moe_jax.layers.projection`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.grouped_matmul import GROUPED_MATMULS, resolve_grouped_matmul
from moe_jax.layers.lora_adapters import weight
from moe_jax.layers.projection import project
from moe_jax.layers.protocols import Flops, LoraWeight, param_size

ACTIVATIONS = ("relu", "gelu", "swiglu")

# Logical axis names of every parameter (their ``logical_axes`` metadata); sharding.py
# maps them onto mesh axes.
EXPERT_AXES = {
    "wi": ("expert", "embed", "mlp"),
    "wi_gate": ("expert", "embed", "mlp"),
    "wo": ("expert", "mlp", "embed"),
}
DENSE_AXES = {
    "wi": ("embed", "mlp"),
    "wi_gate": ("embed", "mlp"),
    "wo": ("mlp", "embed"),
}


def scaled_init(scale: float, *, in_axis: int = -2, out_axis: int = -1,
                batch_axis: tuple[int, ...] = ()) -> Callable:
  """Switch init: truncated normal with variance ``scale / fan_in``.

  Fedus et al. (2021, Sec. 2.3) use scale 0.1 instead of 1.0 for stability.
  """
  return jax.nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


def activate(activation: str, h: jax.Array, gate: jax.Array | None) -> jax.Array:
  if activation == "relu":
    return jax.nn.relu(h)
  if activation == "gelu":
    return jax.nn.gelu(h)
  if activation == "swiglu":
    return jax.nn.silu(gate) * h
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")


def _ffn_targets(module, target: str, *, batch_dims: int) -> tuple[LoraWeight, ...]:
  return tuple(LoraWeight(target, name, batch_dims=batch_dims)
               for name in ("wi", "wi_gate", "wo") if getattr(module, name) is not None)


class Experts(nnx.Module):
  """E independent FFNs ``x -> act(x W_i) W_o`` applied to per-expert buffers.

  Declares its logical axes (:data:`EXPERT_AXES`) and LoRA targets (one adapter per
  expert); its FLOPs are counted by the :class:`~moe_jax.layers.moe_layer.MoeLayer`
  that routes to it, which alone knows the share of the experts a token visits.
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *,
               activation: str = "relu", dropout_rate: float = 0.0,
               init_scale: float = 0.1, dtype=jnp.float32,
               param_dtype=jnp.float32, grouped_matmul: str = "auto",
               rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    init = scaled_init(init_scale, batch_axis=(0,))
    self.activation = activation
    self.dtype = dtype
    # How ragged() runs its grouped matmuls (moe_jax.layers.grouped_matmul; "auto": per
    # backend).
    self.grouped_matmul = grouped_matmul
    self.wi = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype),
                        logical_axes=EXPERT_AXES["wi"])
    if activation == "swiglu":
      self.wi_gate = nnx.Param(
          init(rngs.params(), (num_experts, d_model, d_ff), param_dtype),
          logical_axes=EXPERT_AXES["wi_gate"])
    else:
      self.wi_gate = None
    self.wo = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model), param_dtype),
                        logical_axes=EXPERT_AXES["wo"])
    # Switch "expert dropout": dropout on the expert hidden layer.
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """Runs each expert on its own buffer.

    Args:
      x: [E, G, C, M] expert buffers (any layout with E first and M last works).

    Returns:
      [E, G, C, M] expert outputs, in the compute dtype.
    """
    shape = x.shape
    # One row axis T = G*C per expert: a single contracted axis in the weight
    # gradients, which XLA:CPU runs without transposing the buffers (projection.py).
    rows = math.prod(shape[1:-1])
    x = x.astype(self.dtype).reshape(shape[0], rows, shape[-1])  # [E, T, M]
    wi = weight(self, "wi").astype(self.dtype)
    wo = weight(self, "wo").astype(self.dtype)
    h = jnp.einsum("ETM,EMH->ETH", x, wi)
    gate = None
    if self.wi_gate is not None:
      gate = jnp.einsum("ETM,EMH->ETH", x, weight(self, "wi_gate").astype(self.dtype))
    h = activate(self.activation, h, gate)
    h = self.dropout(h, deterministic=deterministic)
    return jnp.einsum("ETH,EHM->ETM", h, wo).reshape(shape)

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """wi, wi_gate ``[E, M, H]`` and wo ``[E, H, M]``, one adapter per expert."""
    return _ffn_targets(self, "experts", batch_dims=1)

  def weights(self) -> dict[str, jax.Array]:
    """``{"wi", "wo"[, "wi_gate"]}``: the stacked weights with their LoRA updates
    (:func:`moe_jax.layers.lora_adapters.weight`), as the dispatch paths that take them
    explicitly read them."""
    names = ("wi", "wo") + (("wi_gate",) if self.wi_gate is not None else ())
    return {name: weight(self, name) for name in names}

  def ragged(self, x: jax.Array, group_sizes: jax.Array, *,
             deterministic: bool | None = None,
             weights: dict[str, jax.Array] | None = None,
             rng: jax.Array | None = None) -> jax.Array:
    """Runs the experts on rows sorted by expert, as grouped matmuls.

    ``self.grouped_matmul`` picks the implementation
    (:mod:`moe_jax.layers.grouped_matmul`): ``megablox``, expert ``tiled`` rows or
    ``ragged_dot``, the same products up to float rounding; with dropout, the masks are drawn in the
    implementation's layout (so a run with expert dropout draws other masks under the
    other implementation).

    Args:
      x: [N, M] rows; the first ``group_sizes[0]`` belong to expert 0, the next
        ``group_sizes[1]`` to expert 1, and so on.
      group_sizes: i32[E] rows per expert; rows past ``sum(group_sizes)`` get output 0.
      weights: ``{"wi", "wo"[, "wi_gate"]}`` to use instead of the module's own, e.g.
        one device's shard ``[E_l, M, H_l]`` inside ``shard_map``
        (:mod:`moe_jax.layers.dropless`); E is then their leading size.
      rng: dropout key to use instead of the module's stream.

    Returns:
      [N, M] expert outputs, in the compute dtype.
    """
    if weights is None:
      weights = self.weights()
    how = resolve_grouped_matmul(self.grouped_matmul)
    g = GROUPED_MATMULS[how](x, group_sizes, self.dtype)  # rows in its layout
    h = g.matmul(g.rows, weights["wi"])  # [N, H] (as tiles under "tiled")
    gate = g.matmul(g.rows, weights["wi_gate"]) if "wi_gate" in weights else None
    h = activate(self.activation, h, gate)
    h = self.dropout(h, deterministic=deterministic, rngs=rng)
    return g.finish(g.matmul(h, weights["wo"]))  # [N, M]

  def gathered(self, x: jax.Array, expert_index: jax.Array, *,
               deterministic: bool | None = None) -> jax.Array:
    """Runs each token through its chosen experts, gathering only their weights.

    Args:
      x: [T, M] tokens.
      expert_index: i32[T, K] the experts of each token.

    Returns:
      [T, K, M] expert outputs, in the compute dtype. Reads T*K experts' weights
      instead of E, which is what a decode step of a few tokens wants (T*K < E).
    """
    x = x.astype(self.dtype)

    def pick(name):  # [T, K, ...]
      return jnp.take(weight(self, name), expert_index, axis=0).astype(self.dtype)

    h = jnp.einsum("TM,TKMH->TKH", x, pick("wi"))
    gate = None
    if self.wi_gate is not None:
      gate = jnp.einsum("TM,TKMH->TKH", x, pick("wi_gate"))
    h = activate(self.activation, h, gate)
    h = self.dropout(h, deterministic=deterministic)
    return jnp.einsum("TKH,TKHM->TKM", h, pick("wo"))


class DenseFfn(nnx.Module):
  """The dense feed-forward block an MoE layer replaces: same M, H and activation.

  ``lora_target`` is the ``finetune.targets`` entry that covers its weights:
  ``"dense_ffn"`` for a block's FFN, ``"shared_experts"`` for an MoE layer's shared
  experts.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu",
               dropout_rate: float = 0.0, init_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32,
               lora_target: str = "dense_ffn", rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    init = scaled_init(init_scale)
    self.activation = activation
    self.dtype = dtype
    self.lora_target = lora_target
    self.wi = nnx.Param(init(rngs.params(), (d_model, d_ff), param_dtype),
                        logical_axes=DENSE_AXES["wi"])
    if activation == "swiglu":
      self.wi_gate = nnx.Param(init(rngs.params(), (d_model, d_ff), param_dtype),
                               logical_axes=DENSE_AXES["wi_gate"])
    else:
      self.wi_gate = None
    self.wo = nnx.Param(init(rngs.params(), (d_ff, d_model), param_dtype),
                        logical_axes=DENSE_AXES["wo"])
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def flops_per_token(self, tokens: int) -> Flops:
    """2 x its weights: every token passes it."""
    del tokens
    return Flops.dense(2 * param_size(self))

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """wi, wi_gate ``[M, H]`` and wo ``[H, M]``, under :attr:`lora_target`."""
    return _ffn_targets(self, self.lora_target, batch_dims=0)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """x: [..., M] -> [..., M]."""
    x = x.astype(self.dtype)
    h = project(x, weight(self, "wi").astype(self.dtype))
    gate = None
    if self.wi_gate is not None:
      gate = project(x, weight(self, "wi_gate").astype(self.dtype))
    h = activate(self.activation, h, gate)
    h = self.dropout(h, deterministic=deterministic)
    return project(h, weight(self, "wo").astype(self.dtype))
