"""GShard-style top-2 routing to 8 experts in every other block.

Second choices are kept with probability min(1, g2 / 0.2) ("random" policy, Mesh-TF /
ST-MoE threshold 0.2). Capacity has no factor of k (see moe_jax.routing), so the train
capacity factor 2.0 is GShard's 2N/E slots per expert; eval uses 4.0.
Active FLOPs per token are up to 2x the expert part of ``switch_small``.
Choices queue token-major for the capacity (``moe.queue_order="auto"`` in a causal LM,
MaxText's order), so a token's routing never depends on later tokens; GShard's
choice-major order, which runs before that key used, looks ahead (docs/routing.md,
"Queue order").
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.moe.num_experts = 8
  config.moe.top_k = 2
  config.moe.capacity_factor = 2.0
  config.moe.eval_capacity_factor = 4.0
  config.moe.second_policy = "random"
  config.moe.second_threshold = 0.2
  return config
