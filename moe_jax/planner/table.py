"""A plan's readable table (what ``experiments/plan.py`` prints)."""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} TiB"


def human_count(n: float) -> str:
  for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.2f}{unit}"
  return f"{n:.0f}"


def format_plan(p: dict[str, Any]) -> str:
  """The plan as aligned ``key  value`` lines."""
  mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
  b = p["bytes_per_device"]
  rows = [
      ("target", f"{p['target']} ({p['devices']} devices, {p['platform']})"),
      ("mesh", mesh),
      ("mode", p["mode"] + (f" (batch {p['serve_batch']}, context {p['serve_len']}, "
                            f"prefill in {p['prefill_chunks']} chunk(s) of "
                            f"{p['serve_chunk']})" if p["mode"] == "serve" else "")),
      ("params", f"{human_count(p['params_total'])} total, "
                 f"{human_count(p['params_active'])} active"),
      ("compile", f"{p['compile_s']:.1f} s"),
      ("fits", "yes" if p["fits"] else "NO"),
  ]
  for key in ("params", "optimizer", "kv_cache", "temp", "peak", "hbm"):
    if key in b:
      rows.append((f"  {key} / device", human_bytes(b[key])))
  rows += [
      ("tokens / step", human_count(p["tokens_per_step"])),
      ("FLOPs / step (compiled)", human_count(p["flops_per_step"])),
      ("FLOPs / step (model)", human_count(p["flops_per_step_model"])),
      ("step time bound", f"{p['step_s_bound'] * 1e3:.2f} ms ({p['bound_by']}-bound; "
                          "a roofline bound, not a measurement)"),
      ("MFU bound", f"{100 * p['mfu_bound']:.1f}%" if p["mfu_bound"] else "-"),
  ]
  for kind, c in p["collectives"].items():
    rows.append((f"  {kind}", f"{c['count']} x, {human_bytes(c['bytes'])} / device"))
  for i, buf in enumerate(p.get("largest_buffers") or []):
    rows.append(("largest buffers" if i == 0 else "", f"{human_bytes(buf['bytes'])}  "
                 f"{buf['value']}"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
