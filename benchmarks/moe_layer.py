r"""MoE layer cost relative to the dense FFN it replaces, forward + backward.

Both layers have the same M, H and activation, so a top-1 MoE layer does the same
useful FLOPs per token as the dense FFN; its ideal ratio is 1.0 plus a small router.
They are jitted and timed alternately in one process (median of the per-repeat
ratios), so machine noise hits every side alike and only ratios are results.

Two dense baselines run beside each MoE layer:

* ``dense``: :class:`moe_jax.DenseFfn`, whose matmuls run on the tokens as 2-D
  ``[T, M]`` rows, the fastest dense FFN measured on CPU
  (``moe_jax/layers/projection.py``, ``benchmarks/matmul_forms.py``). ``ratio`` (MoE /
  dense) and the goals use it.
* ``dense_einsum``: the same FFN written as ``einsum("...M,MH->...H")`` on the
  ``[T/256, 256, M]`` input (``benchmarks/einsum_forms.py``), the form this benchmark
  compared against before; XLA:CPU runs its backward pass slower.
  ``ratio_vs_dense_einsum`` is reported so that results can be compared with earlier
  runs.

  python benchmarks/moe_layer.py                      # the quick grid
  python benchmarks/moe_layer.py --grid=full --json=out.json
  python benchmarks/moe_layer.py --experts=8,128 --top_k=1 --capacity_factors=1.0 \
      --group_sizes=1024 --dispatch=einsum,indices,dropless

``dropless`` ignores the capacity factor, so it gets one row per (E, K, S), shown with
cf "-". A configuration whose compiled step needs more than ``--max_gib`` of temporary
and output memory is skipped with its size printed (``ragged_dot`` on CPU is lowered to a
dense masked matmul whose memory grows with E). ``--grouped_matmul`` sets the dropless
rows' ``moe.grouped_matmul`` (``auto``: ``tiled`` on CPU, ``ragged_dot`` on GPU/TPU);
their JSON rows record the one that ran. Each row also reports the minor page
faults per step of both sides, read from ``getrusage``: on CPU, fresh buffers are
faulted in page by page on every step, which is a large part of what E=128 costs.
"""

from __future__ import annotations

import itertools
import json
import platform
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

import einsum_forms  # benchmarks/einsum_forms.py
import harness  # benchmarks/harness.py
from moe_jax import DenseFfn, MoeConfig, MoeLayer
from moe_jax.layers.grouped_matmul import CHOICES as GROUPED_MATMUL_CHOICES
from moe_jax.layers.grouped_matmul import resolve_grouped_matmul
from moe_jax.layers.dispatch import DISPATCHERS

GRIDS = {
    # E x K x cf x S x dispatch; the issue's full grid is --grid=full.
    "quick": dict(experts=(8, 32, 128), top_k=(1, 2), capacity_factors=(1.0,),
                  group_sizes=(1024,), dispatch=("einsum", "indices", "dropless")),
    "full": dict(experts=(8, 32, 128), top_k=(1, 2), capacity_factors=(1.0, 1.25, 2.0),
                 group_sizes=(256, 1024, 4096),
                 dispatch=("einsum", "indices", "dropless")),
}

_GRID = flags.DEFINE_enum("grid", "quick", list(GRIDS), "Preset grid.")
_EXPERTS = flags.DEFINE_list("experts", None, "Override: numbers of experts E.")
_TOP_K = flags.DEFINE_list("top_k", None, "Override: top_k values.")
_CFS = flags.DEFINE_list("capacity_factors", None, "Override: capacity factors.")
_GROUPS = flags.DEFINE_list("group_sizes", None, "Override: group sizes S.")
_DISPATCH = flags.DEFINE_list("dispatch", None,
                              f"Override: dispatch paths, from {list(DISPATCHERS)}.")
