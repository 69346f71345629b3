"""Dense baseline: 4 blocks, d_model 256, d_ff 1024, byte-level, seq 128, batch 16.

Same active FLOPs per token as ``switch_small`` (its experts have the same d_ff and
each token visits one of them).
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 0
  return config
