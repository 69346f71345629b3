"""The per-layer pattern of a (hybrid) model: which token mixer and which FFN each block has.

Jamba's keys (Lieber et al. 2024; Hugging Face ``JambaConfig``), 0-based layer ``i``:

* mixer: attention when ``i % attn_layer_period == attn_layer_offset``, Mamba
  otherwise. Jamba: period 8, offset 4 (one attention layer in eight). The defaults,
  period 1 and offset 0, make every layer attention (a plain Transformer).
* FFN: MoE when ``moe_every > 0 and i % moe_every == moe_offset``, dense otherwise.
  ``moe_offset=None`` means ``moe_every - 1``, which is the rule the project used
  before the offset existed (``(i + 1) % moe_every == 0``, Switch's "every other FFN"
  = blocks 1, 3, ...). Jamba's ``expert_layer_period=2, expert_layer_offset=1`` is
  ``moe_every=2, moe_offset=1``, the same blocks. The first ``first_dense_layers``
  blocks are dense whatever the rule says (DeepSeek-MoE's ``first_k_dense_replace``:
  DeepSeekMoE 16B's block 0 is a dense FFN, every later block MoE), and so are the
  blocks listed in ``dense_layers`` (Qwen2-MoE's and Qwen3-MoE's ``mlp_only_layers``;
  their ``decoder_sparse_step`` is ``moe_every`` with the default offset).

The pattern is a pure function of these integers, so the config check, the model and
the tests read the same list.
"""

from __future__ import annotations

from typing import NamedTuple

ATTENTION = "attention"
MAMBA = "mamba"
# What the attention blocks mix with under model.mixer="mla" (the pattern keeps ATTENTION).
MLA = "mla"
DENSE = "dense"
MOE = "moe"


class LayerKind(NamedTuple):
  """What block ``i`` holds: ``mixer`` ("attention" | "mamba"), ``ffn`` ("dense" |
  "moe"). A NamedTuple, so it compares equal to a plain ``(mixer, ffn)`` tuple."""

  mixer: str
  ffn: str


def resolve_moe_offset(moe_every: int, moe_offset: int | None) -> int:
  """``moe_offset``, or ``moe_every - 1`` when it is None (the pre-offset rule)."""
  return moe_every - 1 if moe_offset is None else moe_offset


def is_attention_layer(index: int, attn_layer_period: int = 1,
                       attn_layer_offset: int = 0) -> bool:
  return index % attn_layer_period == attn_layer_offset


def is_moe_layer(index: int, moe_every: int = 0, moe_offset: int | None = None,
                 first_dense_layers: int = 0, dense_layers=()) -> bool:
  return (moe_every > 0 and index >= first_dense_layers and index not in dense_layers
          and index % moe_every == resolve_moe_offset(moe_every, moe_offset))


def layer_pattern(num_layers: int, *, attn_layer_period: int = 1,
                  attn_layer_offset: int = 0, moe_every: int = 0,
                  moe_offset: int | None = None, first_dense_layers: int = 0,
                  dense_layers=()) -> tuple[LayerKind, ...]:
  """``(mixer, ffn)`` of each of the ``num_layers`` blocks, in order.

  For example ``layer_pattern(4, attn_layer_period=4, attn_layer_offset=2,
  moe_every=2, moe_offset=1)`` is ``(mamba, dense), (mamba, moe), (attention, dense),
  (mamba, moe)``. The values are not checked here (``config.validate_config`` and
  ``TransformerConfig`` do that with one-line messages).
  """
  return tuple(
      LayerKind(ATTENTION if is_attention_layer(i, attn_layer_period, attn_layer_offset)
                else MAMBA,
                MOE if is_moe_layer(i, moe_every, moe_offset, first_dense_layers,
                                    dense_layers) else DENSE)
      for i in range(num_layers))


def pattern_errors(num_layers, attn_layer_period, attn_layer_offset, moe_every,
                   moe_offset, *, first_dense_layers=0, dense_layers=(),
                   prefix: str = "") -> list[str]:
  """Every problem with the pattern keys, one sentence each naming value and fix.

  ``prefix`` is put before the key names (``"model."`` for an experiment config).
  Type errors of ``num_layers`` and ``moe_every`` are left to their own checks; the
  cross-checks then run only on valid integers.
  """

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  p = prefix
  errors = []
  period_ok = is_int(attn_layer_period) and attn_layer_period >= 1
  if not period_ok:
    errors.append(f"{p}attn_layer_period={attn_layer_period!r} must be a positive "
                  "integer (1: every layer is attention; Jamba: 8).")
  if not is_int(attn_layer_offset) or attn_layer_offset < 0:
    errors.append(f"{p}attn_layer_offset={attn_layer_offset!r} must be an integer >= 0 "
                  "(Jamba: 4).")
  elif period_ok and attn_layer_offset >= attn_layer_period:
    errors.append(f"{p}attn_layer_offset={attn_layer_offset} must be < "
                  f"{p}attn_layer_period={attn_layer_period} (layer i is attention when "
                  "i % period == offset); use an offset in "
                  f"[0, {attn_layer_period - 1}].")
  every_ok = is_int(moe_every) and moe_every >= 0
  if moe_offset is not None:
    if not is_int(moe_offset) or moe_offset < 0:
      errors.append(f"{p}moe_offset={moe_offset!r} must be None (moe_every - 1) or an "
                    "integer >= 0 (Jamba: 1).")
    elif every_ok and moe_every and moe_offset >= moe_every:
      errors.append(f"{p}moe_offset={moe_offset} must be < {p}moe_every={moe_every} "
                    "(block i is MoE when i % moe_every == moe_offset); use an offset "
                    f"in [0, {moe_every - 1}] or None.")
  first_ok = is_int(first_dense_layers) and first_dense_layers >= 0
  if not first_ok:
    errors.append(f"{p}first_dense_layers={first_dense_layers!r} must be an integer >= 0 "
                  "(the first blocks that stay dense; DeepSeekMoE 16B: 1).")
  layers_ok = is_int(num_layers) and num_layers >= 1
  dense_ok = (isinstance(dense_layers, (tuple, list))
              and all(is_int(i) and i >= 0 for i in dense_layers)
              and len(set(dense_layers)) == len(dense_layers))
  if not dense_ok:
    errors.append(f"{p}dense_layers={dense_layers!r} must be a list of distinct block "
                  "indices >= 0 (blocks kept dense, Hugging Face's mlp_only_layers; "
                  "() for none).")
  elif layers_ok and any(i >= num_layers for i in dense_layers):
    errors.append(f"{p}dense_layers={tuple(dense_layers)!r} names blocks past "
                  f"{p}num_layers={num_layers}; use indices in [0, {num_layers - 1}].")
  offset_ok = moe_offset is None or (is_int(moe_offset) and moe_offset >= 0)
  if (every_ok and moe_every and offset_ok and first_ok and dense_ok and layers_ok
      and resolve_moe_offset(moe_every, moe_offset) < moe_every
      and not any(is_moe_layer(i, moe_every, moe_offset, first_dense_layers,
                               dense_layers) for i in range(num_layers))):
    errors.append(f"{p}moe_every={moe_every} with {p}moe_offset={moe_offset!r}, "
                  f"{p}first_dense_layers={first_dense_layers} and {p}dense_layers="
                  f"{tuple(dense_layers)!r} places no MoE block among "
                  f"{p}num_layers={num_layers}; use {p}moe_every=0 for a dense model, or "
                  "a smaller moe_every / moe_offset / first_dense_layers, or fewer "
                  "dense_layers.")
  return errors
