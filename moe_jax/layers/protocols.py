"""What every module of the model declares about itself, so that the cross-cutting jobs
(sharding, FLOP counts, LoRA) ask modules instead of dispatching on their classes.

A module that owns parameters declares, next to them:

* **logical axes**: every ``nnx.Param`` is created with ``logical_axes`` metadata, one
  name (or None) per dimension (``nnx.Param(w, logical_axes=("embed", "mlp"))``); the
  module keeps the names of its parameters in one dict constant beside its class
  (``ATTENTION_AXES``, ``EXPERT_AXES``, ...). :func:`logical_axes` reads them;
  :mod:`moe_jax.models.param_sharding` maps them onto a mesh.
* **FLOPs** (:class:`CountsFlops`): ``flops_per_token(tokens)``, the forward FLOPs per
  token of its own weights (2 per multiply-add) as a :class:`Flops`, where ``tokens``
  is the length of the sequence it sees (its attention context).
  :func:`moe_jax.models.sizes.flops_per_token` sums the modules of a model; it does not
  ask the children a module names in ``flops_include`` (their cost is in the
  module's: an MoE layer counts its routed experts, whose per-token share only the
  layer knows), and a module that runs its children on fewer tokens than it sees says
  how many with ``tokens_run(tokens, child)`` (a Mixture-of-Depths routed block).
* **LoRA targets** (:class:`HasLoraTargets`): ``lora_targets()``, the
  :class:`LoraWeight` records of its own weights that may get a low-rank adapter,
  each naming the ``finetune.targets`` entry that covers it
  (:data:`moe_jax.peft.lora.TARGETS`). Modules without LoRA targets need not define it.

The walkers look the methods up by name (``getattr``), not by class; the
:class:`Protocol` classes here document them and serve type checkers.

Optionally, ``param_groups()`` puts the module's parameters into the groups that
:func:`moe_jax.models.sizes.count_params` reports (``router``, ``predictor``,
``experts`` and the ``inactive`` ones a token does not use).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
from flax import nnx


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axes ``var`` was declared with (``logical_axes`` metadata), or None."""
  names = var.get_metadata("logical_axes", None)
  return None if names is None else tuple(names)


def param_size(module: Any) -> int:
  """Parameters of ``module`` and everything under it (LoRA factors included:
  ``nnx.LoRAParam`` is an ``nnx.Param``)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs per token (2 per multiply-add).

  Attributes:
    active: what one token costs (routed experts: the share a token visits).
    total: every weight applied to every token (routed experts: all of them).
    router: routing (MoE routers, Mixture-of-Depths routers), kept out of ``active``
      and ``total`` as Switch does when it calls a model "FLOP-matched".
  """

  active: int = 0
  total: int = 0
  router: int = 0

  @classmethod
  def dense(cls, n: int) -> Flops:
    """``n`` FLOPs that every token spends (``active`` and ``total``)."""
    return cls(active=n, total=n)

  def __add__(self, other: Flops) -> Flops:
    return Flops(self.active + other.active, self.total + other.total,
                 self.router + other.router)

  def __mul__(self, tokens: int) -> Flops:
    return Flops(self.active * tokens, self.total * tokens, self.router * tokens)


class CountsFlops(Protocol):
  """A module that declares its forward FLOPs."""

  def flops_per_token(self, tokens: int) -> Flops:
    """FLOPs per token of this module's own weights, for a sequence of ``tokens``
    tokens (the attention context; per-token costs of most modules ignore it)."""


@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """One weight of a module that LoRA may adapt.

  Attributes:
    target: the ``finetune.targets`` entry that covers it ("attention", "experts", ...).
    name: the weight's attribute name on the module.
    batch_dims: leading axes with one adapter each (1: the E of stacked experts).
    in_dims: contracted axes after them (2 for attention's out ``[N, D, M]``).
  """

  target: str
  name: str
  batch_dims: int = 0
  in_dims: int = 1


class HasLoraTargets(Protocol):
  """A module whose weights LoRA may adapt."""

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """Its adaptable weights, in the order adapters are attached."""
