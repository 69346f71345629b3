"""GLaM 64B/64E (Du et al. 2022, "GLaM: Efficient Scaling of Language Models with
Mixture-of-Experts") at full size: 1.2T parameters (1162B), 96.6B active per token.

Dimensions from the paper's Table 4 (sizes and architectures of the GLaM models) and
Sec. 4: a decoder-only LM of 64 blocks of width 8192 (M), 128 heads of 128 (so the
attention's inner width, 16384, is twice M: ``model.head_dim=128``), every other
block's FFN a top-2 MoE of 64 experts (E), the others dense, hidden width 32768 (H), a
256K SentencePiece vocabulary (256000 here), context 1024 tokens (``data.seq_len``,
which sets ``model.max_len``). As in Sec. 4.1, the dense (non-MoE) FFNs are gated
(GLU with a GELU, 3 matrices) and the experts are plain two-matrix FFNs with a GELU
(``moe.activation="gelu"``); the input and output embeddings are one matrix (tied:
inferred from the sizes, an untied output projection would add 2.1B to both). These are
the readings under which the table's two sizes both come out: total - active = 32 MoE
blocks x 62 idle experts = 1065B gives each expert 2 x 8192 x 32768 weights, and the
active 96.6B then needs the 16384-wide attention and the 3-matrix dense FFNs.

Published sizes (Du et al. 2022, Table 4): 1.2T total, given as 1162B in the text,
and 96.6B activated, the tied embedding included. ``tests/test_full_size_configs.py``
checks them with :func:`moe_jax.models.sizes.count_params` on an abstract model (no
weights).

Approximated: GLaM's gated GELU in the dense FFNs is SwiGLU here
(``model.activation="swiglu"``, the same weights and FLOPs). Not modelled: the
Transformer-XL-style relative position bias of each layer (rotary positions here, no
parameters; GLaM's bias is a few thousand numbers per layer). Routing is GShard's
top-2 as in ``top2_small`` (GLaM builds on GShard; the paper lists no routing
settings): the second choice kept with probability min(1, g2 / 0.2), capacity factor 2
at train time and 4 at eval, balance loss 0.01 and z-loss 0.001 (``switch_small``'s).
The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 256000


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 64
  m.d_model = 8192
  m.num_heads = 128
  m.head_dim = 128
  m.d_ff = 32768
  m.activation = "swiglu"  # the dense FFNs (GLaM: gated GELU)
  m.norm = "rmsnorm"
  m.position = "rotary"
  m.tie_embeddings = True
  m.moe_every = 2
  m.moe_offset = 1
  config.data.seq_len = 1024
  config.data.vocab_size = VOCAB_SIZE
  config.moe.activation = "gelu"  # the experts: plain two-matrix GELU FFNs
  config.moe.num_experts = 64
  config.moe.top_k = 2
  config.moe.capacity_factor = 2.0
  config.moe.eval_capacity_factor = 4.0
  config.moe.second_policy = "random"
  config.moe.second_threshold = 0.2
  return config
