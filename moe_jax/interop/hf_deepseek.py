"""DeepSeek-V3's part of the Hugging Face converter: multi-head latent attention, YaRN,
and group-limited sigmoid routing with its selection bias.

The hooks of the ``deepseek_v3`` family in :mod:`moe_jax.interop.hf_families`:
:func:`lm_keys` (``config.json`` -> LM config keys, after the common mapping),
:func:`hf_keys` (its inverse), :func:`mla_tensors` and :func:`router_tensors` (the
tensors on disk of a block's attention and router).

============================  =============================================
Hugging Face                  moe_jax
============================  =============================================
q_lora_rank (null: none)      mla.q_lora_rank (0: ``q_proj``)
kv_lora_rank                  mla.kv_lora_rank
qk_nope_head_dim              mla.qk_nope_head_dim
qk_rope_head_dim              mla.qk_rope_head_dim
v_head_dim                    mla.v_head_dim
rope_interleave (True)        mla.rope_interleave
rope yarn: factor, ...        model.rope_scaling="yarn", model.rope_factor, ...
first_k_dense_replace         model.first_dense_layers
moe_layer_freq                model.moe_every
n_shared_experts              moe.num_shared_experts (no gate)
n_group, topk_group           moe.expert_groups, moe.top_groups
routed_scaling_factor         moe.gate_scale
e_score_correction_bias       the layer's selection bias (moe.bias_update_rate 1e-3)
============================  =============================================
"""

from __future__ import annotations

from typing import Any

from moe_jax.interop.hf_tensors import (IDENTITY, IN_HEADS, OUT_HEADS, TRANSPOSE,
                                        ConversionError, Tensor)

# DeepSeek-V3's gamma, the selection bias's update rate (report, Sec. 2.1.2): the rate
# a converted model fine-tunes with; the forward pass reads only the bias.
BIAS_UPDATE_RATE = 1e-3


def _yarn(h: dict[str, Any]) -> dict[str, Any] | None:
  """The YaRN parameters of ``config.json``: ``rope_parameters`` (transformers 5) or
  ``rope_scaling`` (the hub's), or None without scaling."""
  for key, kind in (("rope_parameters", "rope_type"), ("rope_scaling", "type")):
    params = h.get(key) or {}
    scaling = params.get(kind, params.get("rope_type", "default"))
    if scaling not in ("default", None):
      return dict(params, rope_type=scaling)
  return None


def lm_keys(h: dict[str, Any], c, where: str) -> None:
  """Sets the LM config keys only DeepSeek-V3 has, from its ``config.json``."""
  m, moe, mla = c.model, c.moe, c.mla
  m.mixer = "mla"
  m.num_kv_heads = m.num_heads  # latent attention has no KV heads
  m.head_dim = int(h["qk_rope_head_dim"])  # unused by MLA; an even, valid width
  mla.q_lora_rank = int(h.get("q_lora_rank") or 0)
  mla.kv_lora_rank = int(h["kv_lora_rank"])
  mla.qk_nope_head_dim = int(h["qk_nope_head_dim"])
  mla.qk_rope_head_dim = int(h["qk_rope_head_dim"])
  mla.v_head_dim = int(h["v_head_dim"])
  mla.rope_interleave = bool(h.get("rope_interleave", True))
  yarn = _yarn(h)
  if yarn is not None:
    if yarn["rope_type"] != "yarn":
      raise ConversionError(f"{where}: rotary scaling {yarn['rope_type']!r} is not "
                            "YaRN, which is the one moe_jax implements here.")
    m.rope_scaling = "yarn"
    m.rope_factor = float(yarn["factor"])
    m.rope_original_max_len = int(yarn["original_max_position_embeddings"])
    m.yarn_beta_fast = float(yarn.get("beta_fast", 32.0))
    m.yarn_beta_slow = float(yarn.get("beta_slow", 1.0))
    m.yarn_mscale = float(yarn.get("mscale", 1.0))
    m.yarn_mscale_all_dim = float(yarn.get("mscale_all_dim", 0.0))
  m.first_dense_layers = int(h.get("first_k_dense_replace", 0))
  m.moe_every = int(h.get("moe_layer_freq", 1) or 1)
  m.moe_offset = 0
  moe.num_shared_experts = int(h.get("n_shared_experts") or 0)
  moe.score_fn = "sigmoid"
  moe.expert_groups = int(h.get("n_group") or 1)
  moe.top_groups = int(h.get("topk_group") or 1)
  moe.gate_scale = float(h.get("routed_scaling_factor", 1.0))
  moe.bias_update_rate = BIAS_UPDATE_RATE
  moe.z_loss_coef = 0.0  # a softmax's penalty; V3 has none (and sigmoid refuses it)
  moe.aux_loss_coef = float(h.get("aux_loss_alpha", 1e-4))  # V3's sequence-wise alpha
  m.mtp_depth = int(h.get("num_nextn_predict_layers") or 0)


