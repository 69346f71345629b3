"""Multi-head latent attention (MLA; DeepSeek-V2, DeepSeek-AI 2024; DeepSeek-V3).

With ``model.mixer="mla"`` the layer pattern's attention blocks mix with
:class:`MultiHeadLatentAttention` (Mamba blocks stay Mamba), under the block attribute
``attn`` (paths ``attn_norm``, ``attn``). It follows Hugging Face ``DeepseekV3Attention``
weight for weight. Shapes use the project legend plus:

| letter | meaning |
|---|---|
| N | ``model.num_heads`` query heads |
| Rq | ``mla.q_lora_rank``, the compressed query's width (0: no compression) |
| R | ``mla.kv_lora_rank``, the compressed key/value latent's width |
| Dn, Dr, Dv | ``mla.qk_nope_head_dim``, ``mla.qk_rope_head_dim``, ``mla.v_head_dim`` |

Per token (``rms``: RMSNorm with ``model.norm_eps``)::

    q       = q_b_proj(rms(q_a_proj(x)))  or  q_proj(x)    # [N, Dn + Dr]
    q_nope, q_rope = split(q)                               # Dn, Dr
    c, k_rope = split(kv_a_proj_with_mqa(x))               # [R], [Dr]: one rope key
    c       = rms(c)                                        # kv_a_layernorm
    k_nope, v = split(kv_b_proj(c))                         # [N, Dn], [N, Dv]
    q_rope, k_rope = rotary(q_rope), rotary(k_rope)         # interleaved pairs
    score_n = (q_nope_n . k_nope_n + q_rope_n . k_rope) * scale
    out     = o_proj(softmax(score) @ v)                    # [N * Dv] -> [M]

``scale = 1 / sqrt(Dn + Dr)``, times ``mscale(factor, yarn_mscale_all_dim)^2`` with YaRN
(:mod:`moe_jax.models.rope`). The rotary embedding rotates the pairs ``(x[2i],
x[2i+1])`` (``mla.rope_interleave=True``, the default: DeepSeek's checkpoints and
Hugging Face's ``rope_interleave``) or the halves (False).

Decoding caches only ``c`` (after its norm) and the rotated ``k_rope``: ``R + Dr``
values per token and layer (plus the slot's i32 position, as attention keeps). Two
paths give the same outputs (tested): expanded (``mla.absorb=False``) up-projects the
cached latents to keys and values at every step; absorbed (the default) folds
``kv_b_proj``'s key half into the query (``q_lat_n = W_k,n q_nope_n``, [N, R]) and its
value half into the output, so attention runs against the latent cache itself and the
cache is never expanded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.layers.experts import scaled_init
from moe_jax.layers.lora_adapters import weight
from moe_jax.layers.protocols import Flops, LoraWeight
from moe_jax.models.attention_kernel import blocked_attention
from moe_jax.models.rope import rope_table, rotary, yarn_mscale

if TYPE_CHECKING:
  from moe_jax.models.model_config import TransformerConfig

# Logical axes (moe_jax/parallel/sharding.py): heads shard over `model`, M over `fsdp`;
# the latent widths ("latent") and per-head widths ("kv") are not split.
MLA_AXES = {
    "q_proj": ("embed", "heads", "kv"), "q_a_proj": ("embed", "latent"),
    "q_b_proj": ("latent", "heads", "kv"),
    "kv_a_proj_with_mqa": ("embed", "latent"), "kv_b_proj": ("latent", "heads", "kv"),
    "o_proj": ("heads", "kv", "embed"),
    "q_a_layernorm": ("norm",), "kv_a_layernorm": ("norm",),
}
_MATRICES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _param(value: jax.Array, name: str) -> nnx.Param:
  return nnx.Param(value, logical_axes=MLA_AXES[name])


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis in float32, times ``scale``; x's dtype."""
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return (h * scale.astype(jnp.float32)).astype(x.dtype)


