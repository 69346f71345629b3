"""What a compiled step does, read from its optimized HLO text: FLOPs and
collectives, with every loop counted as many times as it runs.

XLA's own ``compiled.cost_analysis()`` counts a ``while`` body once, however many times
it runs, and returns nothing for CUDA executables, so a scanned model
(``model.scan_layers``) or gradient accumulation would look L or n times cheaper than
it is. Here the optimized module (``compiled.as_text()``) is parsed into its
computations, and each computation's own cost is weighted by how often it runs: a
``while`` body by the trip count XLA annotates (``known_trip_count``), a fusion or call
by its caller's count, a conditional's branches by the costliest one.

Counted per device (the module is the SPMD program of one device):

* FLOPs: 2 per multiply-add of every ``dot`` and ``convolution`` (also inside fusions),
  of cuBLAS GEMM custom calls, and of custom kernels that declare a cost estimate
  (Pallas). Elementwise work is not counted; it is small next to the matmuls of a
  transformer step, and a test checks the total against XLA's count on a loop-free
  module.
* Collectives: the count and result bytes of every ``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``all-to-all``, ``ragged-all-to-all``, ``collective-permute``
  and ``collective-broadcast`` (async ``-start`` forms counted once, ``-done``
  not).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "ragged-all-to-all", "collective-permute", "collective-broadcast")
_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16,
         "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16,
         "f32": 32, "f64": 64, "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8,
         "f8e4m3": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8,
         "f8e3m4": 8, "f4e2m1fn": 4, "f8e8m0fnu": 8}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result's shape text, e.g. "f32[8,128]{1,0}" or "(bf16[2], s32[])"
  opcode: str
  operands: list[str]
  attrs: str  # everything after the operand list
  args: str = ""  # the operand list's text (a constant's value)


@dataclasses.dataclass
class Costs:
  """Per-device totals of one compiled module, loops counted as often as they run."""
  flops: float = 0.0
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  unknown_loops: int = 0  # while loops without a known trip count (counted once)


def shape_bytes(shape: str) -> float:
  """Bytes of every array in a shape text (all elements of a tuple)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BITS:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _BITS[dtype] / 8
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  if not m or not m.group(2):
    return []
  return [int(d) for d in m.group(2).split(",")]


def _split_top(text: str, open_: str, close: str) -> int:
  """Index of the bracket closing ``text[0]`` (an ``open_``)."""
  depth = 0
  for i, ch in enumerate(text):
    if ch in open_:
      depth += 1
    elif ch in close:
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


