"""Grouped matmuls for the dropless path: rows sorted by expert times each expert's weight.

``dispatch="dropless"`` sorts the kept choices by expert into ``N`` rows, ``group_sizes[e]``
of them for expert ``e`` (the rest, past ``sum(group_sizes)``, are unrouted and must come
out 0), and multiplies each expert's rows by that expert's weight. Four implementations
with the same products up to float rounding, behind :data:`GROUPED_MATMULS`
(``moe.grouped_matmul``):

* ``"ragged_dot"``: ``jax.lax.ragged_dot``, as in MegaBlocks and MaxText. How it
  compiles depends on the backend (jax 0.10.2, compiled costs in
  ``docs/results/grouped_matmul/``): on TPU the forward and input-gradient matmuls are
  grouped kernels but the weight gradient is a dense masked product over all E
  experts, so forward + backward costs ``(2 + E) / 3`` times the routed FLOPs (22x at
  E = 64); on GPU and CPU every matmul is a dense masked one over all E experts, E
  times the routed FLOPs and E times the temporary memory.
* ``"tiled"``: each expert's rows are padded to whole tiles of ``b`` rows, so every tile
  belongs to one expert; the tiles are multiplied by their expert's gathered weight in
  one batched matmul ``[tiles, b, M] x [tiles, M, H]``. The tile count is static,
  ``ceil(N / b) + E`` (each expert wastes less than one tile), so the work is
  ``(ceil(N / b) + E) * b`` rows whatever the routing (below ``3 N`` with
  :func:`tile_rows`'s ``b``, and below ``2 N`` once ``N / E > 128``) instead of
  ``E * N``, on every backend; the gathered weights cost memory traffic, and their
  copy ``[tiles, M, H]`` grows with the rows: fast on CPU at small widths, tens of GB
  at full ones.
* ``"tile_scan"``: the same tiles multiplied one at a time (``lax.scan``), each step
  reading one expert's weight: the tiled FLOPs in one weight's memory.
* ``"megablox"``: the Pallas TPU grouped-matmul kernels
  (``jax.experimental.pallas.ops.tpu.megablox``): ``gmm`` for the forward and input
  gradient, ``tgmm`` for the weight gradient, all three grouped, about the routed FLOPs.
  TPU only; on any other compile target it runs in Pallas' interpret mode (slow, for
  checking numbers on CPU).

``"auto"`` picks per compile target (:data:`AUTO`): ``"megablox"`` on TPU,
``"tile_scan"`` on GPU and ``"tiled"`` on CPU.

Shapes: ``N`` sorted rows, ``E`` experts, ``M`` input and ``H`` output width, ``b`` tile
rows.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.parallel.backend import resolve_backend

# Largest tile: 128 rows keep the batched matmul efficient while the padding stays
# below E * 128 rows.
MAX_TILE_ROWS = 128
# megablox's input and output tile width (a multiple of TPU's 128 lanes).
MEGABLOX_TILE_WIDTH = 512


def tile_rows(num_rows: int, num_experts: int) -> int:
  """``b``: a power of two near the balanced share ``N / E``, at most 128."""
  share = max(1, math.ceil(num_rows / num_experts))
  return min(MAX_TILE_ROWS, 1 << (share - 1).bit_length())


class TileLayout(NamedTuple):
  """Where the sorted rows sit in the expert tiles (:func:`tile_layout`).

  Attributes:
    tile_expert: i32[tiles] the expert of each tile (clamped to E - 1 for tiles that
      hold no row).
    slot_row: i32[tiles * b] the sorted row each tile slot holds.
    slot_valid: bool[tiles * b] whether the slot holds a routed row.
    row_slot: i32[N] the slot of each sorted row.
    row_valid: bool[N] whether the row is routed (``row < sum(group_sizes)``).
    tile: b.
  """

  tile_expert: jax.Array
  slot_row: jax.Array
  slot_valid: jax.Array
  row_slot: jax.Array
  row_valid: jax.Array
  tile: int


def tile_layout(group_sizes: jax.Array, num_rows: int) -> TileLayout:
  """Pads each expert's rows to whole tiles; everything static but the contents.

  Args:
    group_sizes: i32[E] rows per expert, in sorted order, summing to at most N.
    num_rows: N.
  """
  num_experts = group_sizes.shape[0]
  b = tile_rows(num_rows, num_experts)
  num_tiles = -(-num_rows // b) + num_experts
  sizes = group_sizes.astype(jnp.int32)
  row_end = jnp.cumsum(sizes)  # [E] end of each expert's rows
  row_start = row_end - sizes
  tiles_end = jnp.cumsum(-(-sizes // b))  # [E] end of each expert's tiles
  tiles_start = tiles_end - (-(-sizes // b))
  # Slots: tile t holds expert e = #{e' : tiles_end[e'] <= t}'s rows.
  slot = jnp.arange(num_tiles * b, dtype=jnp.int32)
  tile_expert = jnp.searchsorted(tiles_end, jnp.arange(num_tiles, dtype=jnp.int32),
                                 side="right").astype(jnp.int32)
  used = tile_expert < num_experts
  tile_expert = jnp.minimum(tile_expert, num_experts - 1)
  slot_expert = tile_expert[slot // b]
  offset = (slot // b - tiles_start[slot_expert]) * b + slot % b  # within its expert
  slot_valid = used[slot // b] & (offset < sizes[slot_expert])
  slot_row = jnp.where(slot_valid, row_start[slot_expert] + offset, 0)
  # Rows: row r belongs to expert #{e : row_end[e] <= r}.
  row = jnp.arange(num_rows, dtype=jnp.int32)
  row_expert = jnp.searchsorted(row_end, row, side="right").astype(jnp.int32)
  row_valid = row_expert < num_experts
  row_expert = jnp.minimum(row_expert, num_experts - 1)
  row_slot = jnp.where(row_valid, tiles_start[row_expert] * b + row - row_start[row_expert],
                       0)
  return TileLayout(tile_expert, slot_row, slot_valid, row_slot, row_valid, b)


def to_tiles(x: jax.Array, layout: TileLayout) -> jax.Array:
  """f[N, ...] sorted rows -> f[tiles, b, ...], padding slots 0."""
  rows = jnp.take(x, layout.slot_row, axis=0)
  rows = jnp.where(layout.slot_valid.reshape((-1,) + (1,) * (x.ndim - 1)), rows, 0)
  return rows.reshape((-1, layout.tile) + x.shape[1:])


def from_tiles(y: jax.Array, layout: TileLayout) -> jax.Array:
  """f[tiles, b, ...] -> f[N, ...] sorted rows, unrouted rows 0."""
  flat = y.reshape((-1,) + y.shape[2:])
  rows = jnp.take(flat, layout.row_slot, axis=0)
  return jnp.where(layout.row_valid.reshape((-1,) + (1,) * (flat.ndim - 1)), rows, 0)


def matmul_tiles(tiles: jax.Array, w: jax.Array, layout: TileLayout,
                 dtype) -> jax.Array:
  """f[tiles, b, M] x each tile's expert weight of f[E, M, H] -> f[tiles, b, H]."""
  weights = jnp.take(w.astype(dtype), layout.tile_expert, axis=0)  # [tiles, M, H]
  return jnp.einsum("tbm,tmh->tbh", tiles, weights, preferred_element_type=dtype)


