"""The Hugging Face MoE families moe_jax converts: how each one's ``config.json`` maps to
an LM config and back, and which tensor on disk each moe_jax parameter is.

A family is data (:class:`Family`), registered in :data:`FAMILIES` by its
``model_type``; :mod:`moe_jax.interop.hf` reads and writes the files. Every family here
is a pre-norm decoder with RMSNorm, rotary positions (``rope_theta``), grouped-query
attention, SwiGLU experts and a float32 softmax top-k router:

============  =================  ==========  =========  =====================================
family        experts            q/k norm    q/k/v bias  other
============  =================  ==========  =========  =====================================
mixtral       ``w1, w3, w2``     none        no         gates renormalised over the top k
olmoe         ``gate/up/down``   projection  no         ``norm_topk_prob`` (False)
qwen2_moe     ``gate/up/down``   none        yes        gated shared expert, dense blocks
qwen3_moe     ``gate/up/down``   head        no         ``head_dim``, dense blocks
============  =================  ==========  =========  =====================================

Layouts: Hugging Face ``nn.Linear`` weights are ``[out, in]``; moe_jax's kernels are
``[in, out]``, attention's split by head (query ``[M, N, D]``, out ``[N, D, M]``) and the
experts' stacked (``[E, M, H]``). :class:`Tensor` records the one transform between the
two, so reading and writing are the same table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from moe_jax.interop import hf_deepseek
from moe_jax.interop.hf_tensors import (IDENTITY, IN_HEADS, OUT_HEADS, ROW, TRANSPOSE,
                                        ConversionError, Tensor)

@dataclasses.dataclass(frozen=True)
class Family:
  """A Hugging Face MoE family.

  Attributes:
    model_type: ``config.json``'s ``model_type``.
    architecture: its ``architectures[0]`` (the causal-LM class).
    experts_key: the config keys of the number of routed experts: the first is
      written, any is read (transformers 5 renamed Qwen3-MoE's ``num_experts`` to
      ``num_local_experts``; checkpoints on the hub carry the old name).
    expert_width_key: the key of each expert's hidden width.
    dense_width_key: the key of the dense blocks' hidden width, or None when every
      block is MoE.
    norm_topk_key: the key of ``norm_topk_prob``, or None when the gates are always
      renormalised (Mixtral); ``norm_topk_default`` is its value when absent.
    sparse_layout: the family has ``decoder_sparse_step`` and ``mlp_only_layers``.
    qk_norm: ``model.qk_norm`` of the family ("none", "projection", "head").
    qkv_bias: the query, key and value projections have biases.
    shared_expert: a sigmoid-gated shared expert (``shared_expert_intermediate_size``).
    moe_prefix: the MoE block's module name under a layer (``block_sparse_moe`` / ``mlp``).
    expert_names: the names of the gate, up and down projections of an expert.
    z_loss_key: the config key of the router z-loss coefficient, if any.
    refused: ``(key, allowed values, why)`` of config values this converter cannot
      express; a value outside ``allowed`` is refused with one line.
    extra: keys written to ``config.json`` on export as they are.
    shared_prefix: the shared experts' module name under the MoE block.
    shared_gated: the shared experts have Qwen2-MoE's sigmoid gate.
    config_hook: ``(hf_config, lm_config, where)``, run after the common mapping, for
      what only this family has (DeepSeek-V3: latent attention, YaRN, group-limited
      sigmoid routing); ``hf_config_hook`` ``(lm_config, out)`` is its inverse.
    attention_tensors: ``(config, block, layer name) -> [Tensor]`` of a block's
      mixer, when it is not the grouped-query attention of the others.
    router_tensors: ``(config, block, moe name) -> [Tensor]`` of a block's router
      beyond its kernel (DeepSeek-V3's selection bias).
    mtp_tensors: ``(config, depth, layer name, block tensors) -> [Tensor]`` of a
      multi-token-prediction module, stored as block ``num_hidden_layers + depth``.
  """

  model_type: str
  architecture: str
  experts_key: tuple[str, ...]
  expert_width_key: str
  dense_width_key: str | None
  norm_topk_key: str | None
  norm_topk_default: bool
  sparse_layout: bool
  qk_norm: str
  qkv_bias: bool
  shared_expert: bool
  moe_prefix: str
  expert_names: tuple[str, str, str]
  z_loss_key: str | None = None
  refused: tuple[tuple[str, tuple, str], ...] = ()
  extra: dict = dataclasses.field(default_factory=dict)
  shared_prefix: str = "shared_expert"
  shared_gated: bool = True
  config_hook: Callable | None = None
  hf_config_hook: Callable | None = None
  attention_tensors: Callable | None = None
  router_tensors: Callable | None = None
  mtp_tensors: Callable | None = None


_COMMON_REFUSED = (
    ("tie_word_embeddings", (False, None), "tied input and output embeddings"),
    ("hidden_act", ("silu", None), "an activation other than SiLU (SwiGLU experts)"),
    ("rope_scaling", (None,), "rotary scaling (YaRN, linear, dynamic)"),
    ("attention_bias", (False, None), "an attention output bias"),
)

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        model_type="mixtral", architecture="MixtralForCausalLM",
        experts_key=("num_local_experts",), expert_width_key="intermediate_size",
        dense_width_key=None, norm_topk_key=None, norm_topk_default=True,
        sparse_layout=False, qk_norm="none", qkv_bias=False, shared_expert=False,
        moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
        refused=_COMMON_REFUSED + (
            ("sliding_window", (None,), "sliding-window attention"),),
        extra={"sliding_window": None}),
    "olmoe": Family(
        model_type="olmoe", architecture="OlmoeForCausalLM",
        experts_key=("num_experts",), expert_width_key="intermediate_size",
        dense_width_key=None, norm_topk_key="norm_topk_prob", norm_topk_default=False,
        sparse_layout=False, qk_norm="projection", qkv_bias=False,
        shared_expert=False, moe_prefix="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        z_loss_key="router_z_loss_coef",
        refused=_COMMON_REFUSED + (("clip_qkv", (None,), "clipped q/k/v"),),
        extra={"clip_qkv": None, "attention_bias": False}),
    "qwen2_moe": Family(
        model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM",
        experts_key=("num_experts",), expert_width_key="moe_intermediate_size",
        dense_width_key="intermediate_size", norm_topk_key="norm_topk_prob",
        norm_topk_default=False, sparse_layout=True, qk_norm="none", qkv_bias=True,
        shared_expert=True, moe_prefix="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        refused=_COMMON_REFUSED[:3] + (
            ("use_sliding_window", (False, None), "sliding-window attention"),),
        extra={"use_sliding_window": False}),
    "qwen3_moe": Family(
        model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
        experts_key=("num_local_experts", "num_experts"), expert_width_key="moe_intermediate_size",
        dense_width_key="intermediate_size", norm_topk_key="norm_topk_prob",
        norm_topk_default=False, sparse_layout=True, qk_norm="head", qkv_bias=False,
        shared_expert=False, moe_prefix="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        refused=_COMMON_REFUSED + (
            ("use_sliding_window", (False, None), "sliding-window attention"),),
        extra={"use_sliding_window": False, "attention_bias": False}),
    "deepseek_v3": Family(
        model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
        experts_key=("n_routed_experts",), expert_width_key="moe_intermediate_size",
        dense_width_key="intermediate_size", norm_topk_key="norm_topk_prob",
        norm_topk_default=True, sparse_layout=False, qk_norm="none", qkv_bias=False,
        shared_expert=True, moe_prefix="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        refused=_COMMON_REFUSED[:2] + (
            ("attention_bias", (False, None), "an attention output bias"),
            ("quantization_config", (None,), "FP8 block-scaled weights (dequantise them "
             "to bfloat16 first, e.g. with DeepSeek's fp8_cast_bf16.py)"),
            ("topk_method", ("noaux_tc", None), "a routing method other than V3's"),
            ("scoring_func", ("sigmoid", None), "scores other than sigmoid")),
        shared_prefix="shared_experts", shared_gated=False,
        config_hook=hf_deepseek.lm_keys, hf_config_hook=hf_deepseek.hf_keys,
        attention_tensors=hf_deepseek.mla_tensors,
        router_tensors=hf_deepseek.router_tensors, mtp_tensors=hf_deepseek.mtp_tensors,
        extra={"attention_bias": False, "topk_method": "noaux_tc",
               "scoring_func": "sigmoid"}),
}


def family_of(hf_config: dict[str, Any], where: str) -> Family:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ConversionError(
        f"{where}: model_type={model_type!r} is not a family moe_jax converts; use one "
        f"of {', '.join(FAMILIES)}.")
  return FAMILIES[model_type]


def rope_theta(hf_config: dict[str, Any]) -> float:
  """``rope_theta``, top level (transformers 4) or in ``rope_parameters`` (5)."""
  params = hf_config.get("rope_parameters") or {}
  if "rope_theta" in hf_config:
    return float(hf_config["rope_theta"])
  return float(params.get("rope_theta", 10000.0))


def _refusals(family: Family, hf_config: dict[str, Any], where: str) -> None:
  for key, allowed, what in family.refused:
    if hf_config.get(key) not in allowed:
      raise ConversionError(
          f"{where}: {key}={hf_config.get(key)!r} asks for {what}, which moe_jax does "
          f"not implement for {family.model_type}; only {allowed[0]!r} converts.")
  rope = hf_config.get("rope_parameters") or {}
  if family.config_hook is None and rope.get("rope_type", "default") != "default":
    raise ConversionError(
        f"{where}: rope_parameters.rope_type={rope.get('rope_type')!r} asks for rotary "
        "scaling, which moe_jax does not implement here; only 'default' converts.")


def lm_config(hf_config: dict[str, Any], *, dtype: str = "float32",
              where: str = "config.json") -> ml_collections.ConfigDict:
  """The moe_jax LM config of a Hugging Face ``config.json`` (a dict).

  The model keys reproduce the family's forward pass exactly; routing is dropless
  (``moe.dispatch="dropless"``, one group per sequence), so no token is dropped, as in
  the reference. The training keys (balance loss, z-loss) take the checkpoint's
  coefficients where it states them. ``data.vocab_size`` is the checkpoint's
  vocabulary; ``data.seq_len`` is its ``max_position_embeddings`` (the context; set a
  shorter ``data.seq_len`` to fine-tune on shorter windows).

  Raises:
    ConversionError: an unknown family or an option moe_jax cannot express.
  """
  family = family_of(hf_config, where)
  _refusals(family, hf_config, where)
  try:
    return _lm_config(hf_config, family, dtype, where)
  except KeyError as e:
    raise ConversionError(f"{where}: no {e.args[0]!r}, which a {family.model_type} "
                          "config.json must have.") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{where}: a value of the wrong type ({e}).") from None


def _lm_config(h: dict[str, Any], family: Family, dtype: str,
               where: str) -> ml_collections.ConfigDict:
  from moe_jax.training.config import default_config  # pylint: disable=import-outside-toplevel
  c = default_config()
  m = c.model
  m.num_layers = int(h["num_hidden_layers"])
  m.d_model = int(h["hidden_size"])
  m.num_heads = int(h["num_attention_heads"])
  m.num_kv_heads = int(h.get("num_key_value_heads") or h["num_attention_heads"])
  m.head_dim = int(h.get("head_dim") or m.d_model // m.num_heads)
  m.d_ff = int(h[family.dense_width_key] if family.dense_width_key
               else h[family.expert_width_key])
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.norm_eps = float(h.get("rms_norm_eps", 1e-6))
  m.position = "rotary"
  m.rope_base = rope_theta(h)
  m.tie_embeddings = False
  m.qk_norm = family.qk_norm
  m.qkv_bias = family.qkv_bias
  m.dtype = dtype
  m.param_dtype = dtype
  m.dropout = 0.0
  m.moe_every = 1
  m.moe_offset = None
  if family.sparse_layout:
    m.moe_every = int(h.get("decoder_sparse_step", 1) or 1)
    m.dense_layers = tuple(int(i) for i in h.get("mlp_only_layers") or ())
  c.data.vocab_size = int(h["vocab_size"])
  c.data.seq_len = int(h.get("max_position_embeddings", 4096))
  moe = c.moe
  key = next((k for k in family.experts_key if k in h), None)
  if key is None:
    raise ConversionError(f"{where}: no {' or '.join(family.experts_key)}; a "
                          f"{family.model_type} config.json names its expert count.")
  moe.num_experts = int(h[key])
  moe.top_k = int(h["num_experts_per_tok"])
  moe.d_ff = int(h[family.expert_width_key])
  moe.router = "topk"
  moe.score_fn = "softmax"
  moe.second_policy = "all"
  moe.normalize_gates = bool(h.get(family.norm_topk_key, family.norm_topk_default)
                             if family.norm_topk_key else True)
  moe.dispatch = "dropless"
  moe.group_size = 0
  moe.jitter_noise = 0.0
  moe.expert_dropout = 0.0
  # Hugging Face's balance loss counts all k choices and sums over them: moe_jax's
  # with balance_choices="all" is that loss divided by k (docs/routing.md).
  moe.balance_choices = "all"
  if "router_aux_loss_coef" in h:
    moe.aux_loss_coef = float(h["router_aux_loss_coef"]) * moe.top_k
  moe.z_loss_coef = float(h.get(family.z_loss_key, 0.0)) if family.z_loss_key else 0.0
  if family.shared_expert and family.shared_gated:
    width, expert = int(h["shared_expert_intermediate_size"]), moe.d_ff
    if width % expert:
      raise ConversionError(
          f"{where}: shared_expert_intermediate_size={width} is not a multiple of "
          f"moe_intermediate_size={expert}; moe_jax's shared experts are "
          "num_shared_experts x the expert width.")
    moe.num_shared_experts = width // expert
    moe.shared_expert_gate = width > 0
  if family.config_hook is not None:
    family.config_hook(h, c, where)
  return c


def hf_config(config: ml_collections.ConfigDict, family: Family,
              vocab_size: int) -> dict[str, Any]:
  """The ``config.json`` dict of an LM config in ``family`` (the inverse of
  :func:`lm_config` on the keys that define the forward pass)."""
  m, moe = config.model, config.moe
  out = {
      "model_type": family.model_type,
      "architectures": [family.architecture],
      "vocab_size": vocab_size,
      "hidden_size": m.d_model,
      "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads or m.num_heads,
      "head_dim": m.head_dim or m.d_model // m.num_heads,
      "hidden_act": "silu",
      "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_base,
      "rope_scaling": None,
      "max_position_embeddings": config.data.seq_len,
      "tie_word_embeddings": False,
      family.experts_key[0]: moe.num_experts,
      family.expert_width_key: moe.d_ff or m.d_ff,
      "num_experts_per_tok": moe.top_k,
      "router_aux_loss_coef": moe.aux_loss_coef / max(moe.top_k, 1),
      "output_router_logits": False,
  }
  if family.dense_width_key:
    out[family.dense_width_key] = m.d_ff
  if family.norm_topk_key:
    out[family.norm_topk_key] = bool(moe.normalize_gates)
  if family.sparse_layout:
    out["decoder_sparse_step"] = m.moe_every
    out["mlp_only_layers"] = sorted(int(i) for i in m.dense_layers)
  if family.z_loss_key:
    out[family.z_loss_key] = moe.z_loss_coef
  if family.shared_expert and family.shared_gated:
    out["shared_expert_intermediate_size"] = moe.num_shared_experts * (moe.d_ff or m.d_ff)
  out.update(family.extra)
  if family.hf_config_hook is not None:
    family.hf_config_hook(config, out)
  return out


def tensors(config: ml_collections.ConfigDict, family: Family,
            is_moe: Callable[[int], bool]) -> list[Tensor]:
  """Every parameter of the (unscanned) model of ``config`` with its tensors on disk;
  ``is_moe(i)`` says whether block ``i`` has an MoE FFN."""
  m = config.model
  out = [Tensor(("embedding",), ("model.embed_tokens.weight",)),
         Tensor(("final_norm", "scale"), ("model.norm.weight",)),
         Tensor(("unembed",), ("lm_head.weight",), TRANSPOSE)]
  for i in range(m.num_layers):
    out += _block_tensors(config, family, ("blocks", i), f"model.layers.{i}",
                          is_moe(i))
  for j in range(m.get("mtp_depth", 0) or 0):
    if family.mtp_tensors is None:
      raise ConversionError(f"model.mtp_depth={m.mtp_depth}: {family.model_type} has no "
                            "multi-token prediction modules; use model.mtp_depth=0.")
    layer = f"model.layers.{m.num_layers + j}"
    block = _block_tensors(config, family, ("mtp", j, "block"), layer,
                           is_moe(m.num_layers - 1))
    out += family.mtp_tensors(config, j, layer, block)
  return out


def _block_tensors(config, family: Family, b: tuple, layer: str,
                   moe_block: bool) -> list[Tensor]:
  """The tensors of one block (``b``: its path) stored under ``layer``."""
  gate, up, down = family.expert_names
  out = [Tensor(b + ("attn_norm", "scale"), (f"{layer}.input_layernorm.weight",)),
         Tensor(b + ("ffn_norm", "scale"), (f"{layer}.post_attention_layernorm.weight",))]
  if family.attention_tensors is not None:
    out += family.attention_tensors(config, b, layer)
  else:
    out += _attention_tensors(config, b, layer)
  if not moe_block:
    mlp = f"{layer}.mlp"
    return out + [
        Tensor(b + ("ffn", "wi_gate"), (f"{mlp}.gate_proj.weight",), TRANSPOSE),
        Tensor(b + ("ffn", "wi"), (f"{mlp}.up_proj.weight",), TRANSPOSE),
        Tensor(b + ("ffn", "wo"), (f"{mlp}.down_proj.weight",), TRANSPOSE)]
  moe = f"{layer}.{family.moe_prefix}"
  experts = range(config.moe.num_experts)
  out.append(Tensor(b + ("ffn", "router", "kernel"), (f"{moe}.gate.weight",), TRANSPOSE))
  if family.router_tensors is not None:
    out += family.router_tensors(config, b, moe)
  for attr, name in (("wi_gate", gate), ("wi", up), ("wo", down)):
    out.append(Tensor(b + ("ffn", "experts", attr),
                      tuple(f"{moe}.experts.{e}.{name}.weight" for e in experts),
                      TRANSPOSE, stacked=True))
  if family.shared_expert and config.moe.num_shared_experts:
    shared = f"{moe}.{family.shared_prefix}"
    out += [Tensor(b + ("ffn", "shared_experts", "wi_gate"),
                   (f"{shared}.gate_proj.weight",), TRANSPOSE),
            Tensor(b + ("ffn", "shared_experts", "wi"), (f"{shared}.up_proj.weight",),
                   TRANSPOSE),
            Tensor(b + ("ffn", "shared_experts", "wo"), (f"{shared}.down_proj.weight",),
                   TRANSPOSE)]
    if family.shared_gated:
      out.append(Tensor(b + ("ffn", "shared_gate", "kernel"),
                        (f"{moe}.shared_expert_gate.weight",), ROW))
  return out


def _attention_tensors(config, b: tuple, layer: str) -> list[Tensor]:
  """Grouped-query attention's tensors (with the options of the families)."""
  m = config.model
  heads = {"query": m.num_heads, "key": m.num_kv_heads or m.num_heads}
  heads["value"] = heads["key"]
  proj = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
  out = [Tensor(b + ("attn", "out"), (f"{layer}.self_attn.o_proj.weight",), OUT_HEADS,
                heads["query"])]
  for name in ("query", "key", "value"):
    out.append(Tensor(b + ("attn", name), (f"{layer}.self_attn.{proj[name]}.weight",),
                      IN_HEADS, heads[name]))
    if m.qkv_bias:
      out.append(Tensor(b + ("attn", f"{name}_bias"),
                        (f"{layer}.self_attn.{proj[name]}.bias",)))
  if m.qk_norm != "none":
    out += [Tensor(b + ("attn", "query_norm"), (f"{layer}.self_attn.q_norm.weight",)),
            Tensor(b + ("attn", "key_norm"), (f"{layer}.self_attn.k_norm.weight",))]
  return out
