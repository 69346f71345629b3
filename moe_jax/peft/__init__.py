"""Parameter-efficient fine-tuning of a pretrained moe_jax model (docs/peft.md).

* :mod:`moe_jax.peft.lora`: LoRA targets (router, experts, shared experts, attention,
  dense FFN) on flax's ``nnx.LoRAParam`` (the adapter type is
  :mod:`moe_jax.layers.lora_adapters`);
* :mod:`moe_jax.peft.esft`: expert-specialised fine-tuning (score, select, freeze);
* :mod:`moe_jax.peft.finetune`: the fine-tuning run (``experiments/finetune.py``).
"""

from moe_jax.layers.lora_adapters import Adapter, merge
from moe_jax.peft.esft import routing_shares, select_experts
from moe_jax.peft.lora import TARGETS, add_lora, lora_param_count, target_weights

__all__ = ["Adapter", "TARGETS", "add_lora", "lora_param_count", "merge",
           "routing_shares", "select_experts", "target_weights"]
