"""DeepSeekMoE 16B (Dai et al. 2024, "DeepSeekMoE: Towards Ultimate Expert
Specialization in Mixture-of-Experts Language Models") at full size: 16.4B parameters,
2.8B active per token.

Dimensions from the paper (Sec. 5.1 and Appendix) and Hugging Face
``deepseek-ai/deepseek-moe-16b-base`` ``config.json``: 28 blocks of width 2048
(``hidden_size``), 16 heads of 128 (multi-head attention, ``num_key_value_heads=16``),
block 0 a dense SwiGLU FFN of width 10944 (``first_k_dense_replace=1``,
``intermediate_size``; ``model.first_dense_layers=1``), every later block an MoE
(``moe_layer_freq=1``) of 64 fine-grained routed experts of width 1408
(``n_routed_experts``, ``moe_intermediate_size``; ``moe.d_ff``) of which each token
takes 6 (``num_experts_per_tok``), plus 2 shared experts that every token passes
(``n_shared_experts``: one dense FFN of width 2 x 1408). Softmax gates over the 64
logits, not renormalised over the 6 chosen (``norm_topk_prob=false``), an expert-level
balance loss over all 6 choices with coefficient 0.001 (the paper's alpha_1 for 16B),
no z-loss, no token dropped (``dispatch="dropless"``). RMSNorm pre-norm blocks,
rotary positions (base 10000), untied embeddings over a 102400-token vocabulary,
context 4096 tokens (``max_position_embeddings``; ``data.seq_len`` here, which sets
``model.max_len``).

Published sizes (Dai et al. 2024, Table 2 / Sec. 5): 16.4B total, 2.8B active,
embeddings included in both. ``tests/test_full_size_configs.py`` checks them with
:func:`moe_jax.models.sizes.count_params` on an abstract model (no weights).

The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 102400


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 28
  m.d_model = 2048
  m.num_heads = 16
  m.head_dim = 128
  m.d_ff = 10944  # the dense FFN of block 0
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.position = "rotary"
  m.tie_embeddings = False
  m.moe_every = 1
  m.moe_offset = 0
  m.first_dense_layers = 1
  config.data.seq_len = 4096
  config.data.vocab_size = VOCAB_SIZE
  config.moe.num_experts = 64
  config.moe.d_ff = 1408
  config.moe.num_shared_experts = 2
  config.moe.top_k = 6
  config.moe.normalize_gates = False
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  config.moe.aux_loss_coef = 0.001
  config.moe.z_loss_coef = 0.0
  return config
