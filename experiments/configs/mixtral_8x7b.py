"""Mixtral 8x7B (Jiang et al. 2024, "Mixtral of Experts") at full size: 46.7B
parameters, 12.9B active per token.

Dimensions from the paper's Table 1 and Hugging Face ``mistralai/Mixtral-8x7B-v0.1``
``config.json``: 32 blocks of width 4096 (``hidden_size``), 32 query heads of 128
sharing 8 key-value heads (``num_attention_heads``, ``num_key_value_heads``), every
block's FFN a top-2 MoE of 8 SwiGLU experts of width 14336 (``num_local_experts``,
``num_experts_per_tok``, ``intermediate_size``), RMSNorm pre-norm blocks, rotary
positions with base 1e6 (``rope_theta``), untied input and output embeddings over a
32000-token vocabulary, context 32768 tokens (``max_position_embeddings``;
``data.seq_len`` here, which sets ``model.max_len``). Routing as in ``mixtral_small``:
the top-2 gates renormalised over the two (Hugging Face's softmax-then-renormalise),
no token dropped (``dispatch="dropless"``), the balance loss over both choices with
coefficient 0.04: Hugging Face's ``router_aux_loss_coef`` 0.02 on its loss, which is
k = 2 times this one (docs/routing.md); no z-loss (Mixtral has none).

Published sizes (Jiang et al. 2024, Sec. 2): 46.7B total, 12.9B active, embeddings
included in both. ``tests/test_full_size_configs.py`` checks them with
:func:`moe_jax.models.sizes.count_params` on an abstract model (no weights).

The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use. Not
modelled: the sliding window (Mixtral v0.1 attends over the full context anyway).
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 32000  # Hugging Face config.json vocab_size


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 32
  m.d_model = 4096
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 14336
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.position = "rotary"
  m.rope_base = 1e6
  m.norm_eps = 1e-5  # rms_norm_eps
  m.tie_embeddings = False
  m.moe_every = 1
  m.moe_offset = 0
  config.data.seq_len = 32768
  config.data.vocab_size = VOCAB_SIZE
  config.moe.num_experts = 8
  config.moe.top_k = 2
  config.moe.normalize_gates = True
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  config.moe.aux_loss_coef = 0.04  # HF's 0.02 on a loss k = 2 times this one
  config.moe.z_loss_coef = 0.0
  return config
