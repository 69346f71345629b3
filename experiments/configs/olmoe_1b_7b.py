"""OLMoE-1B-7B (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language
Models") at full size: 6.9B parameters, 1.3B active per token.

Dimensions from the paper (Table 1) and Hugging Face ``allenai/OLMoE-1B-7B-0924``
``config.json``: 16 blocks of width 2048 (``hidden_size``), 16 heads of 128, every
block's FFN an MoE of 64 SwiGLU experts of width 1024 (``num_experts``,
``intermediate_size``) of which each token takes 8 (``num_experts_per_tok``), softmax
gates not renormalised over the 8 (``norm_topk_prob=false``), no token dropped
(``dispatch="dropless"``), a load-balancing loss over all 8 choices with coefficient
0.08 (the paper's and Hugging Face's ``router_aux_loss_coef`` 0.01 on a loss that sums
over the k choices without dividing by k, so k = 8 times this one: docs/routing.md)
and router z-loss 0.001 (the paper's). RMSNorm pre-norm
blocks, rotary positions (base 10000), untied embeddings over a 50304-token vocabulary,
context 4096 tokens (``max_position_embeddings``; ``data.seq_len`` here, which sets
``model.max_len``).

Published sizes (Muennighoff et al. 2024, Table 1): 6.9B total, 1.3B active,
embeddings included in both. ``tests/test_full_size_configs.py`` checks them with
:func:`moe_jax.models.sizes.count_params` on an abstract model (no weights).

OLMoE's RMSNorm over each token's whole query and key projections
(``model.qk_norm="projection"``, 2 x 2048 scales per block) and its norm epsilon 1e-5
are modelled, as ``moe_jax.interop.hf`` converts the real checkpoint.
The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 50304


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 16
  m.d_model = 2048
  m.num_heads = 16
  m.head_dim = 128
  m.d_ff = 1024  # every block is MoE: this is the experts' width (moe.d_ff=0)
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.norm_eps = 1e-5
  m.qk_norm = "projection"
  m.position = "rotary"
  m.tie_embeddings = False
  m.moe_every = 1
  m.moe_offset = 0
  config.data.seq_len = 4096
  config.data.vocab_size = VOCAB_SIZE
  config.moe.num_experts = 64
  config.moe.top_k = 8
  config.moe.normalize_gates = False
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  config.moe.aux_loss_coef = 0.08  # 0.01 on a loss k = 8 times this one
  config.moe.z_loss_coef = 0.001
  return config
