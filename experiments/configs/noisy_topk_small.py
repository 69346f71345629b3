"""Noisy top-k gating (Shazeer et al. 2017), k = 2 of 8 experts in every other block.

Training adds learned Gaussian noise to the router logits,
``noise_std = softplus(x W_noise) + 1e-2`` with ``W_noise`` initialised to zero; the
gates are the softmax over the k chosen noisy logits, and the balance loss is
``cv2(importance) + cv2(load)`` with the paper's smooth load estimator, importance
and load counted over the whole global batch as in the paper (``moe.balance_scope``
unset is ``"batch"`` for this router; runs from before that key existed counted them
per sequence and averaged, which ``moe.balance_scope="group"`` restores). Evaluation
routes on the clean logits. ``moe.noise_anneal_steps`` (0 here, constant noise as in
the paper) fades the noise out over training.

Scaled down: the 4-block, d_model 256 byte-level LM of ``dense_small`` (the paper puts
one MoE between LSTM layers, with up to thousands of experts and k = 4), with the
capacity of ``top2_small`` (train 2.0, eval 4.0) so the two top-2 rows compare. One
coefficient, 0.01, scales the sum of the two losses (the paper weighs importance and
load separately); z-loss 0.001 as in ``switch_small`` (not in the paper).

Choices queue token-major for the capacity (``moe.queue_order="auto"`` in a causal LM),
so a token's routing never depends on later tokens; runs before that key existed
queued choice-major, which looked ahead (docs/routing.md, "Queue order").
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.moe.router = "noisy_topk"
  config.moe.num_experts = 8
  config.moe.top_k = 2
  config.moe.capacity_factor = 2.0
  config.moe.eval_capacity_factor = 4.0
  return config
