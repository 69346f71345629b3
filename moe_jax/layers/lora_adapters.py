"""Low-rank adapters on any weight of the model, as flax's ``nnx.LoRAParam``.

A weight ``W`` of shape ``[*batch, *in, *out]`` (``batch``: the E axis of stacked
experts, or nothing; ``in``: the contracted axes, two for attention's output
``[N, D, M]``) gets an :class:`Adapter` beside it holding

    lora_a: LoRAParam [*batch, K, r]   (K = prod(in), uniform init, see A_INITS)
    lora_b: LoRAParam [*batch, r, N]   (N = prod(out), zeros)

and every read of the weight goes through :func:`weight`, which returns

    W' = W + (alpha / r) * reshape(lora_a @ lora_b, W.shape)

so a stacked expert weight ``wi [E, M, H]`` gets one adapter per expert,
``A [E, M, r]`` and ``B [E, r, H]`` (Hu et al. 2021, eq. 3, per expert). With B = 0
the sum adds exact zeros: an adapted model's outputs at step 0 equal the base
model's bit for bit. :func:`merge` folds the adapters into the weights.

Why the update is added to the weight, not to the activations (``x W + x A B``, as
``nnx.LoRA`` does): the model reads each weight in several places, e.g. the experts
by one-hot einsum, by gathered slots, by ``ragged_dot`` grouped matmuls inside a
``shard_map`` and by gathered rows when decoding. Adding the delta where the weight
is read gives every path, present and future, the same adapted weight from one line,
and the dispatch code stays untouched. The cost is one ``[*batch, K, r] @ [*batch, r,
N]`` matmul per weight and step (r/T of the token matmuls' FLOPs for T tokens per
expert) and a transient weight-sized delta; the trainable parameters, their gradients
and the optimizer state are the adapters' alone, which is what LoRA saves.

The adapter lives in an attribute ``<weight name>_lora`` of the module that owns the
weight (``experts.wi_lora``), so checkpoints and the ``nnx.LoRAParam`` filter that
fine-tuning splits the model by (``nnx.split``) find it by the ordinary state paths. Which
weights get one is decided by :mod:`moe_jax.peft.lora` from what the model's modules
declare (``lora_targets()``, :mod:`moe_jax.layers.protocols`); this module knows
nothing about the model.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.protocols import Flops

SUFFIX = "_lora"
# The A factor's init, uniform on [-bound, bound] over its fan-in K:
# "he_uniform": flax's nnx.LoRA default, bound sqrt(6 / K);
# "kaiming_uniform_a_sqrt5": HF PEFT's (torch's kaiming_uniform_(a=sqrt(5)) on Linear
#   weights), gain sqrt(2 / (1 + 5)), bound sqrt(1 / K): sqrt(6) = 2.45x smaller.
A_INITS = {"he_uniform": 2.0, "kaiming_uniform_a_sqrt5": 1.0 / 3.0}  # variance scale


def a_bound(a_init: str, fan_in: int) -> float:
  """The bound of A's uniform init: ``sqrt(3 * scale / K)`` (:data:`A_INITS`)."""
  return math.sqrt(3.0 * A_INITS[a_init] / fan_in)


