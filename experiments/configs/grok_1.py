"""Grok-1 (xAI's open release, March 2024) at full size: 314B parameters, top-2 of 8
experts.

Dimensions from the release's README and ``model.py``/``run.py``
(github.com/xai-org/grok-1): 64 blocks of width 6144 (``emb_size``), 48 query heads
of 128 sharing 8 key-value heads (``num_q_heads``, ``num_kv_heads``, ``key_size``),
every block's FFN a top-2 MoE of 8 gated experts of width 32768
(``widening_factor=8``: ``int(8 * 6144) * 2 // 3`` rounded to a multiple of 8), a
131072-token SentencePiece vocabulary whose embedding is also the output projection
(``InOutEmbed``: tied), rotary positions, context 8192 tokens (``sequence_len``;
``data.seq_len`` here, which sets ``model.max_len``). Grok's router takes the softmax
over all 8 logits and keeps the top 2 without renormalising (``normalize_gates=False``);
no token is dropped (``dispatch="dropless"``). xAI publishes no training settings: the
balance loss (over both choices, 0.01) and z-loss (0.001) are ``switch_small``'s.

Published size: 314B total (README). xAI states no exact active count, only that "25%
of the weights" are active on a token, which is the share of the experts (2 of 8);
with the attention and the embedding, which every token uses, this model's active count
is 26.5% of its total. ``tests/test_full_size_configs.py`` checks the total within 2%
and that the routed experts' active share is exactly 2/8.

Approximated: Grok's experts are gated GELU (``gelu(x W) * (x V)``), here SwiGLU
(``activation="swiglu"``, the same weights and FLOPs). Not modelled, all without
parameters or with a negligible number of them: the extra RMSNorms after the attention
and the FFN, the attention-logit soft cap (30) and the output multipliers. The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 131072


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 64
  m.d_model = 6144
  m.num_heads = 48
  m.num_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 32768
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.position = "rotary"
  m.tie_embeddings = True
  m.moe_every = 1
  m.moe_offset = 0
  config.data.seq_len = 8192
  config.data.vocab_size = VOCAB_SIZE
  config.moe.num_experts = 8
  config.moe.top_k = 2
  config.moe.normalize_gates = False
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  return config
