"""Scanned layers (``model.scan_layers``): the repeating unit of the layer pattern, and
the conversion of saved trees between the unrolled and the stacked layout.

A model's blocks are a pattern of kinds (mixer, FFN, Mixture-of-Depths routed or not).
:func:`find_unit` finds the smallest repeating unit: an unscanned prefix of ``prefix``
blocks, then ``repeats`` copies of a ``period``-block unit (Switch with ``moe_every=2``:
a dense + MoE pair; Jamba: its 8-block period; dense-first-k: the k dense blocks are
the prefix). The scanned :class:`~moe_jax.models.transformer.Transformer` keeps the
prefix as ``blocks/0..prefix-1`` (the unrolled names) and the unit as ``scan/0..p-1``,
every array of which has a leading ``[repeats]`` axis (logical axis ``"layers"``): row
``r`` of ``scan/j`` is block ``prefix + r * period + j``.

:func:`stack_layers` and :func:`unstack_layers` convert any tree holding a model's
state (parameters, optimizer moments, selection biases: every dict with a ``blocks``
key) between the two layouts, bit-exactly; a checkpoint saved with one setting loads
with the other through them (:func:`moe_jax.training.run_state.restore`). Both take
the unit (or the pattern), since a partial tree (selection biases of the MoE blocks
only) does not show it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from moe_jax.models.layer_pattern import layer_pattern
from moe_jax.routing.depth import is_routed_layer

LAYERS_AXIS = "layers"  # logical axis of the stacked dimension (never sharded)
BLOCKS, SCAN = "blocks", "scan"  # the saved tree's keys of unrolled / stacked blocks


class ScanUnit(NamedTuple):
  """Blocks ``[0, prefix)`` run unscanned, then ``repeats`` copies of blocks
  ``[prefix, prefix + period)``."""

  prefix: int
  period: int
  repeats: int

  def block_index(self, row: int, position: int) -> int:
    """The unrolled index of row ``row`` of unit block ``position``."""
    return self.prefix + row * self.period + position


def find_unit(pattern: Sequence[Any]) -> ScanUnit | None:
  """The repeating unit of ``pattern`` (one hashable kind per block), or None when no
  unit repeats at least twice.

  For each period ``p`` the prefix is the shortest one after which the pattern is
  ``p``-periodic and a whole number of units long; the choice traces the fewest
  blocks, ``prefix + p`` (then the smaller ``p``).
  """
  n = len(pattern)
  best = None
  for p in range(1, n // 2 + 1):
    tail = 0  # pattern[i] == pattern[i + p] for every i >= tail
    for i in range(n - p):
      if pattern[i] != pattern[i + p]:
        tail = i + 1
    prefix = tail + (n - tail) % p
    repeats = (n - prefix) // p
    if repeats >= 2 and (best is None or prefix + p < best.prefix + best.period):
      best = ScanUnit(prefix, p, repeats)
  return best


def block_kinds(cfg) -> tuple[tuple[str, str, bool], ...]:
  """``(mixer, ffn, routed)`` of every block of a model config (the pattern a scanned
  model repeats; Mixture-of-Depths routed blocks differ from full ones)."""
  kinds = layer_pattern(cfg.num_layers, attn_layer_period=cfg.attn_layer_period,
                        attn_layer_offset=cfg.attn_layer_offset,
                        moe_every=cfg.moe_every, moe_offset=cfg.moe_offset,
                        first_dense_layers=cfg.first_dense_layers,
                        dense_layers=tuple(getattr(cfg, "dense_layers", ())))
  return tuple((k.mixer, k.ffn, is_routed_layer(i, cfg.mod_every))
               for i, k in enumerate(kinds))


def scan_errors(cfg, *, prefix: str = "") -> list[str]:
  """The one problem ``scan_layers=True`` can have: a pattern without a repeat."""
  if cfg.scan_layers is not True and cfg.scan_layers is not False:
    return [f"{prefix}scan_layers={cfg.scan_layers!r} must be True or False."]
  if cfg.scan_layers and find_unit(block_kinds(cfg)) is None:
    return [f"{prefix}scan_layers=True needs a layer pattern with a unit repeated at "
            f"least twice, and the {prefix}num_layers={cfg.num_layers} blocks have none; "
            f"use {prefix}scan_layers=False or more layers."]
  return []


def model_unit(cfg) -> ScanUnit:
  """The unit of a config that passed :func:`scan_errors`."""
  unit = find_unit(block_kinds(cfg))
  if unit is None:
    raise ValueError(scan_errors(cfg)[0])
  return unit


# -- Saved trees ----------------------------------------------------------------------


def _is_blocks_dict(node) -> bool:
  return isinstance(node, dict) and (BLOCKS in node or SCAN in node)


def _key(keys, i: int):
  """``i`` as the dict's keys spell block indices (int, or str after some loaders)."""
  return str(i) if any(isinstance(k, str) for k in keys) else i