class Adapter(nnx.Module):
  """LoRA factors of one weight; :meth:`delta` is the scaled update, W's shape.

  Attributes:
    lora_a: ``nnx.LoRAParam`` [*batch, K, r].
    lora_b: ``nnx.LoRAParam`` [*batch, r, N], zeros at init.
    scale: alpha / rank.
    shape: the adapted weight's shape.

  ``a_init`` (:data:`A_INITS`) draws A uniform on ``[-a_bound, a_bound]`` over its
  fan-in K: ``"he_uniform"`` (nnx.LoRA's default) or ``"kaiming_uniform_a_sqrt5"``
  (HF PEFT's, 2.45x narrower).
  """

  def __init__(self, shape: tuple[int, ...], *, batch_dims: int, in_dims: int,
               rank: int, alpha: float, axes: tuple[Any, ...] | None = None,
               param_dtype=jnp.float32, a_init: str = "he_uniform",
               rngs: nnx.Rngs):
    if batch_dims + in_dims >= len(shape):
      raise ValueError(f"a weight of shape {shape} has no output axes after "
                       f"{batch_dims} batch and {in_dims} input axes.")
    batch = tuple(shape[:batch_dims])
    k = math.prod(shape[batch_dims:batch_dims + in_dims])
    n = math.prod(shape[batch_dims + in_dims:])
    if a_init not in A_INITS:
      raise ValueError(f"finetune.a_init={a_init!r} is unknown; use one of "
                       f"{', '.join(A_INITS)}.")
    # A uniform over its fan-in K (he_uniform: nnx.LoRA's default), B = 0.
    init = jax.nn.initializers.variance_scaling(
        A_INITS[a_init], "fan_in", "uniform", in_axis=-2, out_axis=-1,
        batch_axis=tuple(range(batch_dims)))
    a_axes = b_axes = None
    if axes is not None:
      # The batch axes (E) shard like the weight's; K or N take the weight's axis
      # name when it is a single axis, and the rank axis is replicated.
      in_axes, out_axes = (axes[batch_dims:batch_dims + in_dims],
                           axes[batch_dims + in_dims:])
      a_axes = (*axes[:batch_dims], in_axes[0] if in_dims == 1 else None, None)
      b_axes = (*axes[:batch_dims], None, out_axes[0] if len(out_axes) == 1 else None)
    self.lora_a = nnx.LoRAParam(init(rngs.params(), (*batch, k, rank), param_dtype),
                                **({"logical_axes": a_axes} if a_axes else {}))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*batch, rank, n), param_dtype),
                                **({"logical_axes": b_axes} if b_axes else {}))
    self.scale = float(alpha) / rank
    self.shape = tuple(shape)

  def flops_per_token(self, tokens: int) -> Flops:
    """0: the update costs one ``A @ B`` per step, not per token, and the owner of the
    weight counts its factors with its own weights (their parameters are under it)."""
    del tokens
    return Flops()

  @property
  def rank(self) -> int:
    return self.lora_a.shape[-1]

  def delta(self) -> jax.Array:
    """``(alpha / r) * A @ B`` reshaped to the weight's shape, in the factors' dtype."""
    ab = jnp.matmul(self.lora_a[...], self.lora_b[...],
                    precision=jax.lax.Precision.HIGHEST)
    return (self.scale * ab).reshape(self.shape)


def adapter(module: Any, name: str) -> Adapter | None:
  """The adapter of ``module``'s weight ``name``, or None."""
  found = getattr(module, name + SUFFIX, None)
  return found if isinstance(found, Adapter) else None


def weight(module: Any, name: str) -> jax.Array:
  """The value of ``module``'s weight ``name``, plus its adapter's update if it has one.

  Every read of a weight that LoRA may target goes through here.
  """
  w = getattr(module, name)[...]
  found = adapter(module, name)
  if found is None:
    return w
  return w + found.delta().astype(w.dtype)


def attach(module: Any, name: str, *, batch_dims: int, in_dims: int, rank: int,
           alpha: float, rngs: nnx.Rngs, axes: tuple[Any, ...] | None = None,
           a_init: str = "he_uniform") -> Adapter:
  """Gives ``module``'s weight ``name`` a fresh adapter (B = 0) and returns it."""
  if adapter(module, name) is not None:
    raise ValueError(f"weight {name!r} of {type(module).__name__} already has an adapter.")
  w = getattr(module, name)
  new = Adapter(tuple(w.shape), batch_dims=batch_dims, in_dims=in_dims, rank=rank,
                alpha=alpha, axes=axes, param_dtype=w.dtype, a_init=a_init, rngs=rngs)
  setattr(module, name + SUFFIX, new)
  return new


def adapters(model: Any) -> Iterator[tuple[tuple, Any, str, Adapter]]:
  """``(path of the owner, owner, weight name, adapter)`` of every adapter in ``model``."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and not isinstance(node, Adapter):
      for attr, value in list(vars(node).items()):
        if isinstance(value, Adapter) and attr.endswith(SUFFIX):
          yield path, node, attr[:-len(SUFFIX)], value


def merge(model: Any) -> int:
  """Folds every adapter into its weight (``W <- W'``) and removes it; returns how many.

  The merged model computes with exactly the weights the adapted one read through
  :func:`weight`, so its outputs equal the adapted model's (to float rounding of
  where XLA evaluates the sum).
  """
  found = list(adapters(model))
  for _, owner, name, _ in found:
    merged = weight(owner, name)
    getattr(owner, name).set_value(merged)
    delattr(owner, name + SUFFIX)
  return len(found)
