"""Qwen3-30B-A3B (Qwen Team 2025, "Qwen3 Technical Report") at full size: 30.5B
parameters, 3.3B active per token.

Dimensions from the report (Table 2) and Hugging Face ``Qwen/Qwen3-30B-A3B``
``config.json``: 48 blocks of width 2048 (``hidden_size``); 32 query heads of 128
(``head_dim``, so the attention is 4096 wide, twice the model's width) sharing 4
key-value heads; RMSNorm on every head's queries and keys before the rotary embedding
(``model.qk_norm="head"``), no q/k/v biases; every block's FFN an MoE
(``decoder_sparse_step`` 1, no ``mlp_only_layers``) of 128 SwiGLU experts of width 768
(``moe_intermediate_size``), of which each token takes 8 with the softmax gates
renormalised over the 8 (``norm_topk_prob``), no shared expert, no token dropped
(``dispatch="dropless"``); the load-balancing loss over all 8 choices with Hugging
Face's ``router_aux_loss_coef`` 0.001 on a loss that sums over the k choices, so k = 8
times this one's coefficient (docs/routing.md); RMSNorm eps 1e-6, rotary base 1e6
(``rope_theta``), untied embeddings over a 151936-token vocabulary, context 32768
tokens natively (``data.seq_len`` here, which sets ``model.max_len``; the config's
``max_position_embeddings`` is 40960).

Published sizes (Qwen3 report, Table 2; the model card): 30.5B total, 3.3B activated,
embeddings included. ``tests/test_full_size_configs.py`` checks them with
:func:`moe_jax.models.sizes.count_params` on an abstract model (no weights).
``moe_jax.interop.hf.load`` reads the real checkpoint with this architecture
(docs/interop.md); this file is its shape for planning.

The library's data is byte-level by default: ``data.vocab_size`` = :data:`VOCAB_SIZE`
gives the embedding the published vocabulary.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 151936


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 48
  m.d_model = 2048
  m.num_heads = 32
  m.num_kv_heads = 4
  m.head_dim = 128
  m.d_ff = 768  # every block is MoE: this is the experts' width (moe.d_ff=0)
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.norm_eps = 1e-6
  m.qk_norm = "head"
  m.position = "rotary"
  m.rope_base = 1e6
  m.tie_embeddings = False
  m.moe_every = 1
  m.moe_offset = 0
  config.data.seq_len = 32768
  config.data.vocab_size = VOCAB_SIZE
  config.moe.num_experts = 128
  config.moe.top_k = 8
  config.moe.normalize_gates = True
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  config.moe.aux_loss_coef = 0.008  # 0.001 on a loss k = 8 times this one
  return config
