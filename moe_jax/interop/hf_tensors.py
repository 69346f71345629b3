"""What the Hugging Face converter's tables are made of: the layouts between a moe_jax
parameter and its tensors on disk (:data:`LAYOUTS`, :class:`Tensor`), and its one
error."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

# How a moe_jax parameter is laid out relative to its tensor on disk.
IDENTITY = "identity"      # the same array (norm scales, biases, the embedding)
TRANSPOSE = "transpose"    # [out, in] on disk -> [in, out]
IN_HEADS = "in_heads"      # [N * D, M] -> [M, N, D] (query, key, value)
OUT_HEADS = "out_heads"    # [M, N * D] -> [N, D, M] (attention output)
ROW = "row"                # [1, M] -> [M] (Qwen2-MoE's shared_expert_gate)

Bounds = list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Layout:
  """One layout, all three ways: ``disk_shape`` (the tensor's shape on disk for a
  moe_jax array of a shape), ``to_disk`` (moe_jax array -> tensor) and ``read``
  (``(ckpt, name, bounds, heads)`` -> the slice ``bounds`` of the moe_jax array,
  reading only the rows and columns of the tensor it covers; ``ckpt`` has
  ``read(name, slices)`` and ``shape(name)``)."""

  disk_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  to_disk: Callable[[np.ndarray], np.ndarray]
  read: Callable[[Any, str, Bounds, int], np.ndarray]


def _slices(bounds: Bounds) -> list[slice]:
  return [slice(a, b) for a, b in bounds]


def _read_in_heads(ckpt, name: str, bounds: Bounds, heads: int) -> np.ndarray:
  """[N * D, M] on disk -> the [m, n, d] slice of [M, N, D]."""
  width = ckpt.shape(name)[0] // heads  # D
  (m0, m1), (n0, n1), (d0, d1) = bounds
  block = ckpt.read(name, (slice(n0 * width, n1 * width), slice(m0, m1)))  # [n * D, m]
  return block.T.reshape(m1 - m0, n1 - n0, width)[:, :, d0:d1]


def _read_out_heads(ckpt, name: str, bounds: Bounds, heads: int) -> np.ndarray:
  """[M, N * D] on disk -> the [n, d, m] slice of [N, D, M]."""
  width = ckpt.shape(name)[1] // heads  # D
  (n0, n1), (d0, d1), (m0, m1) = bounds
  block = ckpt.read(name, (slice(m0, m1), slice(n0 * width, n1 * width)))  # [m, n * D]
  return block.T.reshape(n1 - n0, width, m1 - m0)[:, d0:d1, :]


LAYOUTS: dict[str, Layout] = {
    IDENTITY: Layout(
        disk_shape=tuple, to_disk=lambda a: a,
        read=lambda ckpt, name, bounds, heads: ckpt.read(name, tuple(_slices(bounds)))),
    TRANSPOSE: Layout(
        disk_shape=lambda s: (s[1], s[0]), to_disk=lambda a: a.T,
        read=lambda ckpt, name, bounds, heads: ckpt.read(
            name, tuple(reversed(_slices(bounds)))).T),
    ROW: Layout(
        disk_shape=lambda s: (1, s[0]), to_disk=lambda a: a[None],
        read=lambda ckpt, name, bounds, heads: ckpt.read(name, (0, _slices(bounds)[0]))),
    IN_HEADS: Layout(
        disk_shape=lambda s: (s[1] * s[2], s[0]),
        to_disk=lambda a: a.reshape(a.shape[0], -1).T, read=_read_in_heads),
    OUT_HEADS: Layout(
        disk_shape=lambda s: (s[2], s[0] * s[1]),
        to_disk=lambda a: a.reshape(-1, a.shape[-1]).T, read=_read_out_heads),
}


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