def hf_keys(config, out: dict[str, Any]) -> None:
  """The inverse of :func:`lm_keys` on ``config.json`` ``out``."""
  m, moe, mla = config.model, config.moe, config.mla
  out.pop("router_aux_loss_coef", None)
  out.update({
      "num_key_value_heads": m.num_heads,
      "head_dim": mla.qk_rope_head_dim,
      "q_lora_rank": mla.q_lora_rank or None,
      "kv_lora_rank": mla.kv_lora_rank,
      "qk_nope_head_dim": mla.qk_nope_head_dim,
      "qk_rope_head_dim": mla.qk_rope_head_dim,
      "v_head_dim": mla.v_head_dim,
      "rope_interleave": bool(mla.rope_interleave),
      "first_k_dense_replace": m.first_dense_layers,
      "moe_layer_freq": m.moe_every,
      "n_shared_experts": moe.num_shared_experts,
      "n_group": moe.expert_groups,
      "topk_group": moe.top_groups or 1,
      "routed_scaling_factor": moe.gate_scale,
      "aux_loss_alpha": moe.aux_loss_coef,
      "num_nextn_predict_layers": m.get("mtp_depth", 0) or 0,
  })
  rope = {"rope_type": "default", "rope_theta": m.rope_base}
  if m.rope_scaling == "yarn":
    rope.update(rope_type="yarn", factor=m.rope_factor,
                original_max_position_embeddings=m.rope_original_max_len,
                beta_fast=m.yarn_beta_fast, beta_slow=m.yarn_beta_slow,
                mscale=m.yarn_mscale, mscale_all_dim=m.yarn_mscale_all_dim)
  out["rope_parameters"] = rope
  out.pop("rope_theta", None)
  out.pop("rope_scaling", None)


def mla_tensors(config, b: tuple, layer: str) -> list[Tensor]:
  """A block's latent attention: moe_jax ``attn/<name>`` <- ``self_attn.<name>``."""
  n = config.model.num_heads
  a = f"{layer}.self_attn"
  out = [Tensor(b + ("attn", "kv_a_proj_with_mqa"), (f"{a}.kv_a_proj_with_mqa.weight",),
                TRANSPOSE),
         Tensor(b + ("attn", "kv_a_layernorm"), (f"{a}.kv_a_layernorm.weight",), IDENTITY),
         Tensor(b + ("attn", "kv_b_proj"), (f"{a}.kv_b_proj.weight",), IN_HEADS, n),
         Tensor(b + ("attn", "o_proj"), (f"{a}.o_proj.weight",), OUT_HEADS, n)]
  if config.mla.q_lora_rank:
    out += [Tensor(b + ("attn", "q_a_proj"), (f"{a}.q_a_proj.weight",), TRANSPOSE),
            Tensor(b + ("attn", "q_a_layernorm"), (f"{a}.q_a_layernorm.weight",)),
            Tensor(b + ("attn", "q_b_proj"), (f"{a}.q_b_proj.weight",), IN_HEADS, n)]
  else:
    out.append(Tensor(b + ("attn", "q_proj"), (f"{a}.q_proj.weight",), IN_HEADS, n))
  return out


def router_tensors(config, b: tuple, moe: str) -> list[Tensor]:
  """The router's selection bias (``e_score_correction_bias``), routing state."""
  del config
  return [Tensor(b + ("ffn", "selection_bias"), (f"{moe}.gate.e_score_correction_bias",))]


def mtp_tensors(config, depth: int, layer: str, block: list[Tensor]) -> list[Tensor]:
  """Multi-token-prediction module ``depth`` (moe_jax ``mtp/<depth>``), stored as block
  ``num_hidden_layers + depth`` (the released checkpoint's ``model.layers.61``): its
  block's tensors, ``enorm``, ``hnorm``, ``eh_proj`` [M, 2M] (embedding half first),
  ``shared_head.norm``, and copies of the shared embedding and output head."""
  del config
  p = ("mtp", depth)
  return block + [
      Tensor(p + ("enorm", "scale"), (f"{layer}.enorm.weight",)),
      Tensor(p + ("hnorm", "scale"), (f"{layer}.hnorm.weight",)),
      Tensor(p + ("eh_proj",), (f"{layer}.eh_proj.weight",), TRANSPOSE),
      Tensor(p + ("norm", "scale"), (f"{layer}.shared_head.norm.weight",)),
      Tensor(("embedding",), (f"{layer}.embed_tokens.weight",), copy=True),
      Tensor(("unembed",), (f"{layer}.shared_head.head.weight",), TRANSPOSE, copy=True)]
