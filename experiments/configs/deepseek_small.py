"""DeepSeek-MoE / DeepSeek-V3 routing, scaled down: fine-grained and shared experts,
sigmoid gates, auxiliary-loss-free balancing and group-limited routing.

* Fine-grained experts (DeepSeek-MoE, Dai et al. 2024): each of ``switch_small``'s 8
  experts of width 1024 is split into 4 of width 256 (``moe.d_ff``), so 32 routed
  experts; one shared expert of the same width (``num_shared_experts=1``) that every
  token passes. Each token uses 3 routed experts plus the shared one: 4 x 256 = 1024
  hidden units, the active FFN FLOPs of ``dense_small`` (checked by the tests).
* DeepSeek-V3 (2024) routing: sigmoid affinities, top-k gates renormalised over the k
  choices, a selection bias moved by ``bias_update_rate`` 1e-3 after every step
  (auxiliary-loss-free balancing, V3's gamma), a small sequence-wise balance loss
  (``balance_choices="all"`` over groups of one sequence, ``group_size=0``, so also
  when ``data.seq_len`` is overridden; coefficient 1e-4 as V3's alpha), and group-limited routing: the 32
  experts form 4 groups of 8 and each token keeps the 2 groups whose two best scores sum
  highest (V3: 8 groups, 4 kept). No token is dropped (``dispatch="dropless"``).

Scaled down: the 4-block, d_model 256 byte-level LM of ``dense_small`` with MoE in
every other block (V3: 61 blocks of 7168, the first 3 dense; 256 routed experts of width
2048, top-8, 1 shared), ``gate_scale`` 1.0 (V3's routed scaling factor is 2.5 for
top-8 of 256). No router z-loss (``z_loss_coef=0``): V3 has none, and the z-loss
penalises ``logsumexp(logits)``, the normaliser of a softmax, which on sigmoid scores
only pushes every logit down (the config check refuses the two together). Kept from
``switch_small`` (not in the papers): GELU.
Dropless runs on one device and on any mesh (docs/sharding.md).
"""

from moe_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.moe_every = 2
  config.moe.num_experts = 32
  config.moe.d_ff = config.model.d_ff // 4
  config.moe.num_shared_experts = 1
  config.moe.top_k = 3
  config.moe.score_fn = "sigmoid"
  config.moe.normalize_gates = True
  config.moe.gate_scale = 1.0
  config.moe.bias_update_rate = 1e-3
  config.moe.balance_choices = "all"
  config.moe.group_size = 0  # one routing group per sequence, whatever data.seq_len
  config.moe.aux_loss_coef = 1e-4
  config.moe.z_loss_coef = 0.0  # V3 has none; a z-loss is a softmax's (see above)
  config.moe.expert_groups = 4
  config.moe.top_groups = 2
  config.moe.dispatch = "dropless"
  return config