_GROUPED = flags.DEFINE_enum("grouped_matmul", "auto", list(GROUPED_MATMUL_CHOICES),
                             "dropless rows: moe.grouped_matmul (auto: per backend).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "M.")
_D_FF = flags.DEFINE_integer("d_ff", 1024, "H.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens per step (B*L).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (the router stays float32).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed alternations per configuration.")
_JSON = flags.DEFINE_string("json", None, "Write all rows as JSON to this file.")
_MAX_GIB = flags.DEFINE_float("max_gib", 8.0,
                              "Skip configurations whose compiled step needs more "
                              "temporary + output memory than this (GiB).",
                              lower_bound=0.0)


class TooBig(Exception):
  pass


def _fwd_bwd(module, x, max_bytes=None):
  """A jitted forward+backward step of ``module`` on ``x`` (grads wrt params and x).

  Raises TooBig, before running anything, if the compiled step needs more than
  ``max_bytes`` of temporary + output memory.
  """
  run, mem = harness.compiled_fwd_bwd(module, x)
  if mem is not None and max_bytes is not None and mem > max_bytes:
    raise TooBig(f"needs {mem / 2**30:.2f} GiB > --max_gib={max_bytes / 2**30:g}")
  run()  # warm up
  return run, mem


def _time(fn) -> tuple[float, int]:
  """Seconds and minor page faults of one call."""
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  fn()
  elapsed = time.perf_counter() - start
  return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def _rows():
  grid = dict(GRIDS[_GRID.value])
  for key, flag, conv in [("experts", _EXPERTS, int), ("top_k", _TOP_K, int),
                          ("capacity_factors", _CFS, float),
                          ("group_sizes", _GROUPS, int), ("dispatch", _DISPATCH, str)]:
    if flag.value:
      grid[key] = tuple(conv(v) for v in flag.value)
  for d in grid["dispatch"]:
    if d not in DISPATCHERS:
      sys.exit(f"--dispatch={d} is unknown; use one of {', '.join(DISPATCHERS)}.")
  rows = []
  for e, k, cf, s, d in itertools.product(grid["experts"], grid["top_k"],
                                          grid["capacity_factors"],
                                          grid["group_sizes"], grid["dispatch"]):
    if d == "dropless":  # capacity-free: one row per (E, K, S)
      if cf != grid["capacity_factors"][0]:
        continue
      cf = None
    rows.append((e, k, cf, s, d))
  return rows


def main(argv):
  del argv
  m, h, tokens, dtype = _D_MODEL.value, _D_FF.value, _TOKENS.value, _DTYPE.value
  x = jax.random.normal(jax.random.key(0), (tokens // 256, 256, m)).astype(dtype)
  dense_run, dense_mem = _fwd_bwd(
      DenseFfn(m, h, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)), x)
  with einsum_forms.einsum_forms():  # traced and compiled inside: the former form
    einsum_run, einsum_mem = _fwd_bwd(
        DenseFfn(m, h, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)), x)
  device = jax.devices()[0]
  print(f"# backend={jax.default_backend()} device={device.device_kind} "
        f"cpu={platform.processor() or platform.machine()} jax={jax.__version__} "
        f"M={m} H={h} tokens={tokens} dtype={dtype} repeats={_REPEATS.value}")
  print("# dense: 2-D matmuls on [T, M] (DenseFfn); dense_einsum: einsum on "
        "[T/256, 256, M]; ratio = MoE / dense, vs_einsum = MoE / dense_einsum")
  header = (f"{'E':>4} {'K':>2} {'cf':>5} {'S':>5} {'dispatch':>8} | {'dense ms':>9} "
            f"{'einsum ms':>9} {'moe ms':>9} {'ratio':>6} {'vs_einsum':>9} | "
            f"{'dense MiB':>9} {'moe MiB':>8} | {'dense flt':>9} {'moe flt':>8}")
  print(header)
  print("-" * len(header))
  rows, einsum_over_dense = [], []
  for e, k, cf, s, dispatch in _rows():
    cfg = MoeConfig(d_model=m, d_ff=h, num_experts=e, top_k=k,
                    capacity_factor=cf or 1.0, group_size=s, dispatch=dispatch,
                    dtype=dtype,
                    grouped_matmul=_GROUPED.value if dispatch == "dropless" else "auto")
    key = f"{e:>4} {k:>2} {cf or '-':>5} {s:>5} {dispatch:>8} |"
    row = dict(num_experts=e, top_k=k, capacity_factor=cf, group_size=s,
               dispatch=dispatch)
    if dispatch == "dropless":
      row["grouped_matmul"] = resolve_grouped_matmul(_GROUPED.value)
    try:
      moe_run, moe_mem = _fwd_bwd(MoeLayer(cfg, rngs=nnx.Rngs(1)), x,
                                  max_bytes=_MAX_GIB.value * 2**30)
    except TooBig as err:
      print(f"{key} skipped: {err}")
      rows.append(dict(row, skipped=str(err)))
      continue
    except Exception as err:  # e.g. out of memory for the biggest einsum tensors
      print(f"{key} failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
      rows.append(dict(row, error=str(err).splitlines()[0]))
      continue
    times = {"dense": [], "einsum": [], "moe": []}
    for _ in range(_REPEATS.value):  # alternate so drift hits every side alike
      for name, run in (("dense", dense_run), ("einsum", einsum_run), ("moe", moe_run)):
        times[name].append(_time(run))
    med = {n: statistics.median(t for t, _ in v) for n, v in times.items()}
    per_round = lambda a, b: statistics.median(
        [tb / ta for (ta, _), (tb, _) in zip(times[a], times[b])])
    ratio, ratio_einsum = per_round("dense", "moe"), per_round("einsum", "moe")
    einsum_over_dense.append(per_round("dense", "einsum"))
    d_flt = statistics.median(f for _, f in times["dense"])
    m_flt = statistics.median(f for _, f in times["moe"])
    mib = lambda v: f"{v / 2**20:8.1f}" if v is not None else "     n/a"
    print(f"{key} {med['dense'] * 1e3:9.2f} {med['einsum'] * 1e3:9.2f} "
          f"{med['moe'] * 1e3:9.2f} {ratio:6.2f} {ratio_einsum:9.2f} | "
          f"{mib(dense_mem):>9} {mib(moe_mem):>8} | {d_flt:9.0f} {m_flt:8.0f}",
          flush=True)
    rows.append(dict(row, dense_ms=med["dense"] * 1e3,
                     dense_einsum_ms=med["einsum"] * 1e3, moe_ms=med["moe"] * 1e3,
                     ratio=ratio, ratio_vs_dense_einsum=ratio_einsum,
                     dense_bytes=dense_mem, dense_einsum_bytes=einsum_mem,
                     moe_bytes=moe_mem, dense_page_faults=d_flt,
                     moe_page_faults=m_flt,
                     tokens_per_sec_dense=tokens / med["dense"],
                     tokens_per_sec_dense_einsum=tokens / med["einsum"],
                     tokens_per_sec_moe=tokens / med["moe"]))
  if einsum_over_dense:
    print(f"# dense_einsum / dense: median {statistics.median(einsum_over_dense):.2f} "
          f"over {len(einsum_over_dense)} rows (> 1: the 2-D baseline is faster)")
  if _JSON.value:
    meta = dict(backend=jax.default_backend(), device=device.device_kind,
                jax=jax.__version__, d_model=m, d_ff=h, tokens=tokens, dtype=dtype,
                repeats=_REPEATS.value,
                dense="DenseFfn: 2-D matmuls on [T, M] (ratio, goals)",
                dense_einsum="einsum on [T/256, 256, M] (ratio_vs_dense_einsum)")
    with open(_JSON.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"# wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