def parse_instruction(line: str) -> Instruction | None:
  m = _NAME.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):
    end = _split_top(rest, "(", ")")
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    cut = rest.find(" ")
    if cut < 0:
      return None
    shape, rest = rest[:cut], rest[cut + 1:].lstrip()
  op = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
  if not op:
    return None
  rest = rest[op.end() - 1:]
  end = _split_top(rest, "(", ")")
  args, attrs = rest[1:end], rest[end + 1:]
  operands = re.findall(r"%([\w.\-]+)", args)
  return Instruction(m.group(1), shape, op.group(1), operands, attrs, args)


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
  """``({computation: instructions}, entry name)`` of an HLO module's text."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line.strip()) if current is None else None
    if header:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    inst = parse_instruction(line)
    if inst is not None:
      comps[current].append(inst)
  return comps, entry


def _attr_computations(attrs: str, key: str) -> list[str]:
  m = re.search(key + r"=\{([^}]*)\}", attrs)
  if m:
    return re.findall(r"%?([\w.\-]+)", m.group(1))
  m = re.search(key + r"=%?([\w.\-]+)", attrs)
  return [m.group(1)] if m else []


def _trip_count(inst: Instruction, comps: dict[str, list[Instruction]]) -> int | None:
  """A while loop's trip count: XLA's annotation, else read from its condition.

  The TPU compiler drops ``known_trip_count``; its loops (``lax.scan``,
  ``fori_loop``) keep the condition ``counter < N`` with the counter starting at 0,
  so N is the constant the condition compares with.
  """
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
  if m:
    return int(m.group(1))
  for cond in _attr_computations(inst.attrs, "condition"):
    insts = comps.get(cond, [])
    consts = {i.name: i.args for i in insts if i.opcode == "constant"}
    for i in insts:
      direction = re.search(r"direction=(LT|GT)", i.attrs)
      if i.opcode != "compare" or not direction or len(i.operands) != 2:
        continue
      bound = i.operands[1] if direction.group(1) == "LT" else i.operands[0]
      if bound in consts and re.fullmatch(r"-?\d+", consts[bound].strip()):
        return int(consts[bound])
  return None


def _dot_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  out = math.prod(_dims(inst.shape))
  m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
  lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
  if not m or not lhs:
    return 0.0
  contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
  return 2.0 * out * contracted


def _window(attrs: str, key: str, rank: int, default: int) -> list[int]:
  m = re.search(r"\b" + key + r"=([0-9x_\-]+)", attrs)
  if not m:
    return [default] * rank
  return [int(v) for v in m.group(1).split("x")]


def _valid_pairs(out: int, inp: int, size: int, stride: int, pad_low: int,
                 lhs_dilate: int, rhs_dilate: int) -> int:
  """(output, kernel) position pairs of one spatial dim that read a real input
  element (not padding, not a hole of ``lhs_dilate``)."""
  span = (inp - 1) * lhs_dilate + 1
  count = 0
  for k in range(size):
    for o in range(out):
      pos = o * stride + k * rhs_dilate - pad_low
      if 0 <= pos < span and pos % lhs_dilate == 0:
        count += 1
  return count


def _conv_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  """2 x the multiply-adds of a convolution that touch real data: XLA:TPU writes
  batched matmuls as convolutions whose window runs over dilated holes, so the
  kernel size alone would overcount them."""
  m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", inst.attrs)
  if not m or len(inst.operands) < 2:
    return 0.0
  lhs_l, ker_l, out_l = m.groups()
  lhs = _dims(shapes.get(inst.operands[0], ""))
  ker = _dims(shapes.get(inst.operands[1], ""))
  out = _dims(inst.shape)
  if not lhs or not ker or not out or "i" not in ker_l:
    return 0.0
  spatial = sorted(c for c in ker_l if c.isdigit())
  rank = len(spatial)
  size = [ker[ker_l.index(c)] for c in spatial]
  stride = _window(inst.attrs, "stride", rank, 1)
  lhs_dilate = _window(inst.attrs, "lhs_dilate", rank, 1)
  rhs_dilate = _window(inst.attrs, "rhs_dilate", rank, 1)
  pad = re.search(r"\bpad=([0-9_x\-]+)", inst.attrs)
  pads = ([int(p.split("_")[0]) for p in pad.group(1).split("x")] if pad
          else [0] * rank)
  fma = ker[ker_l.index("i")]
  for c in out_l:
    if not c.isdigit():
      fma *= out[out_l.index(c)]
  for d, c in enumerate(spatial):
    if d >= len(size) or size[d] * out[out_l.index(c)] > 10 ** 7:
      fma *= out[out_l.index(c)] * (size[d] if d < len(size) else 1)
      continue
    fma *= _valid_pairs(out[out_l.index(c)], lhs[lhs_l.index(c)], size[d], stride[d],
                        pads[d], lhs_dilate[d], rhs_dilate[d])
  return 2.0 * fma


def _gemm_custom_call_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  m = re.search(r"backend_config=(\{.*\})", inst.attrs)
  if not m:
    return 0.0
  text = m.group(1)
  est = re.search(r'"flops"\s*:\s*"?([0-9.e+]+)', text)
  if est:  # a custom kernel's declared cost (Pallas cost_estimate)
    return float(est.group(1))
  if "cublas" not in inst.attrs:
    return 0.0
  try:
    config = json.loads(text)
  except ValueError:
    return 0.0
  dims = config.get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
  lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
  out_shape = inst.shape[1:] if inst.shape.startswith("(") else inst.shape
  out = math.prod(_dims(out_shape))
  contracted = math.prod(lhs[int(d)] for d in dims.get("lhs_contracting_dimensions", []))
  return 2.0 * out * contracted if lhs else 0.0


def _collective_kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def _collective_bytes(inst: Instruction) -> float:
  arrays = re.findall(r"[a-z][a-z0-9]*\[[0-9,]*\]", inst.shape)
  if inst.shape.startswith("(") and inst.opcode.endswith("-start") and arrays:
    # (operands..., results...): the result is the larger half for gathers; for the
    # others both halves are the same size.
    return max(shape_bytes(a) for a in arrays)
  return shape_bytes(inst.shape)


def _add(total: Costs, part: Costs, times: float) -> None:
  total.flops += times * part.flops
  total.unknown_loops += part.unknown_loops
  for kind, v in part.collectives.items():
    entry = total.collectives.setdefault(kind, {"count": 0.0, "bytes": 0.0})
    entry["count"] += times * v["count"]
    entry["bytes"] += times * v["bytes"]


def analyze(text: str) -> Costs:
  """The per-device :class:`Costs` of an optimized HLO module's text."""
  comps, entry = parse_module(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")
  memo: dict[str, Costs] = {}

  def cost_of(name: str, depth: int = 0) -> Costs:
    """The costs of one run of computation ``name``, its callees included."""
    if name in memo:
      return memo[name]
    costs = Costs()
    if name not in comps or depth > 64:
      return costs
    shapes = {inst.name: inst.shape for inst in comps[name]}
    for inst in comps[name]:
      op = inst.opcode
      if op == "dot":
        costs.flops += _dot_flops(inst, shapes)
      elif op == "convolution":
        costs.flops += _conv_flops(inst, shapes)
      elif op == "custom-call":
        costs.flops += _gemm_custom_call_flops(inst, shapes)
      kind = _collective_kind(op)
      if kind is not None:
        entry_ = costs.collectives.setdefault(kind, {"count": 0.0, "bytes": 0.0})
        entry_["count"] += 1
        entry_["bytes"] += _collective_bytes(inst)
      if op == "while":
        trips = _trip_count(inst, comps)
        if trips is None:
          costs.unknown_loops += 1
          trips = 1
        for body in _attr_computations(inst.attrs, "body"):
          _add(costs, cost_of(body, depth + 1), trips)
      elif op == "conditional":
        branches = (_attr_computations(inst.attrs, "branch_computations")
                    + _attr_computations(inst.attrs, "true_computation")
                    + _attr_computations(inst.attrs, "false_computation"))
        subs = [cost_of(b, depth + 1) for b in branches]
        if subs:
          _add(costs, max(subs, key=lambda c: c.flops), 1)
      elif op in ("fusion", "call", "async-start"):
        callees = _attr_computations(inst.attrs, "calls")
        if op == "call":
          callees += _attr_computations(inst.attrs, "to_apply")
        for callee in callees:
          _add(costs, cost_of(callee, depth + 1), 1)
    memo[name] = costs
    return costs

  total = Costs()
  _add(total, cost_of(entry), 1)
  total.collectives = {k: {"count": int(round(v["count"])), "bytes": v["bytes"]}
                       for k, v in sorted(total.collectives.items())}
  return total
