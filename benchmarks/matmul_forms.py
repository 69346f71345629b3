r"""Each projection of the model as an einsum on its N-D activations vs one 2-D matmul.

The same numbers can be computed two ways: ``einsum("BLM,MH->BLH")`` on ``[B, L, M]``,
or a reshape to ``[B*L, M]``, a 2-D matmul and a reshape back. XLA lowers both to one
``dot_general``, but on CPU the N-D form can be slower, in the backward pass, whose
weight gradient contracts over two token axes (``moe_jax/layers/projection.py``). This
benchmark decides, per projection, which form the model uses: each pair is jitted as
forward + backward (gradients for the weights and the input), checked equal, then timed
alternately in one process, and the per-round ratio ``einsum / 2-D`` is reported (median
of repeats; > 1 means the 2-D form is faster). Only ratios are meaningful on a shared
machine; absolute times are printed for scale. Each row also counts the ``transpose``
ops in both compiled steps (decided by the compiler, not measured): the transposed
copies the N-D form costs.

  python benchmarks/matmul_forms.py
  python benchmarks/matmul_forms.py --sizes=layer --repeats=15 --json=forms.json

The shapes are those of ``dense_small`` / ``switch_small`` training (``--sizes=train``:
B=16, L=128, M=256, H=1024, 4 heads of 64, V=256, E=8, S=128, C=20) or of
``benchmarks/moe_layer.py`` (``--sizes=layer``: 8192 tokens as [32, 256, M], E=8 and
128 with S=1024, C=S/E). The dense FFN and experts use gelu. The ``mamba_*`` cases are
``moe_jax/models/mamba.py``'s in_proj and x_proj (expand 2, R=M/16, N=16), a mixer not
yet part of the Transformer.
"""

from __future__ import annotations

import json
import re
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_SIZES = flags.DEFINE_enum("sizes", "train", ["train", "layer", "tiny"],
                           "Shapes: dense_small training, the layer benchmark, or tiny "
                           "(a smoke run).")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed alternations per projection.")
_CASES = flags.DEFINE_list("cases", None, "Only these cases (default: all).")
_JSON = flags.DEFINE_string("json", None, "Write the rows as JSON to this file.")

HIGHEST = jax.lax.Precision.HIGHEST
gelu = jax.nn.gelu


def _mm(x, w, **kw):
  """[..., K] @ [K, N] as one 2-D matmul on the rows."""
  lead = x.shape[:-1]
  y = jnp.matmul(x.reshape(-1, x.shape[-1]), w, **kw)
  return y.reshape(*lead, w.shape[-1])


def cases(size: str):
  """name -> (params, x, einsum form, 2-D form); each form is f(params, x) -> y."""
  if size == "tiny":
    b, l, m, h, n, d, v = 2, 16, 16, 32, 2, 8, 32
    expert_shapes = [(4, 2, 8)]  # (E, G, C)
    router_shapes = [(2, 16, 4)]  # (G, S, E)
  elif size == "train":
    b, l, m, h, n, d, v = 16, 128, 256, 1024, 4, 64, 256
    # switch_small: one group per sequence (S=128), C = ceil(1.25 * 128 / 8) = 20.
    expert_shapes = [(8, 16, 20)]
    router_shapes = [(16, 128, 8)]
  else:
    b, l, m, h, n, d, v = 32, 256, 256, 1024, 4, 64, 256
    # 8192 tokens in groups of S=1024 (G=8), C = S / E at capacity factor 1.0.
    expert_shapes = [(8, 8, 128), (128, 8, 8)]
    router_shapes = [(8, 1024, 8), (8, 1024, 128)]
  key = iter(jax.random.split(jax.random.key(0), 64))
  rand = lambda *shape: jax.random.normal(next(key), shape, jnp.float32) / np.sqrt(
      shape[0] if len(shape) == 2 else shape[-2])
  out = {}

  # Dense FFN (DenseFfn, shared experts): [B, L, M] -> [B, L, M].
  x = jax.random.normal(next(key), (b, l, m))
  out["dense_ffn"] = (
      {"wi": rand(m, h), "wo": rand(h, m)}, x,
      lambda p, x: jnp.einsum("...H,HM->...M",
                              gelu(jnp.einsum("...M,MH->...H", x, p["wi"])), p["wo"]),
      lambda p, x: _mm(gelu(_mm(x, p["wi"])), p["wo"]))

  # Attention q/k/v: [B, L, M] x [M, N, D] -> [B, L, N, D] (one of the three).
  out["attention_qkv"] = (
      {"w": rand(m, n * d).reshape(m, n, d)}, x,
      lambda p, x: jnp.einsum("BLM,MND->BLND", x, p["w"]),
      lambda p, x: _mm(x, p["w"].reshape(m, n * d)).reshape(b, l, n, d))

  # Attention output: [B, L, N, D] x [N, D, M] -> [B, L, M].
  xh = jax.random.normal(next(key), (b, l, n, d))
  out["attention_out"] = (
      {"w": rand(n * d, m).reshape(n, d, m)}, xh,
      lambda p, x: jnp.einsum("BLND,NDM->BLM", x, p["w"]),
      lambda p, x: _mm(x.reshape(b, l, n * d), p["w"].reshape(n * d, m)))

  # Unembedding: [B, L, M] x [M, V] -> f32[B, L, V].
  out["unembed"] = (
      {"w": rand(m, v)}, x,
      lambda p, x: jnp.einsum("BLM,MV->BLV", x, p["w"],
                              preferred_element_type=jnp.float32),
      lambda p, x: _mm(x, p["w"], preferred_element_type=jnp.float32))

  # Mamba mixer (moe_jax/models/mamba.py, expand 2, R = M/16, N = 16): in_proj and
  # x_proj.
  d_in, r_n = 2 * m, m // 16 + 2 * 16
  xd = jax.random.normal(next(key), (b, l, d_in))
  for name, xs, k_, n_ in (("mamba_in_proj", x, m, 2 * d_in),
                           ("mamba_x_proj", xd, d_in, r_n)):
    out[name] = (
        {"w": rand(k_, n_)}, xs,
        lambda p, x: jnp.einsum("...K,KN->...N", x, p["w"]),
        lambda p, x: _mm(x, p["w"]))

  # Router logits, float32 at HIGHEST: [G, S, M] x [M, E] -> [G, S, E].
  for g, s, e in router_shapes:
    xg = jax.random.normal(next(key), (g, s, m))
    out[f"router_E{e}"] = (
        {"w": rand(m, e)}, xg,
        lambda p, x: jnp.einsum("GSM,ME->GSE", x, p["w"], precision=HIGHEST),
        lambda p, x: _mm(x, p["w"], precision=HIGHEST))

  # Experts on [E, G, C, M] buffers (einsum and indices dispatch): the 2-D-per-expert
  # form merges G and C into one row axis, a batched matmul over E.
  for e, g, c in expert_shapes:
    xe = jax.random.normal(next(key), (e, g, c, m))

    def merged(p, x, e=e, g=g, c=c):
      h_ = jnp.einsum("ETM,EMH->ETH", x.reshape(e, g * c, m), p["wi"])
      return jnp.einsum("ETH,EHM->ETM", gelu(h_), p["wo"]).reshape(e, g, c, m)

    out[f"experts_E{e}"] = (
        {"wi": rand(e, m, h), "wo": rand(e, h, m)}, xe,
        lambda p, x: jnp.einsum(
            "EGCH,EHM->EGCM", gelu(jnp.einsum("EGCM,EMH->EGCH", x, p["wi"])), p["wo"]),
        merged)
  return out


