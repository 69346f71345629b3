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
  rounding. Its backward pass (a ``custom_vjp``) keeps only the inputs, the output
  and each query's log-sum-exp, and recomputes each tile's probabilities, as
  FlashAttention-2 does (Dao 2023): training holds ``O(Q + K)`` per head, not
  ``O(Q K)``.

Shapes (STYLE.md's legend): ``q [B, Q, H, G, Dk]`` (``H`` key heads, ``G`` query heads
per key head; ``G = 1`` for multi-head attention), ``k [B, K, H, Dk]``,
``v [B, K, H, Dv]``; the result is ``[B, Q, H, G, Dv]`` in ``dtype``.
"""

from __future__ import annotations

import functools

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


def _tiles(x: jax.Array, block: int, value) -> jax.Array:
  """``[B, L, ...]`` padded to a multiple of ``block`` and cut into tiles, tiles
  first: ``[L / block, B, block, ...]``."""
  x = _pad(x, 1, block, value)
  x = x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _untile(x: jax.Array, length: int) -> jax.Array:
  """The inverse of :func:`_tiles`, padding dropped."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _visible(qpi: jax.Array, kpj: jax.Array, s: jax.Array) -> jax.Array:
  """bool[B, 1, 1, bq, bk]: key ``kpj`` visible to query ``qpi`` (causal by position,
  empty slots never), for the tile's scores ``s``.

  The positions pass an optimisation barrier together with ``s``, so the mask is
  computed in the loop, beside the scores it masks. Without it, when the attention
  runs inside scanned, rematerialised layers, the masks (which depend on positions
  alone, the same in every layer) were computed once for every tile and kept: a
  ``pred[Q/bq, K/bk, B, H, G, bq, bk]`` buffer, 18 GiB per device in Mixtral's
  training step at 36 x 4,096 tokens.
  """
  qpi, kpj, _ = jax.lax.optimization_barrier((qpi, kpj, s))
  return ((kpj[:, None, :] >= 0) & (kpj[:, None, :] <= qpi[:, :, None]))[:, None, None]


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
  b = q.shape[0]
  q_pos = jnp.broadcast_to(q_pos, (b, q.shape[1])).astype(jnp.int32)
  k_pos = jnp.broadcast_to(k_pos, (b, k.shape[1])).astype(jnp.int32)
  return _flash(q, k, v, q_pos, k_pos, float(scale), jnp.dtype(dtype), int(block))


def _forward(q, k, v, q_pos, k_pos, scale, dtype, block):
  """``(out [B, Q, H, G, Dv], lse f32[B, Q, H, G])``: the output and each query's
  log-sum-exp of its visible scores (0 where it sees no key)."""
  b, length, h, g, _ = q.shape
  dv = v.shape[-1]
  bq, bk = min(block, length), min(block, k.shape[1])
  ks, vs, kps = _tiles(k, bk, 0), _tiles(v, bk, 0), _tiles(k_pos, bk, -1)

  def query_tile(args):
    qi, qpi = args  # [B, bq, H, G, Dk], i32[B, bq]

    def key_step(carry, tile):
      m, l, acc = carry  # f32[B, H, G, bq], f32[B, H, G, bq], f32[B, bq, H, G, Dv]
      kj, vj, kpj = tile
      s = jnp.einsum("BQHGD,BKHD->BHGQK", qi, kj,
                     preferred_element_type=jnp.float32) * scale
      ok = _visible(qpi, kpj, s)
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
    (m, l, acc), _ = jax.lax.scan(key_step, init, (ks, vs, kps))
    seen = l > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    l = jnp.moveaxis(l, -1, 1)[..., None]  # [B, bq, H, G, 1]
    return (acc / jnp.where(l > 0, l, 1.0)).astype(dtype), jnp.moveaxis(lse, -1, 1)

  out, lse = jax.lax.map(query_tile, (_tiles(q, bq, 0), _tiles(q_pos, bq, -1)))
  return _untile(out, length), _untile(lse, length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_pos, k_pos, scale, dtype, block):
  return _forward(q, k, v, q_pos, k_pos, scale, dtype, block)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, scale, dtype, block):
  out, lse = _forward(q, k, v, q_pos, k_pos, scale, dtype, block)
  return out, (q, k, v, q_pos, k_pos, out, lse)


def _flash_bwd(scale, dtype, block, residuals, d_out):
  """The backward pass tile by tile from the saved output and log-sum-exp (as in
  FlashAttention-2, Dao 2023): each tile's probabilities are recomputed,
  ``dS = P * (dP - rowsum(dO * O))``, so no ``[Q, K]`` matrix is held. A scan over
  query tiles accumulates ``dK`` and ``dV`` in float32; within it, a scan over key
  tiles accumulates the tile's ``dQ``."""
  q, k, v, q_pos, k_pos, out, lse = residuals
  length = q.shape[1]
  bq, bk = min(block, length), min(block, k.shape[1])
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  ks, vs, kps = _tiles(k, bk, 0), _tiles(v, bk, 0), _tiles(k_pos, bk, -1)

  def query_tile(carry, args):
    dks, dvs = carry  # f32[nk, B, bk, H, Dk], f32[nk, B, bk, H, Dv]
    qi, qpi, doi, lsei, deltai = args
    lsei, deltai = (jnp.moveaxis(x, 1, -1) for x in (lsei, deltai))  # [B, H, G, bq]

    def key_step(dqi, tile):
      kj, vj, kpj = tile
      s = jnp.einsum("BQHGD,BKHD->BHGQK", qi, kj,
                     preferred_element_type=jnp.float32) * scale
      p = jnp.where(_visible(qpi, kpj, s), jnp.exp(s - lsei[..., None]), 0.0)
      dvj = jnp.einsum("BHGQK,BQHGD->BKHD", p.astype(dtype), doi.astype(dtype),
                       preferred_element_type=jnp.float32)
      dp = jnp.einsum("BQHGD,BKHD->BHGQK", doi.astype(dtype), vj.astype(dtype),
                      preferred_element_type=jnp.float32)
      ds = (p * (dp - deltai[..., None]) * scale).astype(q.dtype)
      dqi = dqi + jnp.einsum("BHGQK,BKHD->BQHGD", ds, kj,
                             preferred_element_type=jnp.float32)
      dkj = jnp.einsum("BHGQK,BQHGD->BKHD", ds, qi, preferred_element_type=jnp.float32)
      return dqi, (dkj, dvj)

    dqi, (dkt, dvt) = jax.lax.scan(key_step, jnp.zeros(qi.shape, jnp.float32),
                                   (ks, vs, kps))
    return (dks + dkt, dvs + dvt), dqi

  init = (jnp.zeros(ks.shape, jnp.float32), jnp.zeros(vs.shape, jnp.float32))
  (dks, dvs), dqs = jax.lax.scan(
      query_tile, init,
      (_tiles(q, bq, 0), _tiles(q_pos, bq, -1), _tiles(d_out, bq, 0),
       _tiles(lse, bq, 0), _tiles(delta, bq, 0)))
  return (_untile(dqs, length).astype(q.dtype), _untile(dks, k.shape[1]).astype(k.dtype),
          _untile(dvs, v.shape[1]).astype(v.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


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
