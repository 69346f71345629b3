"""MoDE, integrated (Raposo et al. 2024, Sec. 3.5): Switch top-1 routing over 8 experts
plus 8 no-op experts in every other block.

A token routed to a no-op expert gets 0 from the MoE layer and rides the residual
connection past it: Mixture-of-Depths inside the MoE router. As ``switch_small``
otherwise (train capacity factor 1.25, eval 2.0, load-balancing loss 0.01 and z-loss
0.001 per MoE block, one group per sequence), with two differences that follow from
the no-op experts:

* the balance loss and the load metrics cover all 16 experts, so a balanced router
  sends half of the tokens to no-op experts (``noop_fraction`` in the train lines);
* capacity is the share over all 16, ``C = ceil(1.25 * 128 / 16) = 10``, so the real
  experts hold half the slots of switch_small's; the no-op experts have no limit
  (``moe.noop_capacity_factor=None``).

Per token on a balanced router this is 5.90M forward FLOPs against dense_small's and
switch_small's 6.95M (0.85x), so it trains 707 steps instead of 600: dense_small's
training FLOPs on the same data. Scaled down as switch_small (4 blocks of width 256);
the paper's MoDE models are up to ~1B parameters.
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.moe.num_experts = 8
  config.moe.noop_experts = 8
  config.moe.top_k = 1
  config.moe.capacity_factor = 1.25
  config.moe.eval_capacity_factor = 2.0
  config.steps = 707  # 600 * 6.95M / 5.90M: dense_small's training FLOPs
  return config