def is_stacked(tree: Any) -> bool:
  """Whether a model-state tree (or a dict holding one) has the stacked layout."""
  found = []
  jax.tree.map(lambda n: found.append(SCAN in n) if _is_blocks_dict(n) else None,
               tree, is_leaf=_is_blocks_dict)
  return any(found)


def _stack_node(node: dict, unit: ScanUnit) -> dict:
  if SCAN in node or BLOCKS not in node:
    return node
  blocks = node[BLOCKS]
  key = lambda i: _key(blocks.keys(), i)  # noqa: E731
  out = {k: v for k, v in node.items() if k != BLOCKS}
  prefix = {key(i): blocks[key(i)] for i in range(unit.prefix) if key(i) in blocks}
  if prefix:  # an empty nnx.List has no entry in the model's state
    out[BLOCKS] = prefix
  scan = {}
  for j in range(unit.period):
    rows = [blocks.get(key(unit.block_index(r, j))) for r in range(unit.repeats)]
    if all(row is None for row in rows):
      continue
    scan[key(j)] = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
  out[SCAN] = scan
  return out


def _unstack_node(node: dict, unit: ScanUnit) -> dict:
  if SCAN not in node:
    return node
  scan, blocks = node[SCAN], dict(node.get(BLOCKS, {}))
  key = lambda i: _key(list(scan.keys()) + list(blocks.keys()), i)  # noqa: E731
  for j in range(unit.period):
    if key(j) not in scan:
      continue
    for r in range(unit.repeats):
      blocks[key(unit.block_index(r, j))] = jax.tree.map(lambda x, r=r: x[r],
                                                         scan[key(j)])
  out = {k: v for k, v in node.items() if k != SCAN}
  out[BLOCKS] = dict(sorted(blocks.items(), key=lambda kv: int(kv[0])))
  return out


def _as_unit(pattern: Sequence[Any] | ScanUnit) -> ScanUnit:
  unit = pattern if isinstance(pattern, ScanUnit) else find_unit(pattern)
  if unit is None:
    raise ValueError("the layer pattern has no unit repeated at least twice, so it has "
                     "no stacked layout.")
  return unit


def stack_layers(tree: Any, pattern: Sequence[Any] | ScanUnit) -> Any:
  """``tree`` (any pytree; each dict with a ``blocks`` key is a model's state in the
  unrolled layout: parameters, optimizer moments, selection biases) in the stacked
  layout of ``pattern``'s unit (a pattern as :func:`block_kinds` gives, or the
  :class:`ScanUnit` itself). Already stacked dicts are left as they are."""
  unit = _as_unit(pattern)
  return jax.tree.map(lambda n: _stack_node(n, unit) if _is_blocks_dict(n) else n,
                      tree, is_leaf=_is_blocks_dict)


def unstack_layers(tree: Any, pattern: Sequence[Any] | ScanUnit) -> Any:
  """The inverse of :func:`stack_layers`: every stacked dict back to ``blocks/0..L-1``.
  Unrolled dicts are left as they are."""
  unit = _as_unit(pattern)
  return jax.tree.map(lambda n: _unstack_node(n, unit) if _is_blocks_dict(n) else n,
                      tree, is_leaf=_is_blocks_dict)
