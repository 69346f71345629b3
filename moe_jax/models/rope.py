"""Rotary position embeddings (RoFormer) and their YaRN scaling (Peng et al. 2023).

:func:`rotary` rotates the last axis of queries or keys by position. Its frequencies are
RoFormer's ``base ** (-i / (D / 2))`` unless the model sets ``model.rope_scaling="yarn"``,
which swaps in :func:`yarn_inv_freq`'s table and scales the rotated values by
:func:`yarn_attention_factor` (Hugging Face's ``attention_scaling`` on cos and sin), as
DeepSeek-V3 uses it (``rope_scaling={"type": "yarn", "factor": 40,
"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1,
"mscale_all_dim": 1}``). The model keys (:class:`~moe_jax.models.model_config.
TransformerConfig`): ``rope_scaling``, ``rope_factor``, ``rope_original_max_len``,
``yarn_beta_fast``, ``yarn_beta_slow``, ``yarn_mscale``, ``yarn_mscale_all_dim``.

YaRN, for a rotary width D (Hugging Face ``_compute_yarn_parameters``, truncating)::

    extrapolated_i = base ** (-2i / D)                 i = 0 .. D/2 - 1
    interpolated_i = extrapolated_i / factor
    low  = max(floor(corr(beta_fast)), 0),  high = min(ceil(corr(beta_slow)), D - 1)
    corr(b) = D * ln(original_max_len / (2 pi b)) / (2 ln base)
    ramp_i = clip((i - low) / (high - low), 0, 1)      (high += 0.001 when equal)
    inv_freq_i = interpolated_i * ramp_i + extrapolated_i * (1 - ramp_i)

so the fast dimensions (many turns within the original context) keep their frequencies
and the slow ones are divided by ``factor``. ``mscale(s, m) = 0.1 m ln(s) + 1`` (1 for
s <= 1); the rotated values are scaled by ``mscale(factor, yarn_mscale) /
mscale(factor, yarn_mscale_all_dim)`` when both are non-zero, else by
``mscale(factor)``; multi-head latent attention (:mod:`moe_jax.models.mla`)
additionally multiplies its softmax scale by ``mscale(factor, yarn_mscale_all_dim)^2``
when ``yarn_mscale_all_dim`` is non-zero (``DeepseekV3Attention``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# model.rope_scaling: "none" (RoFormer's frequencies) or "yarn".
ROPE_SCALINGS = ("none", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """``0.1 * mscale * ln(scale) + 1``, or 1 when ``scale <= 1`` (YaRN's magnitude
  correction; Hugging Face ``yarn_get_mscale``)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_len: int,
                  beta_fast: float, beta_slow: float) -> np.ndarray:
  """YaRN's f32[dim / 2] inverse frequencies (the module docstring's formula)."""
  def corr(rotations: float) -> float:
    return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(corr(beta_fast)), 0)
  high = min(math.ceil(corr(beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  i = np.arange(dim // 2, dtype=np.float64)
  ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
  extrapolated = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  interpolated = extrapolated / factor
  return (interpolated * ramp + extrapolated * (1.0 - ramp)).astype(np.float32)


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
  """What YaRN multiplies the rotated queries and keys by (Hugging Face's
  ``attention_factor``): ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when
  both are non-zero, else ``mscale(factor)``."""
  if mscale and mscale_all_dim:
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
  return yarn_mscale(factor)


def rope_table(cfg, dim: int) -> tuple[np.ndarray | None, float]:
  """``(inv_freq, attention_factor)`` of a rotary width ``dim`` under the model config
  ``cfg`` (a :class:`~moe_jax.models.model_config.TransformerConfig`): ``(None, 1.0)``
  without scaling (:func:`rotary` then computes RoFormer's frequencies itself, as it
  always has), YaRN's table and factor with ``cfg.rope_scaling="yarn"``."""
  if getattr(cfg, "rope_scaling", "none") != "yarn":
    return None, 1.0
  inv_freq = yarn_inv_freq(dim, cfg.rope_base, cfg.rope_factor, cfg.rope_original_max_len,
                           cfg.yarn_beta_fast, cfg.yarn_beta_slow)
  return inv_freq, yarn_attention_factor(cfg.rope_factor, cfg.yarn_mscale,
                                         cfg.yarn_mscale_all_dim)


def rotary(x: jax.Array, positions: jax.Array, base: float, *,
           inv_freq: np.ndarray | None = None, attention_factor: float = 1.0,
           interleave: bool = False) -> jax.Array:
  """RoFormer rotary embedding (rotate-half form).

  x: [B, L, N, D]; positions: i32[L] (shared by the rows) or i32[B, L] (per row).
  ``inv_freq`` (f32[D/2]) replaces ``base ** (-i / (D/2))`` (YaRN, :func:`rope_table`),
  and the result is multiplied by ``attention_factor`` when it is not 1.
  ``interleave``: the rotated pairs are ``(x[2i], x[2i+1])`` (GPT-J, DeepSeek's
  checkpoints): x's last axis is first reordered to ``[x[0::2], x[1::2]]`` and the
  result stays in that order, as Hugging Face's ``apply_rotary_pos_emb_interleave``
  leaves it (queries and keys share the order, so their products are unchanged).
  """
  half = x.shape[-1] // 2
  if interleave:
    x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
  if inv_freq is None:
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # f32[D/2]
  else:
    freq = jnp.asarray(inv_freq, jnp.float32)
  angle = positions.astype(jnp.float32)[..., None] * freq  # f32[(B,) L, D/2]
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]  # [(B,) L, 1, D/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  if attention_factor != 1.0:
    out = out * attention_factor
  return out.astype(x.dtype)
