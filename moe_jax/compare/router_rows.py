"""The rows of the router comparison and their equal-FLOPs arithmetic.

Each :class:`Row` is a router of the zoo, taken from its config file (the command
line's ``experiments/configs``, passed in as the ``configs_dir`` setting) plus, for a few rows, one or two overrides. A row whose token
visits ``k`` routed experts (``top_k``, or the capacity factor for expert choice) plus
``s`` shared ones gets experts of width ``d_ff / (k + s)`` and ``num_experts * (k + s)``
routed experts (:func:`expert_shape`), so every row runs ``d_ff`` hidden units of FFN
per token, as the dense row does. Adding a router to the comparison is a config file
and one line in :data:`ROWS` (docs/compare_routers.md). The grid
(:mod:`moe_jax.compare.routers`) and its report (:mod:`moe_jax.compare.routers_report`)
both read these and its runs (:class:`RouterRun`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from moe_jax.compare.runner import RunSpec
from moe_jax.training.config import load_config_file

CAUSAL, MASKED = "causal_lm", "masked_lm"
OBJECTIVE_CHOICES = {"causal_lm": (CAUSAL,), "masked_lm": (MASKED,),
                     "both": (CAUSAL, MASKED)}
SHORT = {CAUSAL: "clm", MASKED: "mlm"}  # run-name prefixes
BOTH = (CAUSAL, MASKED)


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the comparison.

  Attributes:
    name: run-name stem and ``family`` column (``switch``).
    label: the report's name for it.
    config: the ``NAME.py`` of the configs directory it starts from.
    overrides: dotted config keys set after loading it (``{"moe.capacity_factor": 1.0}``).
    objectives: the objectives it runs under (non-causal routers: masked LM only).
    paper: where the router comes from.
    variant: a one-key variant of another row for a side study (``noisy_top2_group``):
      not in the presets' grid, run with ``--rows``.
  """

  name: str
  label: str
  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  objectives: tuple[str, ...] = BOTH
  paper: str = ""
  variant: bool = False


# Capacity 1.0 at train and eval for the capacity-limited masked-LM rows: expert choice
# at its two capacity factors (Zhou et al. evaluate at the train factor), and Switch
# with and without Batch Prioritized Routing where capacity is tight (V-MoE).
_TIGHT = {"moe.capacity_factor": 1.0, "moe.eval_capacity_factor": 1.0}
_GROUP, _BATCH = {"moe.balance_scope": "group"}, {"moe.balance_scope": "batch"}
ROWS: tuple[Row, ...] = (
    Row("dense", "Dense", "dense_small"),
    Row("switch", "Switch top-1", "switch_small", paper="Fedus et al. 2021"),
    Row("gshard_top2", "GShard top-2", "top2_small", paper="Lepikhin et al. 2020"),
    Row("mixtral_top2", "Mixtral top-2 dropless", "mixtral_small",
        {"model.activation": "gelu"}, paper="Jiang et al. 2024"),
    Row("deepseek", "DeepSeek fine-grained + shared, bias balancing", "deepseek_small",
        paper="Dai et al. 2024; DeepSeek-AI 2024 (V3)"),
    Row("deepseek_aux", "DeepSeek fine-grained + shared, aux loss, no bias",
        "deepseek_small", {"moe.bias_update_rate": 0.0, "moe.aux_loss_coef": 0.01},
        paper="Dai et al. 2024"),
    Row("noisy_top2", "Noisy top-2", "noisy_topk_small", paper="Shazeer et al. 2017"),
    Row("expert_choice_cf1", "Expert choice cf 1.0", "switch_small",
        {"moe.router": "expert_choice", **_TIGHT}, (MASKED,), paper="Zhou et al. 2022"),
    Row("expert_choice_cf2", "Expert choice cf 2.0", "switch_small",
        {"moe.router": "expert_choice", "moe.capacity_factor": 2.0,
         "moe.eval_capacity_factor": 2.0}, (MASKED,), paper="Zhou et al. 2022"),
    Row("switch_bpr_cf1", "Switch top-1 + BPR cf 1.0", "switch_small",
        {"moe.batch_priority": True, **_TIGHT}, (MASKED,), paper="Riquelme et al. 2021"),
    # The control of the BPR row: the same capacity without batch priority.
    Row("switch_cf1", "Switch top-1 cf 1.0 (BPR's control)", "switch_small", _TIGHT,
        (MASKED,), paper="Fedus et al. 2021"),
    # Variants for the balance-scope study (docs/routing.md "Balance scope"): each row
    # above at the other moe.balance_scope (topk's default is "group", noisy_topk's
    # "batch"). noisy_top2_group is the noisy row as it ran before noisy_topk's default
    # became "batch".
    Row("switch_batch", "Switch top-1, batch balance", "switch_small", _BATCH,
        paper="Fedus et al. 2021", variant=True),
    Row("gshard_top2_batch", "GShard top-2, batch balance", "top2_small", _BATCH,
        paper="Lepikhin et al. 2020", variant=True),
    Row("noisy_top2_group", "Noisy top-2, group balance", "noisy_topk_small", _GROUP,
        paper="Shazeer et al. 2017", variant=True),
)
ROW_NAMES = tuple(r.name for r in ROWS)
# The presets' rows: every row but the variants.
GRID_ROW_NAMES = tuple(r.name for r in ROWS if not r.variant)
ROW_BY_NAME = {r.name: r for r in ROWS}