class MultiHeadLatentAttention(nnx.Module):
  """Multi-head latent attention, a :class:`~moe_jax.models.block.TokenMixer`.

  Parameters (float32; Hugging Face's ``nn.Linear`` weights transposed, heads split):
  ``q_proj [M, N, Dn + Dr]`` when ``q_lora_rank == 0``, else ``q_a_proj [M, Rq]``,
  ``q_a_layernorm [Rq]`` and ``q_b_proj [Rq, N, Dn + Dr]``; ``kv_a_proj_with_mqa
  [M, R + Dr]`` (the latent, then the rotary key); ``kv_a_layernorm [R]``;
  ``kv_b_proj [R, N, Dn + Dv]`` (each head's key, then its value); ``o_proj
  [N, Dv, M]``. Absent ones are None.

  ``mla(x, positions)`` attends over ``x`` (causal by positions, or over the real
  tokens of ``token_mask`` when the model is bidirectional). :meth:`init_cache` and
  :meth:`decode` keep the latent cache ``[B, max_len, R]`` and the rotary keys
  ``[B, max_len, Dr]``.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    m = cfg.mla
    if m is None:
      raise ValueError("model.mixer='mla' needs an MlaConfig in TransformerConfig.mla.")
    n, d_model = cfg.num_heads, cfg.d_model
    dq = m.qk_nope_head_dim + m.qk_rope_head_dim
    in_init = scaled_init(cfg.init_scale, in_axis=0, out_axis=(1, 2))  # [in, N, D]
    flat_init = scaled_init(cfg.init_scale, in_axis=0, out_axis=1)  # [in, out]
    f32 = jnp.float32
    rq = m.q_lora_rank
    self.q_a_proj = (_param(flat_init(rngs.params(), (d_model, rq), f32), "q_a_proj")
                     if rq else None)
    self.q_a_layernorm = _param(jnp.ones((rq,), f32), "q_a_layernorm") if rq else None
    self.q_b_proj = (_param(in_init(rngs.params(), (rq, n, dq), f32), "q_b_proj")
                     if rq else None)
    self.q_proj = (None if rq else
                   _param(in_init(rngs.params(), (d_model, n, dq), f32), "q_proj"))
    self.kv_a_proj_with_mqa = _param(flat_init(
        rngs.params(), (d_model, m.kv_lora_rank + m.qk_rope_head_dim), f32),
        "kv_a_proj_with_mqa")
    self.kv_a_layernorm = _param(jnp.ones((m.kv_lora_rank,), f32), "kv_a_layernorm")
    self.kv_b_proj = _param(in_init(
        rngs.params(), (m.kv_lora_rank, n, m.qk_nope_head_dim + m.v_head_dim), f32),
        "kv_b_proj")
    out_init = scaled_init(cfg.init_scale, in_axis=(0, 1), out_axis=2)
    self.o_proj = _param(out_init(rngs.params(), (n, m.v_head_dim, d_model), f32),
                         "o_proj")

  @property
  def scale(self) -> float:
    """The softmax scale ``1 / sqrt(Dn + Dr)``, times ``mscale(factor,
    yarn_mscale_all_dim)^2`` with YaRN when ``yarn_mscale_all_dim`` is non-zero."""
    cfg, m = self.cfg, self.cfg.mla
    s = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
      s *= yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2
    return s

  def flops_per_token(self, tokens: int) -> Flops:
    """2 x the projection weights (the training forward, keys and values expanded),
    plus ``2 * tokens * N * (Dn + Dr + Dv)`` for the scores and the mixing over a
    context of ``tokens`` (causal masking not discounted, as attention's)."""
    m = self.cfg.mla
    weights = sum(getattr(self, name).size for name in _MATRICES
                  if getattr(self, name) is not None)
    context = 2 * tokens * self.cfg.num_heads * (
        m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return Flops.dense(2 * weights + context)

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """Every projection (target ``attention``): ``o_proj [N, Dv, M]`` contracts two
    axes, the others one."""
    return tuple(LoraWeight("attention", name, in_dims=2 if name == "o_proj" else 1)
                 for name in _MATRICES if getattr(self, name) is not None)

  def _project(self, x: jax.Array, positions: jax.Array):
    """x: [B, L, M] -> q_nope [B, L, N, Dn], q_rope [B, L, N, Dr] (rotated), the
    normed latent c [B, L, R] and the rotated shared key k_rope [B, L, Dr], in the
    compute dtype."""
    cfg, m = self.cfg, self.cfg.mla
    dtype = cfg.compute_dtype
    x = x.astype(dtype)
    if m.q_lora_rank:
      cq = x @ weight(self, "q_a_proj").astype(dtype)
      cq = _rms(cq, self.q_a_layernorm[...], cfg.norm_eps)
      q = jnp.einsum("BLR,RND->BLND", cq, weight(self, "q_b_proj").astype(dtype))
    else:
      q = jnp.einsum("BLM,MND->BLND", x, weight(self, "q_proj").astype(dtype))
    q_nope, q_rope = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
    ckv = x @ weight(self, "kv_a_proj_with_mqa").astype(dtype)  # [B, L, R + Dr]
    c, k_rope = ckv[..., :m.kv_lora_rank], ckv[..., m.kv_lora_rank:]
    c = _rms(c, self.kv_a_layernorm[...], cfg.norm_eps)
    inv_freq, factor = rope_table(cfg, m.qk_rope_head_dim)
    q_rope, k_rope = (rotary(a, positions, cfg.rope_base, inv_freq=inv_freq,
                             attention_factor=factor, interleave=m.rope_interleave)
                      for a in (q_rope, k_rope[:, :, None]))
    return q_nope, q_rope, c, k_rope[:, :, 0]

  def _attend(self, q_nope, q_rope, c, k_rope, allowed: jax.Array) -> jax.Array:
    """Expanded: keys and values up-projected from the latents c [B, K, R].
    q_nope [B, Q, N, Dn], q_rope [B, Q, N, Dr], k_rope [B, K, Dr], allowed
    bool[B or 1, Q, K] -> [B, Q, M]."""
    cfg, m = self.cfg, self.cfg.mla
    dtype = cfg.compute_dtype
    kv = jnp.einsum("BKR,RND->BKND", c.astype(dtype),
                    weight(self, "kv_b_proj").astype(dtype))
    k_nope, v = kv[..., :m.qk_nope_head_dim], kv[..., m.qk_nope_head_dim:]
    scores = (jnp.einsum("BQND,BKND->BNQK", q_nope, k_nope,
                         preferred_element_type=jnp.float32)
              + jnp.einsum("BQND,BKD->BNQK", q_rope, k_rope.astype(dtype),
                           preferred_element_type=jnp.float32)) * self.scale
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # float32 softmax
    h = jnp.einsum("BNQK,BKND->BQND", probs, v)
    return jnp.einsum("BLND,NDM->BLM", h, weight(self, "o_proj").astype(dtype))

  def _attend_absorbed(self, q_nope, q_rope, c, k_rope, allowed: jax.Array
                       ) -> jax.Array:
    """:meth:`_attend` in the latent space: ``q_nope_n . (W_k,n c) = (W_k,n^T q_nope_n)
    . c`` and ``sum_k p_k (W_v,n c_k) = W_v,n (sum_k p_k c_k)``, so the latents
    c [B, K, R] are never expanded to keys or values."""
    cfg, m = self.cfg, self.cfg.mla
    dtype = cfg.compute_dtype
    kv_b = weight(self, "kv_b_proj").astype(dtype)  # [R, N, Dn + Dv]
    w_k, w_v = kv_b[..., :m.qk_nope_head_dim], kv_b[..., m.qk_nope_head_dim:]
    q_lat = jnp.einsum("BQND,RND->BQNR", q_nope, w_k)
    scores = (jnp.einsum("BQNR,BKR->BNQK", q_lat, c.astype(dtype),
                         preferred_element_type=jnp.float32)
              + jnp.einsum("BQND,BKD->BNQK", q_rope, k_rope.astype(dtype),
                           preferred_element_type=jnp.float32)) * self.scale
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    o_lat = jnp.einsum("BNQK,BKR->BQNR", probs, c.astype(dtype))
    h = jnp.einsum("BQNR,RND->BQND", o_lat, w_v)
    return jnp.einsum("BLND,NDM->BLM", h, weight(self, "o_proj").astype(dtype))

  def _attend_blocked(self, q_nope, q_rope, c, k_rope, q_pos, k_pos, *,
                      absorb: bool) -> jax.Array:
    """:meth:`_attend` (or, with ``absorb``, :meth:`_attend_absorbed`) under the
    causal-by-positions mask in tiles (``model.attention_kernel="blocked"``,
    :func:`~moe_jax.models.attention_kernel.blocked_attention`): the no-rope and
    rotary parts of the queries and keys are concatenated, so one dot gives their
    summed scores. Expanded: N heads of ``Dn + Dr`` against keys ``[k_nope, k_rope]``;
    absorbed: one latent key ``[c, k_rope]`` shared by the N heads (G = N), values
    ``c``. q_pos: i32[B or 1, Q]; k_pos: i32[B or 1, K] (-1: empty)."""
    cfg, m = self.cfg, self.cfg.mla
    dtype = cfg.compute_dtype
    kv_b = weight(self, "kv_b_proj").astype(dtype)  # [R, N, Dn + Dv]
    w_k, w_v = kv_b[..., :m.qk_nope_head_dim], kv_b[..., m.qk_nope_head_dim:]
    c, k_rope = c.astype(dtype), k_rope.astype(dtype)
    if absorb:
      q_lat = jnp.einsum("BQND,RND->BQNR", q_nope, w_k)
      q = jnp.concatenate([q_lat, q_rope.astype(dtype)], -1)[:, :, None]  # H=1, G=N
      k = jnp.concatenate([c, k_rope], -1)[:, :, None]
      o_lat = blocked_attention(q, k, c[:, :, None], q_pos, k_pos, scale=self.scale,
                                dtype=dtype, block=cfg.attention_block)[:, :, 0]
      h = jnp.einsum("BQNR,RND->BQND", o_lat, w_v)
    else:
      k_nope = jnp.einsum("BKR,RND->BKND", c, w_k)
      v = jnp.einsum("BKR,RND->BKND", c, w_v)
      q = jnp.concatenate([q_nope, q_rope.astype(dtype)], -1)[:, :, :, None]  # G=1
      k = jnp.concatenate([k_nope, jnp.broadcast_to(
          k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))], -1)
      h = blocked_attention(q, k, v, q_pos, k_pos, scale=self.scale, dtype=dtype,
                            block=cfg.attention_block)[:, :, :, 0]
    return jnp.einsum("BLND,NDM->BLM", h, weight(self, "o_proj").astype(dtype))

  def __call__(self, x: jax.Array, positions: jax.Array,
               token_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, M] -> [B, L, M]; positions: i32[L] or i32[B, L]. Causal by
    positions, or (``cfg.causal=False``) over the real tokens of ``token_mask``, as
    :class:`~moe_jax.models.block.Attention`."""
    q_nope, q_rope, c, k_rope = self._project(x, positions)
    if self.cfg.causal:
      pos = positions if positions.ndim == 2 else positions[None]
      if self.cfg.attention_kernel == "blocked":
        return self._attend_blocked(q_nope, q_rope, c, k_rope, pos, pos, absorb=False)
      allowed = pos[:, None, :] <= pos[:, :, None]  # bool[B or 1, L, L]
    elif token_mask is None:
      allowed = jnp.ones((1, 1, x.shape[1]), jnp.bool_)
    else:
      allowed = token_mask.astype(jnp.bool_)[:, None, :]
    return self._attend(q_nope, q_rope, c, k_rope, allowed)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    """Empty caches: ``cached_latent [B, max_len, R]`` (normed latents),
    ``cached_rope_key [B, max_len, Dr]`` (rotated keys) and ``cached_positions
    i32[B, max_len]`` (-1 while empty, as attention's).

    Raises ConfigError for a bidirectional model, which cannot decode.
    """
    if not self.cfg.causal:
      raise ConfigError([
          "this model attends bidirectionally (model.objective='masked_lm'), so it "
          "cannot generate text one token at a time; sample a causal_lm model."])
    m = self.cfg.mla
    self.cached_latent = nnx.Cache(jnp.zeros((batch, max_len, m.kv_lora_rank), dtype))
    self.cached_rope_key = nnx.Cache(jnp.zeros((batch, max_len, m.qk_rope_head_dim),
                                               dtype))
    self.cached_positions = nnx.Cache(jnp.full((batch, max_len), -1, jnp.int32))

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Writes the new tokens' latents and rotary keys at the slots of their
    positions (padding, ``mask`` False, is not written), then attends over the cache,
    absorbed or expanded as ``mla.absorb`` says. x: [B, L, M]; positions: i32[B, L];
    mask: bool[B, L]. Returns [B, L, M]."""
    if not hasattr(self, "cached_latent"):
      raise ValueError("MultiHeadLatentAttention.decode needs init_cache(batch, max_len, "
                       "dtype) first.")
    q_nope, q_rope, c, k_rope = self._project(x, positions)
    batch, max_len = self.cached_positions.shape
    slot = jnp.where(mask, positions, max_len)  # padding goes out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slot.shape)
    cache_c = self.cached_latent.get_value().at[rows, slot].set(
        c.astype(self.cached_latent.dtype), mode="drop")
    cache_k = self.cached_rope_key.get_value().at[rows, slot].set(
        k_rope.astype(self.cached_rope_key.dtype), mode="drop")
    cache_pos = self.cached_positions.get_value().at[rows, slot].set(
        positions, mode="drop")
    self.cached_latent.set_value(cache_c)
    self.cached_rope_key.set_value(cache_k)
    self.cached_positions.set_value(cache_pos)
    if self.cfg.attention_kernel == "blocked":
      return self._attend_blocked(q_nope, q_rope, cache_c, cache_k, positions, cache_pos,
                                  absorb=self.cfg.mla.absorb)
    allowed = ((cache_pos[:, None, :] >= 0)
               & (cache_pos[:, None, :] <= positions[:, :, None]))  # bool[B, L, T]
    attend = self._attend_absorbed if self.cfg.mla.absorb else self._attend
    return attend(q_nope, q_rope, cache_c, cache_k, allowed)
