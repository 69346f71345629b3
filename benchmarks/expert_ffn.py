r"""The experts alone against the dense FFN: the floor of the MoE layer's ratio.

A top-1 MoE layer at capacity factor 1.0 runs its E experts on ``[E, T/E, M]``
buffers: the same matmul FLOPs as the dense FFN on ``[T, M]``, split into E batched
products of T/E rows. This benchmark times just that, :class:`moe_jax.Experts` (the
model's code) on perfectly balanced buffers against :class:`moe_jax.DenseFfn` on the
same T tokens, forward + backward (gradients of the weights and the input), with no
router and no dispatch. Whatever routing and dispatch cost comes on top, so
``experts / dense`` is the least ``benchmarks/moe_layer.py``'s top-1 ratio can be on
this backend.

Both are jitted and timed alternately in one process; the ratio is the median of the
per-round ratios. Only ratios mean anything on a shared machine.

  python benchmarks/expert_ffn.py
  python benchmarks/expert_ffn.py --experts=1,8,32,128 --repeats=15 --json=out.json
  XLA_FLAGS=--xla_cpu_use_xnnpack=true python benchmarks/expert_ffn.py  # a backend flag
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
from flax import nnx

import harness  # benchmarks/harness.py
from moe_jax import DenseFfn, Experts

_EXPERTS = flags.DEFINE_list("experts", ["8", "32", "128"], "Numbers of experts E.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "M.", lower_bound=1)
_D_FF = flags.DEFINE_integer("d_ff", 1024, "H, of the dense FFN and of every expert.",
                             lower_bound=1)
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens T; each expert gets T/E rows.",
                               lower_bound=1)
_ACTIVATION = flags.DEFINE_enum("activation", "relu", ["relu", "gelu", "swiglu"],
                                "Activation of both (moe_layer.py's default: relu).")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed alternations per E.",
                                lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write the rows as JSON to this file.")


def fwd_bwd(module, x):
  """A compiled and warmed-up forward + backward of ``module`` on ``x``."""
  run, _ = harness.compiled_fwd_bwd(module, x)
  run()
  return run


def _seconds(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main(argv):
  del argv
  m, h, tokens = _D_MODEL.value, _D_FF.value, _TOKENS.value
  experts = [int(e) for e in _EXPERTS.value]
  bad = [e for e in experts if e < 1 or tokens % e]
  if bad:
    raise app.UsageError(f"--experts={','.join(map(str, bad))}: every E must divide "
                         f"--tokens={tokens} (each expert gets T/E rows).")
  x = jax.random.normal(jax.random.key(0), (tokens, m))
  dense = fwd_bwd(DenseFfn(m, h, activation=_ACTIVATION.value, rngs=nnx.Rngs(0)), x)
  print(f"# backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"jax={jax.__version__} M={m} H={h} tokens={tokens} "
        f"activation={_ACTIVATION.value} repeats={_REPEATS.value} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'E':>4} {'rows/expert':>11} | {'dense ms':>8} {'experts ms':>10} "
        f"{'experts/dense':>13}")
  rows = []
  for e in experts:
    module = Experts(e, m, h, activation=_ACTIVATION.value, rngs=nnx.Rngs(1))
    run = fwd_bwd(module, x.reshape(e, 1, tokens // e, m))  # [E, G=1, C=T/E, M]
    times = {"dense": [], "experts": []}
    for _ in range(_REPEATS.value):  # alternate so drift hits both alike
      times["dense"].append(_seconds(dense))
      times["experts"].append(_seconds(run))
    ratio = statistics.median(b / a for a, b in zip(times["dense"], times["experts"]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{e:>4} {tokens // e:>11} | {med['dense']:8.1f} {med['experts']:10.1f} "
          f"{ratio:13.2f}", flush=True)
    rows.append(dict(num_experts=e, rows_per_expert=tokens // e, dense_ms=med["dense"],
                     experts_ms=med["experts"], experts_over_dense=ratio))
  if _JSON.value:
    meta = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                jax=jax.__version__, d_model=m, d_ff=h, tokens=tokens,
                activation=_ACTIVATION.value, repeats=_REPEATS.value,
                xla_flags=os.environ.get("XLA_FLAGS", ""))
    with open(_JSON.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"# wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
