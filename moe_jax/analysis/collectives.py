"""Collectives in compiled HLO, and a simple model of the bytes an MoE layer moves."""

from __future__ import annotations

import dataclasses
import math
import re

from moe_jax import routing


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
COLLECTIVE_OPS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                  "collective-permute")
_OP_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled (partitioned) HLO module, per device.

  Attributes:
    name: the instruction name, e.g. ``"all-to-all.1"``.
    op: one of :data:`COLLECTIVE_OPS`.
    shapes: result shapes as ``(dtype, dims)``, one per tuple element.
    group_size: n, devices in each replica group.
    source: the ``op_name`` metadata (the jax operation it came from), if any.
  """

  name: str
  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  group_size: int
  source: str

  @property
  def result_bytes(self) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in self.shapes)

  @property
  def bytes_sent(self) -> float:
    """Bytes each device sends, with the usual (ring / direct) algorithms.

    all-to-all and all-gather: ``(n-1)/n`` of the result; reduce-scatter: ``n-1``
    results; all-reduce: ``2(n-1)/n`` of the result; collective-permute: the result.
    """
    n = self.group_size
    b = self.result_bytes
    if self.op in ("all-to-all", "all-gather"):
      return b * (n - 1) / n
    if self.op == "reduce-scatter":
      return float(b * (n - 1))
    if self.op == "all-reduce":
      return 2.0 * b * (n - 1) / n
    return float(b)


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)  # iota form [a,b]<=[n]
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:  # mesh form: mesh['axis_0'=2,...] [device_ids=(...)] {'axis_1'}
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    named = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(int(sizes[a]) for a in named)
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)  # explicit {{0,1},{2,3}}
  if m:
    return len([t for t in m.group(1).split(",") if t])
  m = re.search(r"source_target_pairs=", line)
  if m:
    return 2
  return 1


def hlo_collectives(hlo_text: str) -> list[Collective]:
  """The collectives of compiled HLO text (``jitted.lower(...).compile().as_text()``).

  Async pairs (``all-to-all-start`` / ``-done``) count once. Shapes are per device,
  since the text is after SPMD partitioning.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _OP_RE.match(line)
    if not m:
      continue
    shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                   for dt, dims in _SHAPE_RE.findall(m.group("type")))
    src = re.search(r'op_name="([^"]*)"', line)
    out.append(Collective(name=m.group("name"), op=m.group("op"), shapes=shapes,
                          group_size=_group_size(line),
                          source=src.group(1) if src else ""))
  return out


def moe_comm_bytes(
    *,
    tokens_per_device: int,
    d_model: int,
    num_experts: int,
    expert_axis: int,
    group_size: int,
    capacity_factor: float,
    top_k: int = 1,
    min_capacity: int = 4,
    bytes_per_element: int = 4,
) -> dict[str, float]:
  """Bytes one device sends per MoE layer and forward pass, in a simple model.

  A device holds ``T = tokens_per_device`` tokens in ``G_d = T / S`` groups. With
  capacity dispatch (GShard / Switch) it builds ``[E, G_d, C, M]`` buffers and sends
  the slots of the experts on the other ``X - 1`` devices of its expert axis, padding
  included; the combine sends the same amount back::

      dispatch = combine = (X - 1) / X * E * G_d * C * M * bytes

  With ``C = ceil(cf * S / E)`` this is about ``(X-1)/X * cf * T * M`` elements: it
  grows with the capacity factor, not with K (a top-2 layer needs about twice the cf
  of a top-1 layer to drop as few tokens, hence twice the bytes). ``routed`` is the
  lower bound of sending only the K choices of each token, none dropped and experts
  evenly loaded: ``(X-1)/X * K * T * M * bytes`` each way. The backward pass moves the
  same again (the gradients of the two all-to-alls).

  Returns:
    ``capacity`` (C), ``dispatch``, ``combine``, ``total`` (= dispatch + combine) and
    ``routed_total`` (both directions of the lower bound), in bytes.
  """
  size = min(group_size, tokens_per_device)
  if tokens_per_device % size:
    raise ValueError(f"tokens_per_device={tokens_per_device} is not a multiple of "
                     f"group_size={size}.")
  groups = tokens_per_device // size
  cap = routing.expert_capacity(size, num_experts, capacity_factor, min_capacity)
  remote = (expert_axis - 1) / expert_axis
  one_way = remote * num_experts * groups * cap * d_model * bytes_per_element
  routed = remote * top_k * tokens_per_device * d_model * bytes_per_element
  return {"capacity": cap, "dispatch": one_way, "combine": one_way,
          "total": 2 * one_way, "routed_total": 2 * routed}