def matmul_tiles_scan(tiles: jax.Array, w: jax.Array, layout: TileLayout,
                      dtype) -> jax.Array:
  """:func:`matmul_tiles` one tile at a time (``lax.scan``): the same products, but
  only one expert's weight ``[M, H]`` is read per step instead of a gathered
  ``[tiles, M, H]`` copy, whose size grows with the rows (at Grok-1's widths, 136
  tiles of 6144 x 32768 weights are 55 GB)."""
  w = w.astype(dtype)

  # Rematerialised: otherwise autodiff saves each step's weight slice for the backward
  # pass, a stacked [tiles, M, H] copy again.
  @jax.checkpoint
  def one(_, xs):
    tile, expert = xs
    weight = jax.lax.dynamic_index_in_dim(w, expert, axis=0, keepdims=False)
    return None, jnp.dot(tile, weight, preferred_element_type=dtype)

  return jax.lax.scan(one, None, (tiles, layout.tile_expert))[1]


class Grouped(NamedTuple):
  """Sorted rows in an implementation's layout, with its grouped matmul.

  ``matmul(a, w)`` multiplies rows ``a`` (in the layout) by their experts' weights
  ``w: f[E, M, H]``; elementwise work (activation, dropout) may run in the layout,
  since ``finish``, which returns f[N, ...] sorted rows with the unrouted ones 0,
  reads only the slots that hold a routed row.
  """

  rows: jax.Array
  matmul: Callable[[jax.Array, jax.Array], jax.Array]
  finish: Callable[[jax.Array], jax.Array]


