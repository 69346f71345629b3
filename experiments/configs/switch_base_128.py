"""Switch-Base-128 (Fedus et al. 2021, "Switch Transformers") at full width, as a
decoder-only LM: T5-Base's widths with 128 top-1 experts in every other FFN.

moe_jax builds decoder-only models, so this is not the published encoder-decoder: it
is one stack of Switch-Base's widths, 12 blocks of width 768 with 12 heads of 64, ReLU
FFNs of width 3072 (T5-Base, Raffel et al. 2020), every other block (1, 3, ..., as
Hugging Face ``google/switch-base-128``'s ``decoder_sparse_step=2``) a top-1 MoE of
128 experts of that width, RMSNorm pre-norm blocks, T5's 32128-token vocabulary with
the input and output embeddings tied (T5 v1.0), context 512 tokens (T5's pre-training
length; ``data.seq_len``, which sets ``model.max_len``). Dimensions from the paper's
Table 9 and ``google/switch-base-128``'s ``config.json`` (``d_model`` 768, ``d_ff``
3072, ``num_heads`` 12, ``d_kv`` 64, ``num_layers`` 12 per stack, ``num_experts`` 128,
``vocab_size`` 32128). Routing as ``switch_small``: capacity factor 1.25 at train time
and 2.0 at eval, balance loss 0.01, z-loss 0.001.

The published figure, 7.4B parameters (Switch-Base-128), is for the encoder-decoder:
an encoder and a decoder of 12 blocks each, each stack with 6 MoE blocks, and one
shared embedding. That model is two copies of this one's blocks plus the decoder's
cross-attention (12 x 4 x 768^2 = 28.3M) with the embedding counted once, so the
published sizes are compared as ``2 * ours - embedding + cross-attention``
(``tests/test_full_size_configs.py``): 7.42B total, against the published 7.4B, and
224M active, against T5-Base ("about 220M", Raffel et al. 2020), the dense model
Switch-Base is FLOP-matched to (the active count has the embedding and the 12 routers'
1.2M included). This decoder-only stack alone has 3.71B parameters, 110M active.

Not modelled: T5's relative position bias (32 buckets x 12 heads per stack; rotary
positions here, no parameters). The library's data is byte-level: ``data.vocab_size`` =
:data:`VOCAB_SIZE` gives the embedding the published vocabulary, whose first few
hundred rows the byte tokenizer's ids use.
"""

from moe_jax.training.config import default_config

VOCAB_SIZE = 32128


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 12
  m.d_model = 768
  m.num_heads = 12
  m.d_ff = 3072
  m.activation = "relu"
  m.norm = "rmsnorm"
  m.position = "rotary"
  m.tie_embeddings = True
  m.moe_every = 2
  config.data.seq_len = 512
  config.data.vocab_size = VOCAB_SIZE
  config.moe.num_experts = 128
  config.moe.top_k = 1
  config.moe.capacity_factor = 1.25
  config.moe.eval_capacity_factor = 2.0
  return config
