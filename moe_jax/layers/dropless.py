"""Dropless MoE across devices: per-device sort, all-to-all of rows, grouped matmuls.

``dispatch="dropless"`` on a mesh runs this path inside one ``jax.shard_map`` over the
mesh's ``data``, ``expert`` and ``model`` axes (MegaBlocks' dropless MoE, laid out as
MaxText's ragged all-to-all path). Every device holds the groups of its slice of the
batch (G over data*expert) and, when E is split over ``expert``, the E_l = E / X experts
``[x*E_l, (x+1)*E_l)`` of its expert index x. Each device:

1. sorts its own N = T*K kept choices (T = G_l*S tokens) by expert, which also groups
   them by the expert shard (peer) that holds the expert;
2. writes them into a static send buffer ``[X, P, M]``, peer t's rows first in row t,
   and exchanges the per-expert row counts (a small all-to-all of ``i32[X, E_l]``);
3. moves the rows to their peers over the ``expert`` axis (:func:`exchange_rows`);
4. sorts what it received by local expert and runs its experts as grouped matmuls
   (:meth:`moe_jax.layers.experts.Experts.ragged` on its weight shard,
   :mod:`moe_jax.layers.grouped_matmul`); with H split over ``model`` the partial
   outputs are summed over ``model``;
5. sends the outputs back the same way and combines them with the gates.

With one expert shard (``mesh.expert == 1``) or replicated experts (E < expert) no row
leaves its device: each device sorts and computes its own tokens, as the single-device
path does for the whole batch. The numbers equal the single-device path's (tested to
1e-5), because every row meets the same expert weights and the gates are applied in
the same order.

The exchange has two implementations with identical results (``moe.ragged_exchange``):
``"ragged"`` (``jax.lax.ragged_all_to_all``, which sends only the routed rows; GPU and
TPU) and ``"padded"`` (a plain ``all_to_all`` of the whole static buffer; every backend,
and the only one XLA:CPU compiles). ``"auto"`` takes ``"ragged"`` on GPU and TPU.

Buffers are static: P rows per peer, ``P = min(worst, ceil(f * T * K / X))``, f times
the balanced share of the ``T * K`` rows a device sends to its X peers
(``moe.ragged_buffer_factor = f``, as MaxText's ``ragged_buffer_factor``; the default
:data:`BUFFER_FACTOR` = 2). Rows past P are dropped (the last ones in expert, then
token order), output 0, and are counted in ``dropped_fraction``,
``second_kept_fraction`` and ``expert_fill`` (:func:`apply_lost`), never silently.
``f = -1`` is the worst case, ``P = T * min(K, E_l)`` (every token of the device sends
all its choices that can land on one peer to that peer), so nothing is dropped: exact,
at ``X * min(K, E_l) / K`` times the balanced buffer (8x for top-1 over 8 shards). On
one device, or with the experts not split over ``expert``, no row travels and the
factor has no effect.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import routing
from moe_jax.parallel.backend import is_accelerator

EXCHANGES = ("auto", "ragged", "padded")
# The expert axis of the mesh (moe_jax.parallel.sharding.MESH_AXES), over which rows
# travel.
EXPERT_AXIS = "expert"
MODEL_AXIS = "model"
BATCH_AXES = ("data", "fsdp", "expert")  # sharding.BATCH_AXES
# Default moe.ragged_buffer_factor: a device may send each expert shard twice its
# balanced share of rows, the slack GShard's capacity factor 2 gives each expert, here
# pooled over the shard's E_l experts (a shard overflows less often than an expert).
# The worst case (-1) is X * min(K, E_l) / K times the balanced buffer.
BUFFER_FACTOR = 2.0


def resolve_exchange(name: str, backend: str | None = None) -> str:
  """The exchange ``name`` stands for on ``backend`` (default: jax's).

  ``"auto"`` is ``"ragged"`` on GPU and TPU and ``"padded"`` elsewhere: XLA:CPU
  refuses the ``ragged-all-to-all`` op.
  """
  if name != "auto":
    return name
  return "ragged" if is_accelerator(backend) else "padded"


def buffer_rows(tokens: int, top_k: int, experts_per_peer: int, num_peers: int,
                factor: float = BUFFER_FACTOR) -> int:
  """P, the static rows per peer of a device's send buffer.

  Args:
    tokens: T, tokens on the device (its groups times S).
    top_k: K.
    experts_per_peer: E_l, experts each peer holds.
    num_peers: X, the expert axis.
    factor: -1 for the worst case (no drop); f > 0 for f times the balanced share
      ``T*K/X``, at least 1 row and at most the worst case.
  """
  worst = tokens * min(top_k, experts_per_peer)
  if factor == -1:
    return worst
  return max(1, min(worst, math.ceil(factor * tokens * top_k / num_peers)))


def exchange_rows(buffers: jax.Array, send_sizes: jax.Array, recv_sizes: jax.Array,
                  axis_name: str, how: str) -> jax.Array:
  """All-to-all of per-peer row buffers over ``axis_name`` (inside ``shard_map``).

  Args:
    buffers: [X, P, M] rows for peer t in ``buffers[t, :send_sizes[t]]``, zero past it.
    send_sizes: i32[X] rows sent to each peer (<= P).
    recv_sizes: i32[X] rows received from each peer (the peers' ``send_sizes`` for
      this device, exchanged beforehand).
    axis_name: the mesh axis of the X peers.
    how: "padded" (``all_to_all`` of all X*P rows) or "ragged"
      (``ragged_all_to_all`` of the routed rows only).

  Returns:
    [X, P, M]: the rows from peer s in row s, its first ``recv_sizes[s]``; zero past
    it. Both implementations return the same array.
  """
  if how == "padded":
    del send_sizes, recv_sizes
    return jax.lax.all_to_all(buffers, axis_name, 0, 0, tiled=True)
  if how != "ragged":
    raise ValueError(f"ragged_exchange={how!r} is unknown; use one of {EXCHANGES}.")
  num_peers, per_peer, width = buffers.shape
  flat = buffers.reshape(num_peers * per_peer, width)
  offsets = jnp.arange(num_peers, dtype=jnp.int32) * per_peer
  # Every peer writes what this device sends it into its row of this device's index.
  me = jax.lax.axis_index(axis_name).astype(jnp.int32)
  out = jax.lax.ragged_all_to_all(
      flat, jnp.zeros_like(flat), offsets, send_sizes.astype(jnp.int32),
      jnp.full((num_peers,), me * per_peer, jnp.int32), recv_sizes.astype(jnp.int32),
      axis_name=axis_name)
  return out.reshape(num_peers, per_peer, width)


def _weight_specs(layout, experts) -> dict[str, P]:
  """Where each expert weight lives: E over ``expert`` when split, H over ``model``."""
  mesh = layout.mesh
  split_e = layout.experts_sharded and mesh.shape[EXPERT_AXIS] > 1
  e_axis = EXPERT_AXIS if split_e else None
  model = mesh.shape[MODEL_AXIS]
  h_axis = MODEL_AXIS if model > 1 and experts.wi.shape[-1] % model == 0 else None
  specs = {"wi": P(e_axis, None, h_axis), "wo": P(e_axis, h_axis, None)}
  if experts.wi_gate is not None:
    specs["wi_gate"] = P(e_axis, None, h_axis)
  return specs


def _sort_by(keys: jax.Array, rows: jax.Array):
  """Stable sort of ``rows`` [N, M] by ``keys`` i32[N] -> (sorted rows, order)."""
  order = jnp.argsort(keys, stable=True)
  return jnp.take(rows, order, axis=0), order


def _unsort(rows: jax.Array, order: jax.Array) -> jax.Array:
  """Inverse of :func:`_sort_by`: row ``order[i]`` of the result is ``rows[i]``."""
  return jnp.zeros_like(rows).at[order].set(rows, unique_indices=True)


def dropless_on_mesh(x, out: routing.RoutingOutput, experts, layout, *,
                     deterministic: bool, exchange: str = "auto",
                     buffer_factor: float = BUFFER_FACTOR):
  """The dropless dispatch of :mod:`moe_jax.layers.dispatch` on ``layout.mesh``.

  Args:
    x: [G, S, M] groups in the compute dtype, G over data*expert.
    out: routing with ``C = S`` (only padding and the second-expert policy leave a
      choice unrouted).
    experts: the layer's :class:`~moe_jax.layers.experts.Experts`.
    layout: a :class:`~moe_jax.parallel.sharding.MeshLayout`.
    deterministic: no expert dropout when True.
    exchange: ``moe.ragged_exchange``.
    buffer_factor: ``moe.ragged_buffer_factor``.

  Returns:
    (y [G, S, M], lost): ``lost`` bool[G, S, K] marks the kept choices the static
    buffers could not hold (their output is 0); None when buffers are worst-case or
    no row travels, so that nothing can be lost.
  """
  mesh = layout.mesh
  num_experts = out.num_experts
  num_groups, group_size, _ = x.shape
  top_k = out.expert_index.shape[-1]
  peers = mesh.shape[EXPERT_AXIS] if layout.experts_sharded else 1
  per_peer = num_experts // peers
  group_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  tokens = num_groups // group_shards * group_size
  rows_per_peer = buffer_rows(tokens, top_k, per_peer, peers, buffer_factor)
  how = resolve_exchange(exchange)
  split_h = mesh.shape[MODEL_AXIS] > 1 and experts.wi.shape[-1] % mesh.shape[
      MODEL_AXIS] == 0

  w_specs = _weight_specs(layout, experts)
  weights = experts.weights()
  use_rng = not deterministic and experts.dropout.rate > 0
  key = experts.dropout.rngs() if use_rng else jnp.zeros((), jnp.uint32)

  def run_experts(rows, group_sizes, weights, key):
    rng = None
    if use_rng:
      # A different mask on every device's rows and every H slice; replicas of the
      # same slice over `model` must draw the same mask.
      # (fsdp only when split, so that meshes without it draw what they drew before)
      for axis in BATCH_AXES + ((MODEL_AXIS,) if split_h else ()):
        if axis != "fsdp" or mesh.shape[axis] > 1:
          key = jax.random.fold_in(key, jax.lax.axis_index(axis))
      rng = key
    y = experts.ragged(rows, group_sizes.astype(jnp.int32), deterministic=deterministic,
                       weights=weights, rng=rng)
    return jax.lax.psum(y, MODEL_AXIS) if split_h else y

  def body(x, expert_index, kept, gates, weights, key):
    groups, size, width = x.shape
    n = groups * size * top_k
    expert = jnp.where(kept, expert_index, num_experts).reshape(n)  # unrouted last
    order = jnp.argsort(expert, stable=True)  # choices grouped by expert, token order
    rows = jnp.take(x.reshape(groups * size, width), order // top_k, axis=0)  # [N, M]
    counts = jnp.bincount(expert, length=num_experts + 1)[:num_experts]
    if peers == 1:
      y_sorted = run_experts(rows, counts, weights, key)
      lost_sorted = jnp.zeros((n,), jnp.bool_)
    else:
      sorted_expert = jnp.take(expert, order)
      peer = sorted_expert // per_peer  # = peers for unrouted choices
      counts = counts.reshape(peers, per_peer)  # rows for each expert of each peer
      send = jnp.sum(counts, axis=1)
      start = jnp.cumsum(send) - send
      rank = jnp.arange(n) - jnp.take(start, jnp.minimum(peer, peers - 1))
      fits = (peer < peers) & (rank < rows_per_peer)
      num_slots = peers * rows_per_peer
      slot = jnp.where(fits, peer * rows_per_peer + rank, num_slots)
      buffers = jnp.zeros((num_slots, width), x.dtype).at[slot].set(rows, mode="drop")
      buffers = buffers.reshape(peers, rows_per_peer, width)
      # What fits of each expert's rows: a block is cut at P, its last experts first.
      before = jnp.cumsum(counts, axis=1) - counts
      sent_counts = jnp.clip(rows_per_peer - before, 0, counts)  # i32[X, E_l]
      sent = jnp.sum(sent_counts, axis=1)
      recv_counts = jax.lax.all_to_all(sent_counts, EXPERT_AXIS, 0, 0, tiled=True)
      recv = jnp.sum(recv_counts, axis=1)
      got = exchange_rows(buffers, sent, recv, EXPERT_AXIS, how)  # [X, P, M]
      # Local expert of each received row; E_l past the rows a peer sent.
      ends = jnp.cumsum(recv_counts, axis=1)  # [X, E_l]
      local = jnp.sum(jnp.arange(rows_per_peer)[None, :, None] >= ends[:, None, :],
                      axis=-1).reshape(num_slots)
      local_rows, local_order = _sort_by(local, got.reshape(num_slots, width))
      y_local = run_experts(local_rows, jnp.sum(recv_counts, axis=0), weights, key)
      y_got = _unsort(y_local, local_order).reshape(peers, rows_per_peer, width)
      back = exchange_rows(y_got, recv, sent, EXPERT_AXIS, how)
      back = back.reshape(num_slots, width)
      back = jnp.concatenate([back, jnp.zeros((1, width), back.dtype)], axis=0)
      y_sorted = jnp.take(back, slot, axis=0)  # dropped and unrouted rows read 0
      lost_sorted = (peer < peers) & ~fits
    y_choice = _unsort(y_sorted, order).reshape(groups, size, top_k, width)
    lost = _unsort(lost_sorted, order).reshape(groups, size, top_k)
    y = jnp.einsum("GSKM,GSK->GSM", y_choice, gates.astype(y_choice.dtype))
    return y, lost

  groups_spec = P(BATCH_AXES)
  # check_vma=False: megablox's group metadata concatenates an invariant constant with
  # the varying group sizes, which the manual-axis check refuses whenever remat or a
  # scan over layers re-traces it (jax's suggested workaround). The gradients on
  # meshes are tested against one device (tests/test_dropless.py).
  fn = jax.shard_map(
      body, mesh=mesh,
      in_specs=(groups_spec, groups_spec, groups_spec, groups_spec, w_specs, P()),
      out_specs=(groups_spec, groups_spec), check_vma=False)
  y, lost = fn(x, out.expert_index, out.kept, out.gates, weights, key)
  can_lose = peers > 1 and rows_per_peer < buffer_rows(tokens, top_k, per_peer, peers,
                                                       -1.0)
  return y, (lost if can_lose else None)


def apply_lost(out: routing.RoutingOutput, lost: jax.Array,
               num_valid: int | jax.Array) -> routing.RoutingOutput:
  """``out`` with the ``lost`` choices (bool[G, S, K], dropped by a dispatch path's
  static buffers) no longer kept, and the metrics that count kept choices updated.

  ``dropped_fraction`` (tokens with no kept choice, of the ``num_valid`` valid ones:
  the routers' denominator, padding left out), ``second_kept_fraction`` and
  ``expert_fill`` then describe what the experts actually computed, as they do for
  choices dropped for capacity. ``num_valid`` may be traced (the sum of a token mask).
  """
  kept = out.kept & ~lost
  newly_dropped = jnp.any(out.kept, axis=-1) & ~jnp.any(kept, axis=-1)
  metrics = dict(out.metrics)
  total_valid = jnp.maximum(jnp.asarray(num_valid, jnp.float32), 1.0)
  metrics["dropped_fraction"] = (metrics["dropped_fraction"]
                                 + jnp.sum(newly_dropped) / total_valid)
  num_groups, _, top_k = lost.shape
  # The metrics' experts: E, plus MoDE's no-op experts (never kept, so never lost).
  width = out.metrics["expert_load"].shape[-1]
  lost_hot = jax.nn.one_hot(out.expert_index, width) * lost[..., None]
  lost_per_expert = jnp.sum(lost_hot, axis=(0, 1, 2))
  if "expert_fill" in metrics:
    metrics["expert_fill"] = (metrics["expert_fill"]
                              - lost_per_expert / (num_groups * out.capacity))
  if "second_kept_fraction" in metrics and top_k > 1:
    metrics["second_kept_fraction"] = (metrics["second_kept_fraction"] - jnp.sum(
        lost[..., 1:]) / (total_valid * (top_k - 1)))
  return out.replace(kept=kept, gates=jnp.where(lost, 0.0, out.gates), metrics=metrics)
