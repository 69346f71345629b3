"""Causal attention over positions, dense or blocked with an online softmax.

``model.attention_kernel`` picks how attention and MLA compute
``softmax(q k^T * scale) v`` under the causal-by-positions mask (a key at position
``p_k`` is visible to a query at ``p_q`` when ``0 <= p_k <= p_q``; empty cache slots
hold -1):

* ``"dense"`` (the default) -- the mixers' own einsums over the whole ``[Q, K]`` score
  matrix: ``B * N * Q * K`` float32 scores at once, 1 TiB for a 32K-token prefill of 8
  rows and 32 heads;
* ``"blocked"`` -- :func:`blocked_attention`: queries in blocks of
  ``model.attention_block`` (a ``lax.map``), and for each, a ``lax.scan`` over key
  blocks that keeps a running max, denominator and weighted sum in float32 (the
  online softmax of Milakov & Gimelshein 2018, as in FlashAttention, Dao et al. 2022).
  Only ``[B, N, block, block]`` scores live at a time. Every block pair is computed,
  the masked ones above the diagonal included, so its FLOPs are those of the dense
  kernel (no causal skipping); the values equal the dense kernel's to float32
  rounding. Each key step is rematerialised in the backward pass, so training keeps
  the carries, not the scores.

Shapes (STYLE.md's legend): ``q [B, Q, H, G, Dk]`` (``H`` key heads, ``G`` query heads
per key head; ``G = 1`` for multi-head attention), ``k [B, K, H, Dk]``,
``v [B, K, H, Dv]``; the result is ``[B, Q, H, G, Dv]`` in ``dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_KERNELS = ("dense", "blocked")
_MIN = jnp.finfo(jnp.float32).min


def _pad(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                      k_pos: jax.Array, *, scale: float, dtype, block: int
                      ) -> jax.Array:
  """Causal-by-positions attention in ``block x block`` tiles (module docstring).

  Args:
    q: [B, Q, H, G, Dk]; k: [B, K, H, Dk]; v: [B, K, H, Dv].
    q_pos: i32[B or 1, Q], the queries' positions; k_pos: i32[B or 1, K], the keys'
      (-1: an empty slot, never visible).
    scale: multiplies the scores (``1 / sqrt(Dk)`` for attention).
    dtype: the compute dtype of the probabilities times ``v`` and of the result.
    block: query and key tile length; Q and K are padded up to multiples of it
      (padded keys are invisible, padded queries are dropped).

  Returns:
    [B, Q, H, G, Dv].
  """
  b, length = q.shape[:2]
  h, g, dv = q.shape[2], q.shape[3], v.shape[-1]
  q_pos = jnp.broadcast_to(q_pos, (b, length))
  k_pos = jnp.broadcast_to(k_pos, (b, k.shape[1]))
  bq, bk = min(block, length), min(block, k.shape[1])
  qs = _pad(q, 1, bq, 0)
  qps = _pad(q_pos, 1, bq, -1)
  ks, vs = _pad(k, 1, bk, 0), _pad(v, 1, bk, 0)
  kps = _pad(k_pos, 1, bk, -1)
  nq, nk = qs.shape[1] // bq, ks.shape[1] // bk
  # Tiles first: [n, B, block, ...].
  qs = jnp.moveaxis(qs.reshape(b, nq, bq, *qs.shape[2:]), 1, 0)
  qps = jnp.moveaxis(qps.reshape(b, nq, bq), 1, 0)
  ks = jnp.moveaxis(ks.reshape(b, nk, bk, *ks.shape[2:]), 1, 0)
  vs = jnp.moveaxis(vs.reshape(b, nk, bk, *vs.shape[2:]), 1, 0)
  kps = jnp.moveaxis(kps.reshape(b, nk, bk), 1, 0)

  def query_tile(args):
    qi, qpi = args  # [B, bq, H, G, Dk], i32[B, bq]

    @jax.checkpoint
    def key_step(carry, tile):
      m, l, acc = carry  # f32[B, H, G, bq], f32[B, H, G, bq], f32[B, bq, H, G, Dv]
      kj, vj, kpj = tile
      s = jnp.einsum("BQHGD,BKHD->BHGQK", qi, kj,
                     preferred_element_type=jnp.float32) * scale
      ok = ((kpj[:, None, :] >= 0) & (kpj[:, None, :] <= qpi[:, :, None]))[:, None, None]
      s = jnp.where(ok, s, _MIN)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      pv = jnp.einsum("BHGQK,BKHD->BQHGD", p.astype(dtype), vj.astype(dtype),
                      preferred_element_type=jnp.float32)
      acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
      return (m_new, l, acc), None

    init = (jnp.full((b, h, g, bq), _MIN, jnp.float32),
            jnp.zeros((b, h, g, bq), jnp.float32),
            jnp.zeros((b, bq, h, g, dv), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(key_step, init, (ks, vs, kps))
    l = jnp.moveaxis(l, -1, 1)[..., None]  # [B, bq, H, G, 1]
    return (acc / jnp.where(l > 0, l, 1.0)).astype(dtype)

  out = jax.lax.map(query_tile, (qs, qps))  # [nq, B, bq, H, G, Dv]
  return jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, h, g, dv)[:, :length]


def kernel_errors(kernel, block, prefix: str = "") -> list[str]:
  """``model.attention_kernel`` and ``model.attention_block``, one line each."""
  errors = []
  if kernel not in ATTENTION_KERNELS:
    errors.append(f"{prefix}attention_kernel={kernel!r} is unknown; use 'dense' (the "
                  "whole score matrix) or 'blocked' (tiles with an online softmax, for "
                  "long contexts).")
  if not (isinstance(block, int) and not isinstance(block, bool) and block >= 1):
    errors.append(f"{prefix}attention_block={block!r} must be a positive integer, the "
                  "tile length of the blocked kernel (512).")
  return errors
