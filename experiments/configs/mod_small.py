"""Mixture-of-Depths (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating
compute in transformer-based language models"), scaled down.

As in the paper:

* routed blocks alternate with full blocks (``model.mod_every=2``: blocks 1, 3, 5, 7);
* a routed block runs the top 12.5% of each sequence's tokens by router weight
  (``model.mod_capacity=0.125``, the paper's best: k = 16 of 128), gathered, attending
  only to each other causally, and adds ``r * f(x)`` to them; the others skip it;
* sampling routes with the router's own logits, trained by a binary cross-entropy
  against the top-k membership (``model.mod_predictor="router_bce"``; "mlp" is the
  paper's other predictor);
* isoFLOP with the baseline: the saved compute buys depth. Twice dense_small's blocks
  at its width cost 7.74M forward FLOPs per token against dense_small's 6.95M (1.11x),
  so this config trains for 538 steps instead of 600: the same training FLOPs as
  dense_small on the same data (``moe_jax.models.sizes.flops_per_token``).

Scaled down for a 2-core CPU: 8 blocks of width 256 (the paper: up to 3B parameters),
byte-level vocabulary, dense_small's batch, sequence length and optimizer. Not in the
paper: the BCE weight 0.01 per routed block (``model.mod_aux_loss_coef``), no MoE.
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.num_layers = 8
  config.model.mod_every = 2
  config.model.mod_capacity = 0.125
  config.model.mod_predictor = "router_bce"
  config.model.mod_aux_loss_coef = 0.01
  config.steps = 538  # 600 * 6.95M / 7.74M: dense_small's training FLOPs
  return config
