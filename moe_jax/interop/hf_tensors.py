"""What the Hugging Face converter's tables are made of: the layouts between a moe_jax
parameter and its tensors on disk (:class:`Tensor`), and its one error."""

from __future__ import annotations

import dataclasses


# How a moe_jax parameter is laid out relative to its tensor on disk.
IDENTITY = "identity"      # the same array (norm scales, biases, the embedding)
TRANSPOSE = "transpose"    # [out, in] on disk -> [in, out]
IN_HEADS = "in_heads"      # [N * D, M] -> [M, N, D] (query, key, value)
OUT_HEADS = "out_heads"    # [M, N * D] -> [N, D, M] (attention output)
ROW = "row"                # [1, M] -> [M] (Qwen2-MoE's shared_expert_gate)
LAYOUTS = (IDENTITY, TRANSPOSE, IN_HEADS, OUT_HEADS, ROW)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moe_jax parameter and where it lives on disk.

  Attributes:
    path: the parameter's path in the model's state (``("blocks", 0, "attn", "query")``).
    names: the tensor names on disk; one, or one per expert for stacked experts (the
      parameter is their stack along a new leading axis).
    layout: one of :data:`LAYOUTS`, applied to each name's tensor.
    heads: N for ``in_heads`` / ``out_heads`` (the head count of that projection).
    stacked: the parameter stacks ``names`` (one per expert) along a new leading axis.
    copy: the tensor on disk is a copy of a parameter that another entry reads
      (DeepSeek-V3's MTP module keeps its own copies of the shared embedding and
      output head): written on export, checked for its shape on import, not read.
  """

  path: tuple
  names: tuple[str, ...]
  layout: str = IDENTITY
  heads: int = 0
  stacked: bool = False
  copy: bool = False


class ConversionError(ValueError):
  """A checkpoint or model this converter cannot convert; the message is one line."""
