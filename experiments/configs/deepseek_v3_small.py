"""DeepSeek-V3's architecture at CPU size: ``deepseek_small``'s MoE with multi-head
latent attention, YaRN, a dense first block and one multi-token-prediction module.

* The MoE is ``deepseek_small``'s, unchanged (32 fine-grained experts of width 256 in
  4 groups, 2 kept, top-3 by sigmoid affinity plus one shared expert, the selection
  bias, the sequence-wise balance loss; dropless), so each token's FFN has 4 x 256 =
  1024 hidden units: the active FFN FLOPs of ``dense_small`` (checked by the tests).
  Its MoE blocks are 1 and 3 (``moe_every=2``); block 0 is dense, as V3's first 3 of
  61 (``first_dense_layers=1`` says so explicitly).
* Multi-head latent attention (``model.mixer="mla"``): 4 heads, queries compressed to
  128 and keys and values to a 64-wide latent, per head 32 query/key dims without and
  32 with rotary positions (one shared rotary key) and 64 value dims: the 4 x 64-wide
  heads of ``dense_small``'s attention, with a KV cache of 64 + 32 = 96 values per
  token and block instead of 2 x 4 x 64 = 512. Interleaved rotary pairs, as V3.
* YaRN (``model.rope_scaling="yarn"``) with factor 4 over the training context
  (``rope_original_max_len`` = ``data.seq_len``), so sampling may run to 4x it; V3:
  factor 40 over 4096.
* One MTP module (``model.mtp_depth=1``) with the report's lambda = 0.3.

Everything else is ``dense_small``'s: 4 blocks of width 256, the byte-level data.
The comparison with ``deepseek_small`` (the same MoE, plain attention, no MTP) is in
docs/results/deepseek_v3_cpu/.
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  # deepseek_small's MoE, unchanged.
  config.model.moe_every = 2
  config.moe.num_experts = 32
  config.moe.d_ff = config.model.d_ff // 4
  config.moe.num_shared_experts = 1
  config.moe.top_k = 3
  config.moe.score_fn = "sigmoid"
  config.moe.normalize_gates = True
  config.moe.gate_scale = 1.0
  config.moe.bias_update_rate = 1e-3
  config.moe.balance_choices = "all"
  config.moe.group_size = 0
  config.moe.aux_loss_coef = 1e-4
  config.moe.z_loss_coef = 0.0
  config.moe.expert_groups = 4
  config.moe.top_groups = 2
  config.moe.dispatch = "dropless"
  # DeepSeek-V3's other half.
  m = config.model
  m.first_dense_layers = 1
  m.mixer = "mla"
  m.rope_scaling = "yarn"
  m.rope_factor = 4.0
  m.rope_original_max_len = config.data.seq_len
  m.yarn_mscale = 1.0
  m.yarn_mscale_all_dim = 1.0
  m.mtp_depth = 1
  m.mtp_loss_coef = 0.3
  mla = config.mla
  mla.q_lora_rank = 128
  mla.kv_lora_rank = 64
  mla.qk_nope_head_dim = 32
  mla.qk_rope_head_dim = 32
  mla.v_head_dim = 64
  mla.rope_interleave = True
  return config
