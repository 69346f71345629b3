"""DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report") at full size: 671B
parameters, 37B active per token, plus the 14B of its multi-token-prediction module.

Dimensions from the report (Sec. 4.2, "Model Hyper-Parameters") and Hugging Face
``deepseek-ai/DeepSeek-V3`` ``config.json``: 61 blocks of width 7168; multi-head latent
attention (``model.mixer="mla"``) with 128 heads, queries compressed to 1536
(``q_lora_rank``) and keys and values to a 512-wide latent (``kv_lora_rank``), per-head
query/key widths 128 without and 64 with rotary positions (``qk_nope_head_dim``,
``qk_rope_head_dim``; the rotary key is shared by the heads), values 128 wide
(``v_head_dim``), RMSNorms on both latents, interleaved rotary pairs; YaRN scaling
(factor 40 over 4096 original positions, beta 32 and 1, mscale 1 and 1) for the
128K context; the first 3 blocks dense FFNs of width 18432
(``first_k_dense_replace``), every later one an MoE of 256 routed SwiGLU experts of
width 2048 and 1 shared expert, each token taking 8 routed experts by sigmoid
affinity within the 4 best of 8 groups (group score: its two best affinities), gates
renormalised over the 8 and scaled by 2.5 (``routed_scaling_factor``), an
auxiliary-loss-free selection bias moved by gamma = 0.001, and a sequence-wise balance
loss with alpha = 0.0001; no token dropped (``dispatch="dropless"``). One MTP module
(``model.mtp_depth=1``, lambda 0.3 for the first 10T tokens of the report's schedule).
RMSNorm eps 1e-6, untied embeddings over a 129280-token vocabulary; training context
4096 (``data.seq_len``; the report pre-trains at 4K and extends to 128K with YaRN).

Published sizes (report, Sec. 1 and 4.2; the Hugging Face card): 671B total and 37B
activated for the main model, and 685B with the 14B MTP module.
``tests/test_full_size_configs.py`` checks the main model (``model.mtp_depth=0``).

The library's data is byte-level by default: ``data.vocab_size`` = :data:`VOCAB_SIZE`
gives the embedding the published vocabulary.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 129280


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 61
  m.d_model = 7168
  m.num_heads = 128
  m.head_dim = 64  # not used by latent attention; the rotary width, as Hugging Face
  m.d_ff = 18432  # the dense FFNs of blocks 0-2
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.norm_eps = 1e-6
  m.position = "rotary"
  m.rope_base = 10000.0
  m.rope_scaling = "yarn"
  m.rope_factor = 40.0
  m.rope_original_max_len = 4096
  m.yarn_beta_fast = 32.0
  m.yarn_beta_slow = 1.0
  m.yarn_mscale = 1.0
  m.yarn_mscale_all_dim = 1.0
  m.mixer = "mla"
  m.tie_embeddings = False
  m.moe_every = 1
  m.moe_offset = 0
  m.first_dense_layers = 3
  m.mtp_depth = 1
  m.mtp_loss_coef = 0.3
  mla = config.mla
  mla.q_lora_rank = 1536
  mla.kv_lora_rank = 512
  mla.qk_nope_head_dim = 128
  mla.qk_rope_head_dim = 64
  mla.v_head_dim = 128
  mla.rope_interleave = True
  config.data.seq_len = 4096
  config.data.vocab_size = VOCAB_SIZE
  moe = config.moe
  moe.num_experts = 256
  moe.d_ff = 2048
  moe.num_shared_experts = 1
  moe.top_k = 8
  moe.score_fn = "sigmoid"
  moe.normalize_gates = True
  moe.gate_scale = 2.5
  moe.expert_groups = 8
  moe.top_groups = 4
  moe.bias_update_rate = 1e-3
  moe.balance_choices = "all"
  moe.group_size = 0  # sequence-wise balance loss
  moe.aux_loss_coef = 1e-4
  moe.z_loss_coef = 0.0
  moe.second_policy = "all"
  moe.dispatch = "dropless"
  return config