def _step(f, params, x):
  """The compiled forward + backward of ``f``, its result and its transpose count."""
  def loss(params, x):
    return jnp.mean(f(params, x).astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  transposes = len(re.findall(r"= \S+ transpose\(", compiled.as_text()))
  result = compiled(params, x)
  jax.block_until_ready(result)
  return compiled, result, transposes


def _max_rel_diff(a, b) -> float:
  diffs = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))
                                          / (jnp.max(jnp.abs(u)) + 1e-30)), a, b)
  return max(jax.tree.leaves(diffs))


def main(argv):
  del argv
  all_cases = cases(_SIZES.value)
  names = _CASES.value or list(all_cases)
  unknown = sorted(set(names) - set(all_cases))
  if unknown:
    raise app.UsageError(f"--cases={','.join(unknown)} unknown; pick from "
                         f"{', '.join(all_cases)}.")
  print(f"# backend={jax.default_backend()} jax={jax.__version__} "
        f"sizes={_SIZES.value} repeats={_REPEATS.value}")
  print(f"{'case':>14} | {'einsum ms':>9} {'2-D ms':>8} {'einsum/2-D':>10} | "
        f"{'transposes':>10} | {'max rel diff':>12}")
  rows = []
  for name in names:
    params, x, nd_form, mm_form = all_cases[name]
    nd_step, nd_out, nd_tr = _step(nd_form, params, x)
    mm_step, mm_out, mm_tr = _step(mm_form, params, x)
    diff = _max_rel_diff(nd_out, mm_out)
    nd_t, mm_t = [], []
    for _ in range(_REPEATS.value):  # alternate so load drift hits both forms alike
      for step, times in ((nd_step, nd_t), (mm_step, mm_t)):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(nd_t, mm_t))
    nd_ms, mm_ms = statistics.median(nd_t) * 1e3, statistics.median(mm_t) * 1e3
    print(f"{name:>14} | {nd_ms:9.2f} {mm_ms:8.2f} {ratio:10.2f} | "
          f"{f'{nd_tr} vs {mm_tr}':>10} | {diff:12.1e}", flush=True)
    rows.append(dict(case=name, einsum_ms=nd_ms, matmul_2d_ms=mm_ms,
                     einsum_over_2d=ratio, einsum_transposes=nd_tr,
                     matmul_2d_transposes=mm_tr, max_rel_diff=diff))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(backend=jax.default_backend(), jax=jax.__version__,
                     sizes=_SIZES.value, repeats=_REPEATS.value, rows=rows), f,
                indent=1)


if __name__ == "__main__":
  app.run(main)
