"""LoRA targets of a Transformer: which weights get an adapter, and what that costs.

A target is a ``finetune.targets`` name; the modules of the model declare which of
their weights each one covers (``lora_targets()``, :class:`~moe_jax.layers.protocols.
LoraWeight` records; :mod:`moe_jax.layers.protocols`), so a new module's weights are
covered by its own declaration and never by a branch here. Each covered weight gets a
:class:`moe_jax.layers.lora_adapters.Adapter` (``nnx.LoRAParam`` factors, B = 0)
sharded like the weight (its logical axes).

| target | declared by | weights (shape -> A, B) |
|---|---|---|
| ``router`` | :class:`~moe_jax.layers.moe_layer.Router` | kernel [M, E] -> [M, r], [r, E] (``noisy_topk``'s ``noise_kernel`` gets none and stays frozen) |
| ``experts`` | :class:`~moe_jax.layers.experts.Experts` | wi, wi_gate [E, M, H] -> [E, M, r], [E, r, H]; wo [E, H, M] -> [E, H, r], [E, r, M] |
| ``shared_experts`` | an MoE layer's shared :class:`~moe_jax.layers.experts.DenseFfn` | wi, wi_gate [M, H_s], wo [H_s, M] |
| ``attention`` | :class:`~moe_jax.models.block.Attention` | query [M, N, D] -> [M, r], [r, N*D]; key, value [M, N_kv, D] -> [M, r], [r, N_kv*D] (grouped-query attention's N_kv KV heads); out [N, D, M] -> [N*D, r], [r, M]; :class:`~moe_jax.models.mla.MultiHeadLatentAttention`'s projections (``q_proj`` or ``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj [N, Dv, M]``) |
| ``dense_ffn`` | a block's dense :class:`~moe_jax.layers.experts.DenseFfn` | wi, wi_gate [M, H], wo [H, M] |

Trainable parameters: a weight ``[*b, *in, *out]`` adds ``prod(b) * r * (K + N)``
with ``K = prod(in)``, ``N = prod(out)`` (:func:`adapter_param_count`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
from flax import nnx

from moe_jax.layers import lora_adapters as lora_lib
from moe_jax.layers.protocols import logical_axes

# The targets, and what to say when a model has nothing a target covers.
TARGETS: dict[str, str] = {
    "router": "the model has no MoE blocks (model.moe_every=0)",
    "experts": "the model has no MoE blocks (model.moe_every=0)",
    "shared_experts": "its MoE layers have no shared experts (moe.num_shared_experts=0)",
    "attention": "the model has no attention blocks",
    "dense_ffn": "every block's FFN is an MoE layer",
}


@dataclasses.dataclass(frozen=True)
class TargetWeight:
  """One weight a target covers.

  Attributes:
    target: the target that covers it.
    path: the owner module's path in the model (tuple of keys).
    owner: the module holding the weight.
    name: the weight's attribute name.
    batch_dims: leading axes with one adapter each (1: the E of stacked experts).
    in_dims: contracted axes after them (2 for attention's out ``[N, D, M]``).
    axes: the weight's logical axes (the adapters shard like it).
  """

  target: str
  path: tuple
  owner: Any
  name: str
  batch_dims: int
  in_dims: int
  axes: tuple | None


def declared_weights(model) -> Iterator[TargetWeight]:
  """Every weight the modules of ``model`` declare as a LoRA target, in graph order.

  Raises:
    ValueError: a module declares a target that is not in :data:`TARGETS`.
  """
  for path, module in nnx.iter_modules(model):
    declare = getattr(module, "lora_targets", None)  # HasLoraTargets
    for w in (declare() if declare is not None else ()):
      if w.target not in TARGETS:
        raise ValueError(f"{type(module).__name__} declares LoRA target {w.target!r}, "
                         f"which is not in peft.lora.TARGETS ({', '.join(TARGETS)}); "
                         "add it there with its missing-target hint.")
      yield TargetWeight(w.target, tuple(path), module, w.name, w.batch_dims,
                         w.in_dims, logical_axes(getattr(module, w.name)))


def target_weights(model, targets) -> list[TargetWeight]:
  """The weights ``targets`` cover in ``model``, in graph order.

  Raises:
    ValueError: a target name is unknown, or the model has nothing it covers.
  """
  declared = list(declared_weights(model))
  found = []
  for t in targets:
    if t not in TARGETS:
      raise ValueError(f"finetune.targets has {t!r}, which is not a target; use some of "
                       f"{', '.join(TARGETS)}.")
    weights = [w for w in declared if w.target == t]
    if not weights:
      raise ValueError(f"finetune.targets has {t!r}, but {TARGETS[t]}; drop it "
                       "from finetune.targets.")
    found.extend(weights)
  return found


def add_lora(model, targets, *, rank: int, alpha: float, seed: int = 0,
             a_init: str = "he_uniform") -> int:
  """Attaches a zero-update adapter to every weight ``targets`` cover; returns how many.

  The A factors are drawn from ``seed`` (a stream of their own, so the model's RNG
  streams are untouched) by ``a_init`` (:data:`moe_jax.layers.lora_adapters.A_INITS`).
  """
  rngs = nnx.Rngs(params=seed)
  weights = target_weights(model, targets)
  for w in weights:
    lora_lib.attach(w.owner, w.name, batch_dims=w.batch_dims, in_dims=w.in_dims,
                    rank=rank, alpha=alpha, rngs=rngs, axes=w.axes, a_init=a_init)
  return len(weights)


def adapter_param_count(shape, batch_dims: int, in_dims: int, rank: int) -> int:
  """``prod(batch) * rank * (K + N)`` for a weight ``[*batch, *in, *out]``."""
  batch = math.prod(shape[:batch_dims])
  k = math.prod(shape[batch_dims:batch_dims + in_dims])
  n = math.prod(shape[batch_dims + in_dims:])
  return batch * rank * (k + n)


def lora_param_count(model) -> int:
  """Parameters held in ``nnx.LoRAParam`` variables of ``model``."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
