"""Jamba v0.1 (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model")
at full size: 52B parameters, 12B active per token.

Dimensions from the paper (Sec. 3) and Hugging Face ``ai21labs/Jamba-v0.1``
``config.json``: 32 layers of width 4096 (``hidden_size``) in 4 Jamba blocks of 8;
attention in one layer of eight (``attn_layer_period=8``, ``attn_layer_offset=4``),
32 query heads of 128 sharing 8 key-value heads, Mamba-1 in the other 28 (``d_state``
16, ``d_conv`` 4, ``expand`` 2, dt_rank ceil(4096 / 16) = 256, RMSNorms on dt, B and
C); every other layer an MoE (``expert_layer_period=2``, ``expert_layer_offset=1``) of
16 SwiGLU experts of width 14336 (``num_experts``, ``intermediate_size``), top-2 with
the softmax gates over all 16 not renormalised, the other layers a dense SwiGLU FFN of
the same width; no positional encoding, RMSNorm pre-norm blocks, untied embeddings over
a 65536-token vocabulary, context 262144 tokens (``max_position_embeddings``; the
paper's 256K; ``data.seq_len`` here, which sets ``model.max_len``). Routing as
``jamba_small`` (dropless, balance loss over both choices, coefficient 0.001 x 2 =
0.002 here for Hugging Face's ``router_aux_loss_coef`` 0.001 over k = 2).

Published sizes (Lieber et al. 2024, Table 1 and Sec. 3.1): 52B total, 12B active
("available parameters" and "active parameters"), embeddings included.
``tests/test_full_size_configs.py`` checks them with
:func:`moe_jax.models.sizes.count_params` on an abstract model (no weights).

The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 65536


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
  m.position = "none"
  m.tie_embeddings = False
  m.attn_layer_period = 8
  m.attn_layer_offset = 4
  m.moe_every = 2
  m.moe_offset = 1
  config.data.seq_len = 262144
  config.data.vocab_size = VOCAB_SIZE
  config.mamba.d_state = 16
  config.mamba.d_conv = 4
  config.mamba.expand = 2
  config.mamba.inner_norms = True
  config.moe.num_experts = 16
  config.moe.top_k = 2
  config.moe.normalize_gates = False
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  config.moe.aux_loss_coef = 0.002
  config.moe.z_loss_coef = 0.0
  return config
