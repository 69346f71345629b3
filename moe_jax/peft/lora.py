"""LoRA targets of a Transformer: which weights get an adapter, and what that costs.

A target names a kind of module and the weights of it that get a
:class:`moe_jax.layers.lora_adapters.Adapter` (``nnx.LoRAParam`` factors, B = 0). Each kind is one
entry of :data:`TARGETS`, a function from the model to the weights it covers, so a new
target is one entry and never a branch in the model code.

| target | module | weights (shape -> A, B) |
|---|---|---|
| ``router`` | :class:`~moe_jax.layers.moe_layer.Router` | kernel [M, E] -> [M, r], [r, E] (``noisy_topk``'s ``noise_kernel`` gets none and stays frozen) |
| ``experts`` | :class:`~moe_jax.layers.experts.Experts` | wi, wi_gate [E, M, H] -> [E, M, r], [E, r, H]; wo [E, H, M] -> [E, H, r], [E, r, M] |
| ``shared_experts`` | an MoE layer's shared :class:`~moe_jax.layers.experts.DenseFfn` | wi, wi_gate [M, H_s], wo [H_s, M] |
| ``attention`` | :class:`~moe_jax.models.block.Attention` | query [M, N, D] -> [M, r], [r, N*D]; key, value [M, N_kv, D] -> [M, r], [r, N_kv*D] (grouped-query attention's N_kv KV heads); out [N, D, M] -> [N*D, r], [r, M] |
| ``dense_ffn`` | a block's dense :class:`~moe_jax.layers.experts.DenseFfn` | wi, wi_gate [M, H], wo [H, M] |

Trainable parameters: a weight ``[*b, *in, *out]`` adds ``prod(b) * r * (K + N)``
with ``K = prod(in)``, ``N = prod(out)`` (:func:`adapter_param_count`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
from flax import nnx

from moe_jax.layers import lora_adapters as lora_lib
from moe_jax.layers.experts import DENSE_AXES, EXPERT_AXES, DenseFfn, Experts
from moe_jax.layers.moe_layer import Router
from moe_jax.models.block import ATTENTION_AXES, Attention

ROUTER_KERNEL_AXES = ("embed", None)


@dataclasses.dataclass(frozen=True)
class TargetWeight:
  """One weight a target covers.

  Attributes:
    path: the owner module's path in the model (tuple of keys).
    owner: the module holding the weight.
    name: the weight's attribute name.
    batch_dims: leading axes with one adapter each (1: the E of stacked experts).
    in_dims: contracted axes after them (2 for attention's out ``[N, D, M]``).
    axes: the weight's logical axes (the adapters shard like it).
  """

  path: tuple
  owner: Any
  name: str
  batch_dims: int
  in_dims: int
  axes: tuple


def _ffn_weights(path, module, axes, batch_dims) -> Iterator[TargetWeight]:
  for name in ("wi", "wi_gate", "wo"):
    if getattr(module, name, None) is not None:
      yield TargetWeight(path, module, name, batch_dims, 1, axes[name])


def _modules(model, kind) -> Iterator[tuple[tuple, Any]]:
  for path, module in nnx.iter_modules(model):
    if isinstance(module, kind):
      yield tuple(path), module


def _router(model):
  for path, m in _modules(model, Router):
    yield TargetWeight(path, m, "kernel", 0, 1, ROUTER_KERNEL_AXES)


def _experts(model):
  for path, m in _modules(model, Experts):
    yield from _ffn_weights(path, m, EXPERT_AXES, 1)


def _is_shared(path) -> bool:
  return bool(path) and path[-1] == "shared_experts"


def _shared_experts(model):
  for path, m in _modules(model, DenseFfn):
    if _is_shared(path):
      yield from _ffn_weights(path, m, DENSE_AXES, 0)


def _dense_ffn(model):
  for path, m in _modules(model, DenseFfn):
    if not _is_shared(path):
      yield from _ffn_weights(path, m, DENSE_AXES, 0)


def _attention(model):
  for path, m in _modules(model, Attention):
    for name in ("query", "key", "value"):
      yield TargetWeight(path, m, name, 0, 1, ATTENTION_AXES[name])
    yield TargetWeight(path, m, "out", 0, 2, ATTENTION_AXES["out"])


# What each target covers, and what to say when a model has none of it.
TARGETS: dict[str, Callable[[Any], Iterator[TargetWeight]]] = {
    "router": _router,
    "experts": _experts,
    "shared_experts": _shared_experts,
    "attention": _attention,
    "dense_ffn": _dense_ffn,
}
MISSING_HINTS = {
    "router": "the model has no MoE blocks (model.moe_every=0)",
    "experts": "the model has no MoE blocks (model.moe_every=0)",
    "shared_experts": "its MoE layers have no shared experts (moe.num_shared_experts=0)",
    "attention": "the model has no attention blocks",
    "dense_ffn": "every block's FFN is an MoE layer",
}


def target_weights(model, targets) -> list[TargetWeight]:
  """The weights ``targets`` cover in ``model``, in graph order.

  Raises:
    ValueError: a target name is unknown, or the model has nothing it covers.
  """
  found = []
  for t in targets:
    if t not in TARGETS:
      raise ValueError(f"finetune.targets has {t!r}, which is not a target; use some of "
                       f"{', '.join(TARGETS)}.")
    weights = list(TARGETS[t](model))
    if not weights:
      raise ValueError(f"finetune.targets has {t!r}, but {MISSING_HINTS[t]}; drop it "
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
