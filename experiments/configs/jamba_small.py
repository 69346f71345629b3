"""Jamba (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model"), scaled
down: one Jamba block of 8 layers, 1 attention and 7 Mamba, top-2 MoE every other layer.

As in Jamba:

* the layer pattern: attention in one layer of eight (``attn_layer_period=8``,
  ``attn_layer_offset=4``, Jamba's a:m = 1:7), Mamba in the others; MoE in every other
  layer (``moe_every=2``, ``moe_offset=1``: layers 1, 3, 5, 7, Jamba's e = 2), so the
  attention layer (4) has a dense FFN;
* 16 experts, top-2, gates the softmax over all 16 logits *not* renormalised over
  the two chosen (Hugging Face ``JambaSparseMoeBlock``), no token dropped
  (``dispatch="dropless"``, the reference block is dropless too); the balance loss
  counts both choices (``balance_choices="all"``, as HF's Mixtral-style loss);
* Mamba-1 layers with Jamba's RMSNorms on dt, B and C, d_state 16, d_conv 4, expand 2,
  dt_rank ceil(d_model / 16) (moe_jax/models/mamba.py);
* no positional encoding (``position="none"``); RMSNorm pre-norm blocks; SwiGLU FFNs
  whose width is 3.5 x d_model (Jamba: 14336 for 4096); untied embeddings.

Scaled down for a 2-core CPU: 8 layers of width 128 with 4 attention heads of 32 (Jamba:
32 layers = 4 Jamba blocks of width 4096, 32 query heads sharing 8 key-value heads;
this config keeps multi-head attention, and ``model.num_kv_heads=1`` gives Jamba's 4
query heads per KV head), byte-level vocabulary and the embedded
corpus at switch_small's batch, sequence length, steps and optimizer (Jamba trains on
long contexts up to 256K). With these widths the model has 3.0M active parameters
per token (dense_small: 3.3M) and 12.7M in total. Kept from ``switch_small`` (not in
the paper, so that the two compare like for like): load-balancing coefficient 0.01
(HF Jamba's default 0.001 is for a loss k = 2 times this one, i.e. 0.002 here) and
z-loss 0.001.
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 8
  m.d_model = 128
  m.num_heads = 4
  m.d_ff = 448  # 3.5 x d_model
  m.activation = "swiglu"
  m.position = "none"
  m.attn_layer_period = 8
  m.attn_layer_offset = 4
  m.moe_every = 2
  m.moe_offset = 1
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
  return config