def ragged_dot_rows(x: jax.Array, group_sizes: jax.Array, dtype) -> Grouped:
  """``jax.lax.ragged_dot`` on the sorted rows themselves."""

  def matmul(a, w):
    return jax.lax.ragged_dot(a, w.astype(dtype), group_sizes,
                              preferred_element_type=dtype)

  return Grouped(x.astype(dtype), matmul, lambda y: y)


def tiled_rows(x: jax.Array, group_sizes: jax.Array, dtype) -> Grouped:
  """Expert tiles (:func:`tile_layout`): one batched matmul per weight."""
  layout = tile_layout(group_sizes, x.shape[0])
  return Grouped(to_tiles(x.astype(dtype), layout),
                 lambda a, w: matmul_tiles(a, w, layout, dtype),
                 lambda y: from_tiles(y, layout))


def tile_scan_rows(x: jax.Array, group_sizes: jax.Array, dtype) -> Grouped:
  """Expert tiles (:func:`tile_layout`), multiplied one tile at a time
  (:func:`matmul_tiles_scan`): the tiled path's FLOPs in one weight's memory."""
  layout = tile_layout(group_sizes, x.shape[0])
  return Grouped(to_tiles(x.astype(dtype), layout),
                 lambda a, w: matmul_tiles_scan(a, w, layout, dtype),
                 lambda y: from_tiles(y, layout))


