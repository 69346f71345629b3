"""Dispatch paths: move grouped tokens to the experts, run them, combine the outputs.

Every path has the :class:`Dispatcher` interface and consumes whatever
:class:`~moe_jax.routing.RoutingOutput` a router family returns, so routers and
dispatch paths combine freely. :class:`~moe_jax.layers.moe_layer.MoeLayer` picks one by
``MoeConfig.dispatch``:

* ``"einsum"``: one-hot ``[G, S, E, C]`` dispatch/combine tensors (Mesh-TF, GShard,
  flaxformer). The reference path; under a mesh the two einsums become all-to-alls.
* ``"indices"``: scatters token ids into ``[G, E, C]`` slot tables and gathers, never
  building the one-hot tensors. Same numbers, work proportional to ``S*K*M`` per group
  instead of ``S*E*C*M``.
* ``"dropless"``: no capacity. Every kept choice is sorted by expert and the experts run
  as grouped matmuls (megablox kernels on TPU as in MaxText, expert tiles on GPU and
  CPU: :mod:`moe_jax.layers.grouped_matmul`), so the work is the routed tokens (plus
  under a tile per expert), however unbalanced. Equal to the other paths with
  ``C = S``. On a mesh each device sorts its own choices and the rows travel to their
  experts' devices by all-to-all (:mod:`moe_jax.layers.dropless`).

Every path returns ``(y, lost)``: ``lost`` marks the kept choices the path could not
compute (bool[G, S, K]; only dropless on a mesh with ``moe.ragged_buffer_factor > 0``
loses any, None elsewhere), so the layer counts them as dropped.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from moe_jax.layers import dropless
from moe_jax import routing
from moe_jax.layers.experts import Experts
from moe_jax.parallel.backend import resolve_backend


class Dispatcher(Protocol):
  """Moves grouped tokens to the experts, runs them and combines their outputs."""

  def __call__(self, x: jax.Array, out: routing.RoutingOutput, experts: Experts,
               layout: Any, *, cfg: Any,
               deterministic: bool) -> tuple[jax.Array, jax.Array | None]:
    """x: [G, S, M] -> (y [G, S, M], lost bool[G, S, K] or None).

    ``layout`` is the layer's :class:`~moe_jax.parallel.sharding.Layout` (``constrain``
    pins activations; ``mesh`` is None on one device) and ``cfg`` its MoeConfig.
    """


def einsum_dispatch(x, out, experts, layout, *, cfg, deterministic):
  """Reference path with one-hot ``[G, S, E, C]`` tensors (GShard / flaxformer)."""
  del cfg
  constrain = layout.constrain
  dispatch = out.dispatch_mask.astype(x.dtype)
  combine = out.combine_weights.astype(x.dtype)
  # Each device fills the buffers of its own groups, then one all-to-all moves them to
  # the devices that hold their experts; the reverse happens before the combine.
  buffers = constrain(jnp.einsum("GSEC,GSM->EGCM", dispatch, x), "group_buffers")
  y = experts(constrain(buffers, "expert_buffers"), deterministic=deterministic)
  y = constrain(constrain(y, "expert_buffers"), "group_buffers")
  return jnp.einsum("GSEC,EGCM->GSM", combine, y), None


def _slot_table(slot: jax.Array, group_size: int, num_slots: int) -> jax.Array:
  """i32[S, K] flat slot of each choice -> i32[E*C] token of each slot (S if empty)."""
  token = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[:, None], slot.shape)
  table = jnp.full((num_slots,), group_size, jnp.int32)
  return table.at[slot].set(token, mode="drop")


def _gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
  """[N, M] rows with a zero row appended, picked by i32[...] (N picks the zero row)."""
  padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[-1]), rows.dtype)], axis=0)
  return jnp.take(padded, index, axis=0)


def indices_dispatch(x, out, experts, layout, *, cfg, deterministic):
  """Scatter token ids into ``[G, E*C]`` slot tables, then gather.

  Empty slots and dropped choices point at a zero row appended after the S tokens (for
  dispatch) or after the E*C slots (for combine), so both gathers are dense. The
  per-group work is written for one group and vmapped over G, so that the gathers and
  the scatter carry G as a batch dimension and stay local to the device that holds the
  group (explicit group indices would make the partitioner all-gather the tokens).
  """
  del cfg
  constrain = layout.constrain
  num_groups, group_size, d_model = x.shape
  num_experts, capacity = out.num_experts, out.capacity
  num_slots = num_experts * capacity
  # Flat slot of each kept choice; dropped choices get num_slots (out of range).
  slot = jnp.where(out.kept, out.expert_index * capacity + out.position, num_slots)
  table = jax.vmap(_slot_table, in_axes=(0, None, None))(
      slot, group_size, num_slots)  # i32[G, E*C]
  buffers = jax.vmap(_gather_rows)(x, table)  # [G, E*C, M]
  buffers = buffers.reshape(num_groups, num_experts, capacity, d_model)
  buffers = constrain(buffers.transpose(1, 0, 2, 3), "group_buffers")  # [E, G, C, M]
  y = experts(constrain(buffers, "expert_buffers"), deterministic=deterministic)
  y = constrain(constrain(y, "expert_buffers"), "group_buffers")
  y = y.transpose(1, 0, 2, 3).reshape(num_groups, num_slots, d_model)
  picked = jax.vmap(_gather_rows)(y, slot)  # [G, S, K, M]
  return jnp.einsum("GSKM,GSK->GSM", picked, out.gates.astype(y.dtype)), None


def dropless_dispatch(x, out, experts, layout, *, cfg, deterministic):
  """Sorts every kept choice by expert and runs the experts as grouped matmuls.

  ``out`` must come from routing with ``C = S`` (:meth:`MoeLayer.capacity` does this
  for ``dispatch="dropless"``), so that only padding and the second-expert policy
  leave a choice unrouted. The ``N = G*S*K`` choices are stably sorted by expert
  (unrouted ones last, past ``sum(group_sizes)``, where the grouped matmul outputs 0), the
  rows are gathered in that order, and the outputs are gathered back per choice.

  On one device the sort runs over all groups at once. On a mesh (``layout.mesh``
  with more than one device) a global sort would make the partitioner gather every
  device's tokens and the experts' weights, so there each device sorts its own
  choices and exchanges rows with the devices that hold their experts
  (:func:`moe_jax.layers.dropless.dropless_on_mesh`, configured by
  ``moe.ragged_exchange`` and ``moe.ragged_buffer_factor``).
  """
  if getattr(layout, "mesh", None) is not None and layout.num_devices > 1:
    return dropless.dropless_on_mesh(
        x, out, experts, layout, deterministic=deterministic,
        exchange=cfg.ragged_exchange, buffer_factor=cfg.ragged_buffer_factor)
  num_groups, group_size, d_model = x.shape
  top_k = out.expert_index.shape[-1]
  num_experts = out.num_experts
  expert = jnp.where(out.kept, out.expert_index, num_experts).reshape(-1)  # i32[N]
  order = jnp.argsort(expert, stable=True)  # choices grouped by expert, token order
  group_sizes = jnp.bincount(expert, length=num_experts + 1)[:num_experts]
  tokens = x.reshape(num_groups * group_size, d_model)
  rows = jnp.take(tokens, order // top_k, axis=0)  # [N, M]
  y = experts.ragged(rows, group_sizes.astype(jnp.int32), deterministic=deterministic)
  inverse = jnp.argsort(order)  # the sorted row of each choice
  picked = jnp.take(y, inverse, axis=0).reshape(num_groups, group_size, top_k, d_model)
  return jnp.einsum("GSKM,GSK->GSM", picked, out.gates.astype(y.dtype)), None


def gather_dispatch(x, out, experts, layout, *, cfg, deterministic):
  """Runs each token through its own chosen experts, gathering their weights.

  Same numbers as the other paths for the same routing (dropped choices add 0), but it
  reads T*K experts' weights rather than all E, so it suits decode steps of a few
  tokens on one device (:meth:`moe_jax.layers.moe_layer.MoeLayer.decode`). Not a config
  choice: the gathered weights grow with the tokens.
  """
  del layout, cfg
  num_groups, group_size, d_model = x.shape
  top_k = out.expert_index.shape[-1]
  tokens = num_groups * group_size
  # No-op choices (MoDE; index >= E, never kept) read expert E-1 and get gate 0.
  expert_index = jnp.minimum(out.expert_index, out.num_experts - 1)
  y = experts.gathered(x.reshape(tokens, d_model), expert_index.reshape(tokens, top_k),
                       deterministic=deterministic)  # [T, K, M]
  gates = jnp.where(out.kept, out.gates, 0.0).reshape(tokens, top_k).astype(y.dtype)
  y = jnp.einsum("TKM,TK->TM", y, gates).reshape(num_groups, group_size, d_model)
  return y, None


DISPATCHERS: dict[str, Dispatcher] = {
    "einsum": einsum_dispatch,
    "indices": indices_dispatch,
    "dropless": dropless_dispatch,
}


def resolve_dispatch(name: str, backend: str | None = None) -> str:
  """The dispatch path ``name`` stands for on ``backend`` (default: the compile target,
  :func:`moe_jax.parallel.backend.target_backend`)."""
  if name != "auto":
    return name
  return "einsum" if resolve_backend(backend) == "tpu" else "indices"
