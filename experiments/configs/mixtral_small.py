"""Mixtral 8x7B (Jiang et al. 2024), scaled down: top-2 of 8 SwiGLU experts, no capacity.

As in Mixtral: 8 experts, each token goes to its top 2 with gates renormalised over the
two (equal to a softmax over the two chosen logits), SwiGLU experts, and no token is
dropped (``dispatch="dropless"``, grouped matmuls as in MegaBlocks). The balance loss
counts all k choices (``balance_choices="all"``); Hugging Face's Mixtral loss is k = 2
times this one (docs/routing.md), so a coefficient here pulls like half of it there.

Scaled down: the 4-block, d_model 256 byte-level LM of ``dense_small`` (Mixtral: 32
blocks of 4096), MoE in every other block as in ``switch_small`` (Mixtral: every block),
expert width d_ff 1024 (Mixtral: 14336). SwiGLU is the activation of the whole model, the
dense blocks included, so the FFN weights are 1.5x those of the GELU configs. Kept from
``switch_small`` (not in the paper): aux loss coefficient 0.01, z-loss 0.001.
Dropless runs on one device and on any mesh (docs/sharding.md).
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.model.activation = "swiglu"
  config.moe.num_experts = 8
  config.moe.top_k = 2
  config.moe.normalize_gates = True
  config.moe.second_policy = "all"
  config.moe.dispatch = "dropless"
  config.moe.balance_choices = "all"
  return config
