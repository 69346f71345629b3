r"""Forward + backward of the Mamba training scan: each ``mamba.scan`` at each chunk size.

``moe_jax.models.mamba.selective_scan`` solves the chunked recurrence with the ``SCANS``
registry (``associative``: ``jax.lax.associative_scan`` inside a chunk; ``sequential``:
``lax.scan`` of the decode step). This benchmark jits ``grad`` of a loss of both
outputs (y and the last state) for every (scan, T) pair, checks that every pair gives
the numbers of the first one, then times them interleaved in one process (each round
runs every pair once) and prints the median per pair and its ratio to the fastest.
Only the ratios are meaningful on a shared machine.

  python benchmarks/mamba_scan.py                        # jamba_small's shape
  python benchmarks/mamba_scan.py --chunk_sizes=8,16,64 --length=1024 --batch=2

The default shape is jamba_small's training step: B=16, L=128, D_in=256 (expand 2 of
d_model 128), N=16.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import harness  # benchmarks/harness.py
from moe_jax.models import mamba

_SCANS = flags.DEFINE_list("scans", list(mamba.SCANS),
                           "Scans of moe_jax.models.mamba.SCANS.")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["8", "16", "32", "64"], "Chunk sizes T.")
_BATCH = flags.DEFINE_integer("batch", 16, "B.")
_LENGTH = flags.DEFINE_integer("length", 128, "L.")
_D_INNER = flags.DEFINE_integer("d_inner", 256, "D_in.")
_D_STATE = flags.DEFINE_integer("d_state", 16, "N.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed interleaved rounds.")
_JSON = flags.DEFINE_string("json", None, "Write meta and rows as JSON to this file.")


def inputs(batch: int, length: int, d_inner: int, d_state: int):
  """dt, a, b, c, x of jamba-like statistics: dt = softplus(N(0,1) - 3), A = -(1..N)."""
  k = jax.random.split(jax.random.key(0), 4)
  dt = jax.nn.softplus(jax.random.normal(k[0], (batch, length, d_inner)) - 3.0)
  a = -jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
  b = jax.random.normal(k[1], (batch, length, d_state))
  c = jax.random.normal(k[2], (batch, length, d_state))
  x = jax.random.normal(k[3], (batch, length, d_inner))
  return dt, a, b, c, x


def step_fn(scan: str, chunk_size: int):
  """jit(value_and_grad) of sum(y^2) + sum(h_L) with respect to dt, b, c and x."""
  def loss(dt, a, b, c, x):
    y, h = mamba.selective_scan(dt, a, b, c, x, chunk_size=chunk_size, scan=scan)
    return jnp.sum(y ** 2) + jnp.sum(h)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))


def main(argv):
  del argv
  unknown = sorted(set(_SCANS.value) - set(mamba.SCANS))
  if unknown:
    raise app.UsageError(f"--scans={','.join(unknown)}: not in {', '.join(mamba.SCANS)}.")
  args = inputs(_BATCH.value, _LENGTH.value, _D_INNER.value, _D_STATE.value)
  pairs = [(s, int(t)) for s in _SCANS.value for t in _CHUNKS.value]
  fns = {pair: step_fn(*pair) for pair in pairs}
  first = None
  for pair, fn in fns.items():
    out = jax.block_until_ready(fn(*args))
    if first is None:
      first = out
      continue
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(first)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(
          jnp.abs(want).max()), err_msg=f"{pair} differs from {pairs[0]}")
  times = {pair: [] for pair in pairs}
  for _ in range(_REPEATS.value):
    for pair, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[pair].append(time.perf_counter() - start)
  medians = {pair: statistics.median(ts) for pair, ts in times.items()}
  best = min(medians.values())
  rows = [{"scan": s, "chunk_size": t, "median_ms": 1000 * medians[(s, t)],
           "vs_fastest": medians[(s, t)] / best} for s, t in pairs]
  meta = {"backend": jax.default_backend(), "jax": jax.__version__,
          "repeats": _REPEATS.value, "batch": _BATCH.value, "length": _LENGTH.value,
          "d_inner": _D_INNER.value, "d_state": _D_STATE.value}
  print(f"# backend={meta['backend']} jax={meta['jax']} B={meta['batch']} "
        f"L={meta['length']} D_in={meta['d_inner']} N={meta['d_state']} "
        f"repeats={meta['repeats']}")
  print("| scan | T | median ms | vs fastest |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['scan']} | {r['chunk_size']} | {r['median_ms']:.1f} | "
          f"{r['vs_fastest']:.2f} |")
  harness.write_results({"meta": meta, "rows": rows}, json_path=_JSON.value)


if __name__ == "__main__":
  app.run(main)
