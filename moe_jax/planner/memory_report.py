"""Where a compiled step's memory goes: the largest buffers of XLA's memory usage
report.

After buffer assignment, XLA writes a memory usage report per module into its dump
folder (``xla_dump_to``, which :func:`moe_jax.planner.compile.plan` sets per compile
through ``compiler_options``); the TPU compiler writes it for a step that does not fit
too. Each line is one allocation, a block of device memory, with its size and the
shapes of the values that use it at different times::

     72.00GiB( 19%);   72.00GiB;  10523639808;    2; bf16[36,4096,32,64], f32[36,8,4,4096,4096]

:func:`largest_buffers` returns the largest allocations with the value that fills
each (the largest of its shapes): the shapes name what to shrink (a ``[B, N, Q, K]``
float32 score matrix, ``[B, L, V]`` logits, an MoE token buffer). Allocations of the
TPU report can share offsets at disjoint times, so their sizes can sum past the
peak; they are ranked, not added.
"""

from __future__ import annotations

import glob
import os
import re

from moe_jax.planner.hlo import shape_bytes

_LINE = re.compile(r"^\s*[0-9.]+[KMGT]?i?B\(\s*\d+%\);\s*([0-9.]+)([KMGT]?)i?B;\s*\d+;\s*\d+;"
                   r"\s*(.*)$")
_TOTAL = re.compile(r"^Total bytes:\s*(\d+)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_COUNT = re.compile(r"^(\d+)×")


def _split_shapes(text: str) -> list[str]:
  """``"bf16[2,3], 2×f32[4]"`` -> ``["bf16[2,3]", "f32[4]"]`` (commas inside
  brackets kept)."""
  out, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "[(":
      depth += 1
    elif ch in "])":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(text[start:i].strip())
      start = i + 1
  out.append(text[start:].strip())
  return [_COUNT.sub("", s) for s in out if s]


def parse(text: str) -> tuple[int | None, list[dict]]:
  """One report's ``(total bytes, allocations)`` of its first memory space (device
  memory, ``color=0``; the others are host or on-chip memories); each allocation is
  ``{"bytes", "value", "shapes"}``: its size, its largest value's shape, all its
  shapes."""
  total, allocations, spaces = None, [], 0
  for line in text.splitlines():
    if line.startswith("Memory Space:"):
      spaces += 1
      if spaces > 1:
        break
    m = _TOTAL.match(line)
    if m and total is None:
      total = int(m.group(1))
      continue
    m = _LINE.match(line)
    if not m:
      continue
    shapes = _split_shapes(m.group(3))
    allocations.append({"bytes": int(float(m.group(1)) * _UNITS[m.group(2)]),
                        "value": max(shapes, key=shape_bytes) if shapes else "",
                        "shapes": shapes})
  return total, allocations


def largest_buffers(dump_dir: str, top: int = 6) -> list[dict]:
  """The ``top`` largest allocations of the biggest memory usage report in
  ``dump_dir`` (the step's module; small helper modules have their own), largest
  first; ``[]`` when the compiler wrote none."""
  best: tuple[int, list[dict]] = (-1, [])
  for path in glob.glob(os.path.join(dump_dir, "*memory-usage-report*.txt")):
    with open(path, encoding="utf-8", errors="replace") as f:
      total, allocations = parse(f.read())
    if total is not None and total > best[0]:
      best = (total, allocations)
  return sorted(best[1], key=lambda a: -a["bytes"])[:top]


def describe(buffer: dict) -> str:
  """``"f32[36,8,4,4096,4096] (72.0 GiB)"``."""
  return f"{buffer['value']} ({buffer['bytes'] / 2 ** 30:.1f} GiB)"
