"""Multi-head latent attention's config, :class:`MlaConfig` (the LM config's ``mla``
keys), and its checks; :mod:`moe_jax.models.mla` builds the mixer from it."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class MlaConfig:
  """Hyper-parameters of multi-head latent attention (the LM config's ``mla`` keys;
  used when ``model.mixer="mla"``). The heads are ``model.num_heads``; the norms' eps
  is ``model.norm_eps``; the rotary base and YaRN keys are the model's.

  Attributes:
    q_lora_rank: Rq, the compressed query's width; 0: no compression (``q_proj``).
      DeepSeek-V3: 1536.
    kv_lora_rank: R, the cached key/value latent's width (DeepSeek-V3: 512).
    qk_nope_head_dim: Dn, each head's query/key width without rotary (128).
    qk_rope_head_dim: Dr, the rotary width of each query head and of the one shared
      rotary key; even (64).
    v_head_dim: Dv, each head's value width (128).
    rope_interleave: rotate the pairs ``(x[2i], x[2i+1])`` (DeepSeek's checkpoints,
      Hugging Face's default) rather than the halves.
    absorb: decode in the latent space (``kv_b_proj`` folded into the query and the
      output) rather than expanding the cached latents each step; same outputs.
  """

  q_lora_rank: int = 0
  kv_lora_rank: int = 128
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 32
  v_head_dim: int = 64
  rope_interleave: bool = True
  absorb: bool = True


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate_mla_config(cfg) -> list[str]:
  """Every problem with ``cfg``'s MLA keys, one line each as ``key=value ...``
  (the LM config puts ``mla.`` before them)."""
  errors = []

  def need(name: str, ok: bool, fix: str):
    if not ok:
      errors.append(f"{name}={getattr(cfg, name)!r} {fix}")

  need("q_lora_rank", _is_int(cfg.q_lora_rank) and cfg.q_lora_rank >= 0,
       "must be an integer >= 0 (0: no query compression; DeepSeek-V3: 1536).")
  need("kv_lora_rank", _is_int(cfg.kv_lora_rank) and cfg.kv_lora_rank >= 1,
       "must be a positive integer, the cached latent's width (DeepSeek-V3: 512).")
  need("qk_nope_head_dim", _is_int(cfg.qk_nope_head_dim) and cfg.qk_nope_head_dim >= 0,
       "must be an integer >= 0 (DeepSeek-V3: 128).")
  rope = cfg.qk_rope_head_dim
  need("qk_rope_head_dim", _is_int(rope) and rope >= 2 and rope % 2 == 0,
       "must be an even integer >= 2, the rotary width (DeepSeek-V3: 64).")
  need("v_head_dim", _is_int(cfg.v_head_dim) and cfg.v_head_dim >= 1,
       "must be a positive integer (DeepSeek-V3: 128).")
  for name in ("rope_interleave", "absorb"):
    need(name, getattr(cfg, name) is True or getattr(cfg, name) is False,
         "must be True or False.")
  return errors
