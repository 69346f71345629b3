r"""Compiled cost of one grouped matmul, forward + backward, per implementation and target.

For each target (a TPU v5p chip and an H100, compile-only topologies: nothing runs),
each expert count E and each implementation of :data:`GROUPED_MATMULS`
(``moe.grouped_matmul``), AOT-compiles ``x f[N, M], w f[E, M, H] -> (y, dx, dw)`` (the
forward and both gradients of one grouped matmul, bfloat16, the group sizes a traced
input) and records XLA's cost analysis of the optimized program: FLOPs, bytes accessed,
temporary bytes, and FLOPs over the ideal ``3 * 2 * N * M * H`` (forward, input and
weight gradient, each row against its own expert only), and counts in the optimized
HLO the Mosaic kernels (``tpu_custom_call``) and XLA's own dots and convolutions. A
compile failure is a row.

These are compiled costs (a roofline's inputs), not timings. A Pallas/Mosaic kernel
counts what its cost estimate declares. ``megablox`` is a TPU kernel: on other
targets it would run in Pallas' interpret mode (a loop emulation, not a kernel), so
its row there says so instead of a cost.

  python benchmarks/grouped_matmul_compiled.py
  python benchmarks/grouped_matmul_compiled.py --experts=8 --targets=tpu_v5p
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp

from moe_jax.layers import grouped_matmul as gm
from moe_jax.parallel.backend import compile_target
from moe_jax.planner.targets import make_target

_ROWS = flags.DEFINE_integer("rows", 8192, "N, sorted rows.")
_WIDTH = flags.DEFINE_integer("width", 1024, "M, input width.")
_HIDDEN = flags.DEFINE_integer("hidden", 4096, "H, output width.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64"], "E values.")
_TARGETS = flags.DEFINE_list("targets", ["tpu_v5p", "h100"], "Compile targets.")
_OUT = flags.DEFINE_string("out", "docs/results/grouped_matmul",
                           "Folder for results.json and results.md.")

# target -> (platform for compile_target, planner target: one chip of each).
TARGETS = {"tpu_v5p": ("tpu", "v5p:2x2x1"), "h100": ("gpu", "h100:1x1")}


def fwd_bwd(how: str):
  """(x, w, group_sizes, dy) -> (y, dx, dw) of one grouped matmul."""

  def f(x, w, group_sizes, dy):
    y, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, group_sizes, how=how), x, w)
    return (y,) + vjp(dy)

  return f


def cost(compiled, platform: str) -> dict[str, float]:
  """FLOPs, bytes accessed and temporary bytes of a compiled program."""
  if platform == "gpu":  # the CUDA executable reports no cost analysis; XLA's HLO one
    from jax._src import xla_bridge as xb  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    analysis = _jax.hlo_module_cost_analysis(
        xb.get_backend("cpu"), compiled.runtime_executable().hlo_modules()[0])
  else:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0]
  memory = compiled.memory_analysis()
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
          "temp_bytes": int(memory.temp_size_in_bytes)}


def measure(target: str, num_experts: int, how: str) -> dict:
  """One row: the compiled cost or the reason there is none."""
  n, m, h = _ROWS.value, _WIDTH.value, _HIDDEN.value
  platform, topology = TARGETS[target]
  row = {"target": target, "experts": num_experts, "impl": how, "N": n, "M": m, "H": h}
  if how == "megablox" and platform != "tpu":
    return row | {"error": "TPU-only kernel (Pallas interpret mode elsewhere)"}
  device = make_target(topology).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = (jax.ShapeDtypeStruct((n, m), jnp.bfloat16),
          jax.ShapeDtypeStruct((num_experts, m, h), jnp.bfloat16),
          jax.ShapeDtypeStruct((num_experts,), jnp.int32),
          jax.ShapeDtypeStruct((n, h), jnp.bfloat16))
  try:
    with compile_target(platform):
      compiled = jax.jit(fwd_bwd(how), in_shardings=(sharding,) * 4,
                         out_shardings=(sharding,) * 3).lower(*args).compile()
    row |= cost(compiled, platform)
    hlo = compiled.as_text()
    # Mosaic kernels, and XLA's own dots/convolutions, in the optimized program.
    row["kernels"] = hlo.count('custom_call_target="tpu_custom_call"')
    row["xla_dots"] = sum(hlo.count(f" {op}(") for op in ("dot", "convolution"))
  except Exception as e:  # pylint: disable=broad-except
    return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  row["flops_over_ideal"] = row["flops"] / (3 * 2 * n * m * h)
  return row


def to_markdown(rows: list[dict]) -> str:
  n, m, h = rows[0]["N"], rows[0]["M"], rows[0]["H"]
  lines = [
      f"Forward + backward of one grouped matmul, N={n} rows, M={m}, H={h}, bfloat16, "
      "compiled (not run). Ideal FLOPs = 3 * 2 * N * M * H "
      f"= {3 * 2 * n * m * h / 1e9:.1f} GFLOP.", "",
      "| target | E | impl | GFLOP | FLOPs / ideal | GB accessed | temp MiB | kernels | "
      "XLA dots | note |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['target']} | {r['experts']} | {r['impl']} | - | - | - | - | - | - | "
                   f"{r['error']} |")
    else:
      lines.append(
          f"| {r['target']} | {r['experts']} | {r['impl']} | {r['flops'] / 1e9:.1f} | "
          f"{r['flops_over_ideal']:.2f} | {r['bytes_accessed'] / 1e9:.2f} | "
          f"{r['temp_bytes'] / 2**20:.0f} | {r['kernels']} | {r['xla_dots']} | |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  rows = []
  for target in _TARGETS.value:
    for e in _EXPERTS.value:
      for how in gm.GROUPED_MATMULS:
        rows.append(measure(target, int(e), how))
        print(json.dumps(rows[-1]), flush=True)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
  (out / "results.md").write_text(to_markdown(rows))
  print(to_markdown(rows))


if __name__ == "__main__":
  app.run(main)
