r"""MoE layer cost relative to the dense FFN it replaces, forward + backward.

Both layers have the same M, H and activation, so a top-1 MoE layer does the same
useful FLOPs per token as the dense FFN; its ideal ratio is 1.0 plus a small router. The
two are jitted and timed alternately in one process (median of repeats), so machine
noise hits both sides alike and only the ratio is reported as the result.

  python benchmarks/moe_layer.py                      # the quick grid
  python benchmarks/moe_layer.py --grid=full --json=out.json
  python benchmarks/moe_layer.py --experts=8,128 --top_k=1 --capacity_factors=1.0 \
      --group_sizes=1024 --dispatch=einsum,indices,dropless

``dropless`` ignores the capacity factor, so it gets one row per (E, K, S), shown with
cf "-". A configuration whose compiled step needs more than ``--max_gib`` of temporary
and output memory is skipped with its size printed (``ragged_dot`` on CPU is lowered to a
dense masked matmul whose memory grows with E). Each row also reports the minor page
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

from moe_jax import DenseFfn, MoeConfig, MoeLayer
from moe_jax.moe_layer import DISPATCHERS

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
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x)
    y = out[0] if isinstance(out, tuple) else out
    extra = out[1].aux_loss if isinstance(out, tuple) else 0.0
    return jnp.mean(y.astype(jnp.float32) ** 2) + 0.01 * extra

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  mem = None
  try:
    analysis = compiled.memory_analysis()
    mem = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
  except Exception:  # not every backend reports it
    pass
  if mem is not None and max_bytes is not None and mem > max_bytes:
    raise TooBig(f"needs {mem / 2**30:.2f} GiB > --max_gib={max_bytes / 2**30:g}")

  def run():
    jax.block_until_ready(compiled(params, x))

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
  dense = DenseFfn(m, h, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
  dense_run, dense_mem = _fwd_bwd(dense, x)
  device = jax.devices()[0]
  print(f"# backend={jax.default_backend()} device={device.device_kind} "
        f"cpu={platform.processor() or platform.machine()} jax={jax.__version__} "
        f"M={m} H={h} tokens={tokens} dtype={dtype} repeats={_REPEATS.value}")
  header = (f"{'E':>4} {'K':>2} {'cf':>5} {'S':>5} {'dispatch':>8} | {'dense ms':>9} "
            f"{'moe ms':>9} {'ratio':>6} | {'dense MiB':>9} {'moe MiB':>8} | "
            f"{'dense flt':>9} {'moe flt':>8}")
  print(header)
  print("-" * len(header))
  rows = []
  for e, k, cf, s, dispatch in _rows():
    cfg = MoeConfig(d_model=m, d_ff=h, num_experts=e, top_k=k,
                    capacity_factor=cf or 1.0, group_size=s, dispatch=dispatch,
                    dtype=dtype)
    key = f"{e:>4} {k:>2} {cf or '-':>5} {s:>5} {dispatch:>8} |"
    row = dict(num_experts=e, top_k=k, capacity_factor=cf, group_size=s,
               dispatch=dispatch)
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
    dense_t, moe_t = [], []
    for _ in range(_REPEATS.value):  # alternate so drift hits both sides alike
      dense_t.append(_time(dense_run))
      moe_t.append(_time(moe_run))
    d_med = statistics.median(t for t, _ in dense_t)
    m_med = statistics.median(t for t, _ in moe_t)
    ratio = statistics.median([b / a for (a, _), (b, _) in zip(dense_t, moe_t)])
    d_flt = statistics.median(f for _, f in dense_t)
    m_flt = statistics.median(f for _, f in moe_t)
    mib = lambda v: f"{v / 2**20:8.1f}" if v is not None else "     n/a"
    print(f"{key} {d_med * 1e3:9.2f} {m_med * 1e3:9.2f} {ratio:6.2f} | "
          f"{mib(dense_mem):>9} {mib(moe_mem):>8} | {d_flt:9.0f} {m_flt:8.0f}",
          flush=True)
    rows.append(dict(row, dense_ms=d_med * 1e3, moe_ms=m_med * 1e3,
                     ratio=ratio, dense_bytes=dense_mem, moe_bytes=moe_mem,
                     dense_page_faults=d_flt, moe_page_faults=m_flt,
                     tokens_per_sec_dense=tokens / d_med,
                     tokens_per_sec_moe=tokens / m_med))
  if _JSON.value:
    meta = dict(backend=jax.default_backend(), device=device.device_kind,
                jax=jax.__version__, d_model=m, d_ff=h, tokens=tokens, dtype=dtype,
                repeats=_REPEATS.value)
    with open(_JSON.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"# wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
