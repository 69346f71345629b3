"""The blocks of the model: norms, attention, the token-mixer registry and the pre-norm
residual :class:`Block`.

:class:`~moe_jax.models.model_config.TransformerConfig` describes the whole model
(:mod:`moe_jax.models.transformer` builds it from these blocks). A block is ``x + mixer(norm(x))``, ``x + ffn(norm(x))``:
the mixer is causal (or, for masked LM, bidirectional) self-attention with its KV cache,
multi-head latent attention (``model.mixer="mla"``, :mod:`moe_jax.models.mla`) or a
Mamba mixer, built from :data:`MIXERS`; the FFN is an
:class:`~moe_jax.layers.moe_layer.MoeLayer` or a
:class:`~moe_jax.layers.experts.DenseFfn`, as the layer pattern says. Mixture-of-Depths'
routed block (:mod:`moe_jax.models.mod`) builds on :class:`Block`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.models.attention_kernel import blocked_attention
from moe_jax.layers.experts import DenseFfn, scaled_init
from moe_jax.models.layer_pattern import ATTENTION, MAMBA, MLA, MOE
from moe_jax.models.mamba import MambaMixer
from moe_jax.layers.moe_layer import MoeAux, MoeLayer
from moe_jax.layers.router_families import TokenContext
from moe_jax.layers.lora_adapters import weight
from moe_jax.layers.protocols import Flops, LoraWeight, param_size
from moe_jax.models.mla import MultiHeadLatentAttention
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.rope import rope_table, rotary

# Logical axis names of the parameters defined in this file (experts.py has the FFNs',
# transformer.py the embeddings').
# Grouped-query attention's key and value kernels have N_kv heads: "kv_heads" shards over
# ``model`` only when N_kv divides by it, and is replicated otherwise (moe_jax/parallel/sharding.py).
ATTENTION_AXES = {"query": ("embed", "heads", "kv"), "key": ("embed", "kv_heads", "kv"),
                  "value": ("embed", "kv_heads", "kv"), "out": ("heads", "kv", "embed")}
NORM_AXES = {"scale": ("norm",), "bias": ("norm",)}
# The optional vectors of attention (model.qkv_bias, model.qk_norm), stored flat as
# Hugging Face stores them ([N * D], [N_kv * D]; [D] for per-head norms): vectors, so
# replicated, kept in float32 and not decayed, like the norms' scales.
ATTENTION_VECTOR_AXES = {name: ("norm",) for name in (
    "query_bias", "key_bias", "value_bias", "query_norm", "key_norm")}

def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(value, logical_axes=axes)


class Norm(nnx.Module):
  """RMSNorm (T5) or LayerNorm over the last axis, computed in float32 (O(M) per
  token: counted as 0 FLOPs, like the biases elsewhere)."""

  def __init__(self, d_model: int, kind: str = "rmsnorm", eps: float = 1e-6):
    self.kind = kind
    self.eps = eps
    self.scale = _param(jnp.ones((d_model,), jnp.float32), NORM_AXES["scale"])
    self.bias = (_param(jnp.zeros((d_model,), jnp.float32), NORM_AXES["bias"])
                 if kind == "layernorm" else None)

  def flops_per_token(self, tokens: int) -> Flops:
    del tokens
    return Flops()

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., M] -> [..., M] in x's dtype."""
    h = x.astype(jnp.float32)
    if self.kind == "layernorm":
      h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    h = h * self.scale[...]
    if self.bias is not None:
      h = h + self.bias[...]
    return h.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, axes: tuple[int, ...]
             ) -> jax.Array:
  """RMSNorm of x over ``axes`` in float32, times ``scale`` (shaped like those axes);
  returns x's dtype."""
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=axes, keepdims=True) + eps)
  return (h * scale.astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head or grouped-query causal self-attention.

  Kernels: query ``[M, N, D]``, key and value ``[M, N_kv, D]``, out ``[N, D, M]``.
  Each group of ``N / N_kv`` consecutive query heads shares one KV head (query head
  ``n`` reads KV head ``n // (N / N_kv)``, as Llama's ``repeat_kv``); the scores are a
  grouped einsum, without repeating K and V. ``N_kv = N`` is multi-head attention.

  Options (Hugging Face families): ``cfg.qkv_bias`` adds biases to the query, key and
  value projections (Qwen2); ``cfg.qk_norm`` RMS-normalises the queries and keys before
  the rotary embedding, over each token's whole projection (``"projection"``, OLMoE:
  scales of ``N * D`` and ``N_kv * D``) or over each head (``"head"``, Qwen3: scales of
  ``D`` shared by the heads).

  ``attn(x, positions)`` attends over ``x`` itself (training, evaluation). For cached
  decoding, :meth:`init_cache` preallocates ``[B, max_len, N_kv, D]`` key and value caches
  (nnx ``Cache`` variables) and :meth:`decode` writes each new token at the slot of
  its position and attends to every cached token at or before it.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    shapes = {"query": (cfg.d_model, cfg.num_heads, cfg.head_dim),
              "key": (cfg.d_model, cfg.num_kv_heads, cfg.head_dim),
              "value": (cfg.d_model, cfg.num_kv_heads, cfg.head_dim)}
    init = scaled_init(cfg.init_scale, in_axis=0, out_axis=(1, 2))
    for name in ("query", "key", "value"):
      setattr(self, name, _param(init(rngs.params(), shapes[name], jnp.float32),
                                 ATTENTION_AXES[name]))
    out_init = scaled_init(cfg.init_scale, in_axis=(0, 1), out_axis=2)
    self.out = _param(out_init(rngs.params(), (cfg.num_heads, cfg.head_dim, cfg.d_model),
                               jnp.float32), ATTENTION_AXES["out"])
    widths = {"query": cfg.num_heads * cfg.head_dim,
              "key": cfg.num_kv_heads * cfg.head_dim,
              "value": cfg.num_kv_heads * cfg.head_dim}
    for name in ("query", "key", "value"):
      setattr(self, f"{name}_bias", _param(
          jnp.zeros((widths[name],), jnp.float32), ATTENTION_VECTOR_AXES[f"{name}_bias"])
              if cfg.qkv_bias else None)
    for name in ("query", "key"):
      width = {"projection": widths[name], "head": cfg.head_dim}.get(cfg.qk_norm)
      setattr(self, f"{name}_norm", _param(
          jnp.ones((width,), jnp.float32), ATTENTION_VECTOR_AXES[f"{name}_norm"])
              if width else None)

  def flops_per_token(self, tokens: int) -> Flops:
    """2 x the projection weights, plus ``4 * tokens * N * D`` for the scores and the
    mixing over a context of ``tokens`` (QK^T and PV for each of the N query heads,
    the Kaplan et al. 2020 convention; causal masking is not discounted; grouped-query
    attention's fewer KV heads shrink the key and value weights, not this term)."""
    width = self.cfg.num_heads * self.cfg.head_dim  # N * D, M by default
    weights = sum(getattr(self, name).size for name in ATTENTION_AXES)  # not the vectors
    return Flops.dense(2 * weights + 4 * tokens * width)

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """query, key, value ``[M, N or N_kv, D]`` and out ``[N, D, M]`` (two input axes)."""
    return (*(LoraWeight("attention", name) for name in ("query", "key", "value")),
            LoraWeight("attention", "out", in_dims=2))

  def _qkv(self, x: jax.Array, positions: jax.Array):
    """x: [B, L, M] -> q: [B, L, N, D], k, v: [B, L, N_kv, D] in the compute dtype,
    biased, normalised and rotated as the config says."""
    cfg = self.cfg
    dtype = cfg.compute_dtype
    x = x.astype(dtype)
    # Einsums, not projection.project: on CPU the 2-D form measured no faster here
    # (docs/benchmarks.md, "The model's own matmuls").
    q, k, v = (jnp.einsum("BLM,MND->BLND", x, weight(self, name).astype(dtype))
               for name in ("query", "key", "value"))
    if cfg.qkv_bias:
      q, k, v = (a + getattr(self, f"{name}_bias")[...].reshape(a.shape[2:]).astype(dtype)
                 for a, name in ((q, "query"), (k, "key"), (v, "value")))
    if cfg.qk_norm != "none":
      axes = (-2, -1) if cfg.qk_norm == "projection" else (-1,)
      q, k = (rms_norm(a, getattr(self, f"{name}_norm")[...].reshape(
          a.shape[-len(axes):]), cfg.norm_eps, axes) for a, name in ((q, "query"),
                                                                      (k, "key")))
    if cfg.position == "rotary":
      inv_freq, factor = rope_table(cfg, cfg.head_dim)  # RoFormer's, or YaRN's
      q, k = (rotary(a, positions, cfg.rope_base, inv_freq=inv_freq,
                     attention_factor=factor) for a in (q, k))
    return q, k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
              allowed: jax.Array) -> jax.Array:
    """q: [B, Q, N, D], k, v: [B, K, N_kv, D], allowed: bool[B or 1, Q, K] -> [B, Q, M]."""
    cfg = self.cfg
    if cfg.kv_groups > 1:
      return self._attend_grouped(q, k, v, allowed)
    dtype = cfg.compute_dtype
    # Softmax in float32 whatever the compute dtype.
    scores = jnp.einsum("BQND,BKND->BNQK", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(cfg.head_dim)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    h = jnp.einsum("BNQK,BKND->BQND", probs, v.astype(dtype))
    return jnp.einsum("BLND,NDM->BLM", h, weight(self, "out").astype(dtype))

  def _attend_grouped(self, q: jax.Array, k: jax.Array, v: jax.Array,
                      allowed: jax.Array) -> jax.Array:
    """:meth:`_attend` for N_kv < N: q's N heads as [N_kv, G] (head n = kv * G + g,
    G = N / N_kv), each group against its one KV head; K and V are never repeated."""
    cfg = self.cfg
    dtype = cfg.compute_dtype
    b, length = q.shape[:2]
    q = q.reshape(b, length, cfg.num_kv_heads, cfg.kv_groups, cfg.head_dim)
    scores = jnp.einsum("BQHGD,BKHD->BHGQK", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(cfg.head_dim)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # float32 softmax, as above
    h = jnp.einsum("BHGQK,BKHD->BQHGD", probs, v.astype(dtype)).reshape(
        b, length, cfg.num_heads, cfg.head_dim)
    return jnp.einsum("BLND,NDM->BLM", h, weight(self, "out").astype(dtype))

  def _attend_blocked(self, q: jax.Array, k: jax.Array, v: jax.Array,
                      q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """:meth:`_attend` under the causal-by-positions mask in tiles
    (:func:`~moe_jax.models.attention_kernel.blocked_attention`, ``model.attention_kernel
    ="blocked"``): q: [B, Q, N, D], k, v: [B, K, N_kv, D], q_pos: i32[B or 1, Q],
    k_pos: i32[B or 1, K] (-1: empty) -> [B, Q, M]."""
    cfg = self.cfg
    dtype = cfg.compute_dtype
    b, length = q.shape[:2]
    q = q.reshape(b, length, cfg.num_kv_heads, cfg.kv_groups, cfg.head_dim)
    h = blocked_attention(q, k, v, q_pos, k_pos,
                          scale=1 / math.sqrt(cfg.head_dim), dtype=dtype,
                          block=cfg.attention_block).reshape(
                              b, length, cfg.num_heads, cfg.head_dim)
    return jnp.einsum("BLND,NDM->BLM", h, weight(self, "out").astype(dtype))

  def __call__(self, x: jax.Array, positions: jax.Array,
               token_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, M] -> [B, L, M]; positions: i32[L], or i32[B, L] per row.

    Causal by positions: a token attends to the tokens at or before its position
    (``tril`` for ``arange(L)``; a Mixture-of-Depths block's gathered tokens keep
    their original positions, in order); trailing padding then cannot reach a real
    token, and ``token_mask`` is not needed. Bidirectional (``cfg.causal=False``):
    a token attends to every token of its row that ``token_mask`` (bool[B, L], None:
    all) marks real.
    """
    q, k, v = self._qkv(x, positions)
    if self.cfg.causal:
      pos = positions if positions.ndim == 2 else positions[None]
      if self.cfg.attention_kernel == "blocked":
        return self._attend_blocked(q, k, v, pos, pos)
      allowed = pos[:, None, :] <= pos[:, :, None]  # bool[B or 1, L, L]
    elif token_mask is None:
      allowed = jnp.ones((1, 1, x.shape[1]), jnp.bool_)  # bool[1, 1, L]
    else:
      allowed = token_mask.astype(jnp.bool_)[:, None, :]  # bool[B, 1, L]: keys
    return self._attend(q, k, v, allowed)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    """Empty caches for ``batch`` rows of up to ``max_len`` tokens.

    ``cached_positions`` i32[B, max_len] holds the position of the token in each slot,
    -1 while empty, so a block that lets a token skip it (Mixture-of-Depths) simply
    writes nothing there and later tokens cannot attend to it.

    Raises ConfigError for bidirectional attention, which cannot decode.
    """
    if not self.cfg.causal:
      raise ConfigError([
          "this model attends bidirectionally (model.objective='masked_lm'), so it "
          "cannot generate text one token at a time; sample a causal_lm model."])
    shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)  # KV heads only
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_positions = nnx.Cache(jnp.full((batch, max_len), -1, jnp.int32))

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Writes the new tokens' keys and values, then attends over the cache.

    x: [B, L, M] new tokens (L = the prefill length, or 1 at a step); positions:
    i32[B, L], each row's own; mask: bool[B, L], False for padding, which is not
    written. Slot = position, so left and right padding give the same cache.
    Returns [B, L, M].
    """
    if not hasattr(self, "cached_key"):
      raise ValueError("Attention.decode needs init_cache(batch, max_len, dtype) first.")
    q, k, v = self._qkv(x, positions)
    batch, max_len = self.cached_positions.shape
    slot = jnp.where(mask, positions, max_len)  # padding goes out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slot.shape)
    cache_k = self.cached_key.get_value().at[rows, slot].set(
        k.astype(self.cached_key.dtype), mode="drop")
    cache_v = self.cached_value.get_value().at[rows, slot].set(
        v.astype(self.cached_value.dtype), mode="drop")
    cache_pos = self.cached_positions.get_value().at[rows, slot].set(
        positions, mode="drop")
    self.cached_key.set_value(cache_k)
    self.cached_value.set_value(cache_v)
    self.cached_positions.set_value(cache_pos)
    if self.cfg.attention_kernel == "blocked":
      return self._attend_blocked(q, cache_k, cache_v, positions, cache_pos)
    allowed = ((cache_pos[:, None, :] >= 0)
               & (cache_pos[:, None, :] <= positions[:, :, None]))  # bool[B, L, T]
    return self._attend(q, cache_k, cache_v, allowed)


class TokenMixer(Protocol):
  """What a block's token mixer implements (attention, MLA, Mamba): training, and the
  decode interface of :mod:`moe_jax.inference.decode` (its own state as nnx ``Cache``)."""

  def __call__(self, x: jax.Array, positions: jax.Array,
               token_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, M] at i32[L] (or per-row i32[B, L], in order) positions -> [B, L, M],
    causal unless the model is bidirectional; ``token_mask`` (bool[B, L]) marks the
    real tokens, which a bidirectional mixer must keep padding away from."""

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    """Preallocates the decode state, batch as the leading axis of every array."""

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, M] new tokens at i32[B, L] positions, bool[B, L] real -> [B, L, M];
    padding leaves the state as it was."""


class MixerKind(NamedTuple):
  """A registered token mixer: the block attribute it lives under (``attr``, and
  ``attr + "_norm"`` for its pre-norm, which are the parameter paths of checkpoints)
  and how to build it from the model config."""

  attr: str
  build: Callable[[TransformerConfig, nnx.Rngs], TokenMixer]


# The layer pattern's mixer names -> modules. A new mixer is one entry here.
MIXERS: dict[str, MixerKind] = {
    ATTENTION: MixerKind("attn", lambda cfg, rngs: Attention(cfg, rngs=rngs)),
    MAMBA: MixerKind("mamba", lambda cfg, rngs: MambaMixer(
        cfg.mamba, dtype=cfg.compute_dtype, rngs=rngs)),
    # Multi-head latent attention: what the pattern's attention blocks become with
    # model.mixer="mla"; under "attn", so the block's paths stay attn_norm / attn.
    MLA: MixerKind("attn", lambda cfg, rngs: MultiHeadLatentAttention(cfg, rngs=rngs)),
}


@flax.struct.dataclass
class BlockAux:
  """What a block reports beside its output.

  Attributes:
    moe: its MoE layer's :class:`~moe_jax.layers.moe_layer.MoeAux`, or None (dense FFN).
    depth: a Mixture-of-Depths routed block's :class:`~moe_jax.models.mod.DepthAux`, or
      None (a full block).
  """

  moe: MoeAux | None = None
  depth: Any = None


class Block(nnx.Module):
  """Pre-norm block: ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``.

  The mixer (attention or Mamba, from :data:`MIXERS`) and the FFN (dense or MoE) are
  the layer pattern's entry for ``index``; the pattern's attention blocks build
  ``cfg.mixer`` ("attention" or "mla"). An attention block keeps the parameter
  names ``attn_norm``/``attn`` of the all-attention model (with MLA too); a Mamba
  block has ``mamba_norm``/``mamba``.
  """

  def __init__(self, cfg: TransformerConfig, index: int, *, rngs: nnx.Rngs):
    self.index = index
    kind = cfg.layers[index]
    # The pattern's attention blocks mix with model.mixer ("attention" or "mla").
    self.mixer_kind = cfg.mixer if kind.mixer == ATTENTION else kind.mixer
    self.mixer_attr = MIXERS[self.mixer_kind].attr
    setattr(self, f"{self.mixer_attr}_norm", Norm(cfg.d_model, cfg.norm, cfg.norm_eps))
    setattr(self, self.mixer_attr, MIXERS[self.mixer_kind].build(cfg, rngs))
    self.ffn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.is_moe = kind.ffn == MOE
    if self.is_moe:
      self.ffn = MoeLayer(cfg.moe, rngs=rngs)
    else:
      self.ffn = DenseFfn(cfg.d_model, cfg.d_ff, activation=cfg.activation,
                          init_scale=cfg.init_scale, dtype=cfg.compute_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, *, deterministic: bool,
               token_mask: jax.Array | None = None,
               use_predictor: bool = False,
               context: TokenContext | None = None) -> tuple[jax.Array, BlockAux]:
    """x: [B, L, M] -> ([B, L, M], BlockAux); token_mask: bool[B, L] or None.

    ``use_predictor`` is for Mixture-of-Depths routed blocks (sampling without a
    cache); a full block runs every token either way. ``context`` (the model input's
    :class:`~moe_jax.layers.router_families.TokenContext`) goes to the MoE layer.
    """
    del use_predictor
    h, y, aux = self.branches(x, positions, deterministic=deterministic,
                              token_mask=token_mask, context=context)
    return (x + h) + y, BlockAux(moe=aux)

  def branches(self, x: jax.Array, positions: jax.Array, *, deterministic: bool,
               token_mask: jax.Array | None = None,
               context: TokenContext | None = None
               ) -> tuple[jax.Array, jax.Array, MoeAux | None]:
    """The two residual branches, ``h = mixer(norm(x))`` and ``y = ffn(norm(x + h))``
    (dropout on both, in x's dtype), and the MoE layer's aux: the block is ``x + h +
    y``, and its residual delta ``f(x) = h + y``."""
    h = self.dropout(self.mixer(self.mixer_norm(x), positions, token_mask),
                     deterministic=deterministic).astype(x.dtype)
    y = self.ffn_norm(x + h)
    aux = None
    if self.is_moe:
      y, aux = self.ffn(y, deterministic=deterministic, token_mask=token_mask,
                        context=context)
    else:
      y = self.ffn(y, deterministic=deterministic)
    return h, self.dropout(y, deterministic=deterministic).astype(x.dtype), aux

  def tokens_run(self, seq_len: int, child: str) -> int:
    """Tokens of a ``seq_len`` sequence that the block passes to its ``child`` module
    (all of them; :func:`moe_jax.models.sizes.flops_per_token` asks)."""
    del child
    return seq_len

  @property
  def mixer(self) -> TokenMixer:
    return getattr(self, self.mixer_attr)

  @property
  def mixer_norm(self) -> Norm:
    return getattr(self, f"{self.mixer_attr}_norm")

  # The decode-state interface of moe_jax.inference.decode: every block type owns its
  # state.

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    """Preallocates this block's decode state (the mixer's: attention's KV cache,
    Mamba's conv and SSM states).

    Raises ConfigError if the block cannot decode causally (a non-causal router).
    """
    if self.is_moe and not self.ffn.is_causal:
      raise ConfigError([
          f"block {self.index}: this MoE router is not causal (a token's routing "
          "depends on later tokens: expert choice, batch_priority, or choice-major "
          "queues with top_k > 1 and a capacity), so it cannot decode one token at a "
          "time; decode with a token-choice router with token-major queues and no "
          "batch priority."])
    self.mixer.init_cache(batch, max_len, dtype)

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
             prefill: bool, context: TokenContext | None = None) -> jax.Array:
    """x: [B, L, M] new tokens at i32[B, L] positions, bool[B, L] real -> [B, L, M].

    MoE routing at decode drops no token for capacity at a step, and uses the
    evaluation capacity at prefill (:meth:`MoeLayer.decode`). ``context`` is the new
    tokens' :class:`~moe_jax.layers.router_families.TokenContext`.
    """
    h, y = self.decode_branches(x, positions, mask, prefill=prefill, context=context)
    return (x + h) + y

  def decode_branches(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
                      prefill: bool, context: TokenContext | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """:meth:`branches` against the decode state; tokens where ``mask`` is False
    write no state (and their branches are to be thrown away)."""
    h = self.mixer.decode(self.mixer_norm(x), positions, mask).astype(x.dtype)
    y = self.ffn_norm(x + h)
    if self.is_moe:
      y = self.ffn.decode(y, mask, prefill=prefill, context=context)
    else:
      y = self.ffn(y, deterministic=True)
    return h, y.astype(x.dtype)
