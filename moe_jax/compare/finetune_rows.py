"""The fine-tuning comparison's rows: the base models, the methods and the runs.

Read by the grid (:mod:`moe_jax.compare.finetune_grid`) and its report
(:mod:`moe_jax.compare.finetune_report`); adding a method is one line in
:data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from moe_jax.compare.runner import RunSpec

# Base models: experiments/configs/NAME.py (MoE configs: ESFT needs routed experts).
BASES = ("switch_small", "deepseek_small")
FINETUNE_CONFIG = "finetune_lora"  # experiments/configs/finetune_lora.py


@dataclasses.dataclass(frozen=True)
class Method:
  """One fine-tuning method of the comparison.

  Attributes:
    what: the method in words, for the report.
    overrides: dotted keys set on ``experiments/configs/finetune_lora.py``'s config.
  """

  what: str
  overrides: Mapping[str, Any]


METHODS: dict[str, Method] = {
    # docs/peft.md: full fine-tuning at a third of LoRA's learning rate.
    "full": Method("every parameter", {"finetune.method": "full",
                                       "learning_rate": 3e-4}),
    "lora_experts": Method("LoRA on the routed experts",
                           {"finetune.method": "lora", "finetune.targets": ("experts",)}),
    "lora_router_experts": Method(
        "LoRA on the router and the routed experts",
        {"finetune.method": "lora", "finetune.targets": ("router", "experts")}),
    "lora_attention": Method("LoRA on attention (query, key, value, out)",
                             {"finetune.method": "lora",
                              "finetune.targets": ("attention",)}),
    # Targets default to none: only the experts ESFT selects train.
    "esft": Method("ESFT: the experts the new data routes to",
                   {"finetune.method": "esft"}),
}
METHOD_NAMES = tuple(METHODS)


@dataclasses.dataclass(frozen=True)
class FinetuneRun(RunSpec):
  """A run of the grid: a base model's pretraining (``method`` empty) or one method's
  fine-tuning of it.

  Attributes:
    base: the base model (a name of :data:`BASES`).
    method: a name of :data:`METHODS`; "" for the pretraining run.
    base_run: the pretraining run a fine-tuning run starts from (its ``name``).
  """

  base: str = ""
  method: str = ""
  base_run: str = ""
