"""Hash layers (Roller et al. 2021, "Hash Layers for Large Sparse Models"): top-1 of 8
experts in every other block, each token sent to a fixed expert by a fixed random hash
of its token id; no learned router.

Everything else is ``switch_small`` (same experts, capacity factors 1.25 train / 2.0
eval, one routing group per sequence), with ``moe.router="hash"``: the assignment is
balanced over the vocabulary (every block of 8 consecutive ids spreads over all 8
experts, rotated by MurmurHash3's finaliser of the block index, seed 0x5EED; see
moe_jax/routing/hash.py), the same in every layer, in training, evaluation and cached
decoding. The MoE blocks have no router parameters, so the load-balancing loss and the
z-loss are 0 (their coefficients are kept at the defaults, and scale nothing).
Overflowing tokens are dropped in position order, as in ``switch_small``;
``--config.moe.dispatch=dropless`` drops none.

Scaled down: the byte-level LM of ``dense_small``, so the hash spreads the 256 byte
values (32 per expert); the paper hashes a BPE vocabulary of a large Transformer.
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.moe.router = "hash"
  config.moe.num_experts = 8
  config.moe.top_k = 1
  config.moe.capacity_factor = 1.25
  config.moe.eval_capacity_factor = 2.0
  return config