def megablox_tiling(num_rows: int, width_in: int, width_out: int) -> tuple[int, int, int]:
  """``(tm, tk, tn)`` for megablox: rows per tile (128, or ``N`` rounded up to 16 when
  smaller), and 512-wide input/output tiles (or the whole width when narrower; TPU
  blocks must be multiples of 128 or the full dimension)."""
  tm = MAX_TILE_ROWS if num_rows >= MAX_TILE_ROWS else -(-max(num_rows, 1) // 16) * 16
  return tm, min(MEGABLOX_TILE_WIDTH, width_in), min(MEGABLOX_TILE_WIDTH, width_out)


def _varying(x: jax.Array) -> frozenset[str]:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (none outside)."""
  kind = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(kind.varying) if kind is not None else frozenset()


def _to_varying(x: jax.Array, axes: frozenset[str]) -> jax.Array:
  missing = tuple(sorted(axes - _varying(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _megablox_kernels():
  """The module with megablox's ``gmm`` and ``tgmm`` (imported on first use; the
  package's own ``gmm`` attribute is the differentiable op, not this module)."""
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _megablox(a, w, sizes, tiling, interpret):
  return _megablox_fwd(a, w, sizes, tiling, interpret)[0]


def _megablox_fwd(a, w, sizes, tiling, interpret):
  """``megablox.gmm``, its output marked varying over the axes its operands vary over
  (its ``pallas_call`` declares none)."""
  kernels = _megablox_kernels()
  y = kernels.gmm(a, w, sizes, a.dtype, tiling, interpret=interpret)
  return _to_varying(y, _varying(a)), (a, w, sizes)


def _megablox_bwd(tiling, interpret, residual, dy):
  """The input gradient is ``gmm`` against the transposed weights, the weight gradient
  ``tgmm`` (as ``megablox.ops.gmm``'s VJP)."""
  kernels = _megablox_kernels()
  a, w, sizes = residual
  tm, tk, tn = tiling  # da contracts over H and produces M: swap the widths' tiles
  da = kernels.gmm(dy, w, sizes, a.dtype, (tm, tn, tk), transpose_rhs=True,
                   interpret=interpret)
  dw = kernels.tgmm(a.swapaxes(0, 1), dy, sizes, w.dtype, tiling,
                    num_actual_groups=w.shape[0], interpret=interpret)
  axes = _varying(a)
  return _to_varying(da, axes), _to_varying(dw, axes), None


_megablox.defvjp(_megablox_fwd, _megablox_bwd)


def megablox_rows(x: jax.Array, group_sizes: jax.Array, dtype) -> Grouped:
  """The Pallas TPU megablox kernels (``gmm``; its weight gradient is ``tgmm``).

  The rows are padded to a whole number of ``tm``-row tiles; the padding and the
  unrouted rows past ``sum(group_sizes)`` are zeroed on the way in (so their input
  gradient is 0) and on the way out of every matmul (the kernel leaves them unwritten).
  The kernel takes bfloat16 or float32 operands: other compute dtypes run in float32.
  Inside ``shard_map`` (the dropless path on a mesh) the operands are first marked
  varying over every manual axis any of them varies over, so that a weight shared
  across ``data`` gets its gradient summed over ``data`` as usual; the dropless
  ``shard_map`` runs with ``check_vma=False`` because megablox's group metadata
  concatenates an invariant constant with the varying group sizes, which jax's
  manual-axis check refuses once remat or a scan re-traces it
  (:func:`moe_jax.layers.dropless.dropless_on_mesh`). Off TPU (the compile
  target, :func:`moe_jax.parallel.backend.resolve_backend`) the kernels run in Pallas'
  interpret mode: slow, for checking numbers.
  """
  num_rows, width = x.shape
  kernel_dtype = dtype if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float32) else jnp.float32
  sizes = group_sizes.astype(jnp.int32)
  tm = megablox_tiling(num_rows, width, width)[0]
  padded = -(-num_rows // tm) * tm
  valid = (jnp.arange(padded, dtype=jnp.int32) < jnp.sum(sizes))[:, None]
  rows = jnp.pad(x.astype(kernel_dtype), ((0, padded - num_rows), (0, 0)))
  interpret = resolve_backend() != "tpu"

  def matmul(a, w):
    a = jnp.where(valid, a.astype(kernel_dtype), 0)
    w = w.astype(kernel_dtype)
    axes = _varying(a) | _varying(w) | _varying(sizes)
    tiling = megablox_tiling(padded, w.shape[1], w.shape[2])
    y = _megablox(_to_varying(a, axes), _to_varying(w, axes), _to_varying(sizes, axes),
                  tiling, interpret)
    return jnp.where(valid, y, 0)

  return Grouped(rows, matmul, lambda y: y[:num_rows].astype(dtype))


# name -> (x f[N, M], group_sizes i32[E], dtype) -> Grouped.
GROUPED_MATMULS: dict[str, Callable[..., Grouped]] = {
    "ragged_dot": ragged_dot_rows,
    "tiled": tiled_rows,
    "tile_scan": tile_scan_rows,
    "megablox": megablox_rows,
}
CHOICES = ("auto",) + tuple(GROUPED_MATMULS)

# What "auto" stands for per compile target. The choice rests on compiled FLOPs, bytes
# accessed and temporary memory of forward + backward (a roofline; no timing), from
# benchmarks/grouped_matmul_compiled.py at N = 8192, M = 1024, H = 4096, E = 8 and 64,
# bf16 (docs/results/grouped_matmul/): on a TPU v5p, megablox costs 1.00x the routed
# FLOPs, tiled 1.13-2.0x with about 3x megablox's bytes, ragged_dot 3.3-22x; on an H100,
# tiled 1.13-2.0x and ragged_dot 8-64x (megablox is TPU-only). CPU: tiled, as GPU.
# GPU: "tile_scan". Mixtral 8x7B's training step compiled for H100 4x8 (4M tokens,
# one 4096-token microbatch per device) peaks at 36.6 GiB per device with it and at
# 77.1 GiB with "tiled", whose gathered [tiles, M, H] weight copies are the difference,
# for the same FLOPs (847 vs 851 PFLOP per step).
AUTO = {"tpu": "megablox", "gpu": "tile_scan", "cpu": "tiled"}


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   how: str = "auto", dtype=None) -> jax.Array:
  """One grouped matmul: x f[N, M], w f[E, M, H], group_sizes i32[E] -> f[N, H]."""
  g = GROUPED_MATMULS[resolve_grouped_matmul(how)](x, group_sizes, dtype or x.dtype)
  return g.finish(g.matmul(g.rows, w))


def resolve_grouped_matmul(name: str, backend: str | None = None) -> str:
  """The implementation ``name`` stands for on ``backend`` (default: the compile target,
  :func:`moe_jax.parallel.backend.resolve_backend`).

  ``"auto"`` is :data:`AUTO` of the backend: ``"megablox"`` on TPU, ``"tiled"`` on GPU
  and CPU.
  """
  if name != "auto":
    return name
  return AUTO.get(resolve_backend(backend), "tiled")
