"""Switch Transformer (Fedus et al. 2021): top-1 routing to 8 experts in every other block.

Same active FLOPs per token as ``dense_small``; ~3.3x its parameters. Train capacity
factor 1.25, eval 2.0, load-balancing loss 0.01 and z-loss 0.001 (ST-MoE) per MoE block
(``moe.loss_reduction="sum"``), one routing group per sequence (``moe.group_size=0``).
Experts and router are initialised like every other weight (the config default), as the
dense FFN they replace in ``dense_small`` is; docs/results/switch_vs_dense_defaults/ has
the ablations behind these defaults.
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.moe.num_experts = 8
  config.moe.top_k = 1
  config.moe.capacity_factor = 1.25
  config.moe.eval_capacity_factor = 2.0
  return config