@dataclasses.dataclass(frozen=True)
class RouterRun(RunSpec):
  """A run of the router grid.

  Attributes:
    row: the :class:`Row`'s name (the ``family`` column).
    objective: ``causal_lm`` or ``masked_lm``.
    capacity_factor: train capacity factor (None: dense or dropless).
    paper: the row's paper (the ``paper_model`` column).
  """

  row: str = ""
  objective: str = CAUSAL
  capacity_factor: float | None = None
  paper: str = ""

  def columns(self) -> dict[str, Any]:
    return {"family": self.row, "paper_model": self.paper,
            "train_capacity_factor": self.capacity_factor or ""}


def load_row_config(name: str, configs_dir: str):
  """``get_config()`` of ``configs_dir/NAME.py`` (the command lines pass
  ``experiments/configs``)."""
  return load_config_file(os.path.join(configs_dir, f"{name}.py"))


def experts_per_token(config) -> float:
  """Routed experts a token visits: ``top_k``, or the capacity factor for expert
  choice (each expert takes ``cf * S / E`` tokens)."""
  from moe_jax.layers.router_families import ROUTERS  # pylint: disable=import-outside-toplevel
  return float(ROUTERS[config.moe.router].experts_per_token(config.moe))


def expert_shape(config, d_ff: int, num_experts: int) -> tuple[int, int]:
  """(expert width, routed experts) at equal active FFN FLOPs and routed parameters.

  A token visiting ``k`` routed and ``s`` shared experts of width ``d_ff / (k + s)``
  runs ``d_ff`` hidden units; ``num_experts * (k + s)`` routed experts hold
  ``num_experts * d_ff``. Switch (k 1): ``(d_ff, E)``; top-2: ``(d_ff / 2, 2E)``;
  DeepSeek's 3 routed + 1 shared: ``(d_ff / 4, 4E)``.
  """
  units = experts_per_token(config) + config.moe.num_shared_experts
  return int(round(d_ff / units)), int(round(num_experts * units))


def ffn_flops_per_token(config) -> float:
  """Forward FLOPs of the FFNs per token (2 per multiply-add), experts at the share a
  token visits: what the rows hold equal."""
  from moe_jax.training.config_views import (expert_activation, expert_d_ff, model_pattern)  # pylint: disable=import-outside-toplevel
  m = config.model
  def mats(activation):
    return 3 if activation == "swiglu" else 2
  total = 0.0
  for kind in model_pattern(config):
    if kind.ffn == "moe":
      units = experts_per_token(config) + config.moe.num_shared_experts
      width = expert_d_ff(config) * units
      total += 2 * mats(expert_activation(config)) * m.d_model * width
    else:
      total += 2 * mats(m.activation) * m.d_model * m.d_ff
  return total
