"""What a config resolves to, for the config check and the code that builds from it:
``moe.queue_order`` with "auto" resolved, the per-block layer pattern, the experts'
width and activation, and the MoE section seen as a
:class:`~moe_jax.layers.moe_config.MoeConfig` (:func:`moe_view`). The values are
not checked here (:func:`moe_jax.training.config.validate_config` does); a bad one
resolves to a harmless stand-in, so each is reported once, as its own key."""

from __future__ import annotations

import math
import numbers

from moe_jax.layers.experts import ACTIVATIONS
from moe_jax.layers.moe_config import DTYPES, MoeConfig
from moe_jax.models.layer_pattern import layer_pattern
from moe_jax.routing import QUEUE_ORDERS
from moe_jax.training.sections import SectionView


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


QUEUE_ORDER_KEYS = ("auto",) + QUEUE_ORDERS


def queue_order(config) -> str:
  """``moe.queue_order`` with ``"auto"`` resolved: ``"token_major"`` for a causal
  objective (a token's routing then never depends on later tokens), ``"choice_major"``
  for masked LM (GShard's order; it sees the whole sequence anyway). Configs saved
  before the key existed get ``"choice_major"`` from
  :func:`moe_jax.training.run_state.load_config`, the order they trained with."""
  value = config.moe.get("queue_order", "auto")
  if value != "auto":
    return value
  from moe_jax.training.objectives import OBJECTIVES  # pylint: disable=import-outside-toplevel
  objective = OBJECTIVES.get(config.model.get("objective", "causal_lm"))
  return "choice_major" if objective is not None and not objective.causal else (
      "token_major")


# The MoE keys a run resolves from other LM keys, named as in the LM config.
MOE_KEYS = {"d_model": "model.d_model", "d_ff": "model.d_ff", "dtype": "model.dtype",
             "model_init_scale": "model.init_scale"}


def moe_view(config) -> SectionView:
  """The MoE section seen as a MoeConfig, for :func:`validate_moe_config` and
  :func:`causality`, its errors named by the LM keys."""
  m, moe = config.model, config.moe
  # A bad moe.queue_order is reported once, with "auto" among the choices.
  order = moe.get("queue_order", "auto")
  return SectionView(
      MoeConfig, moe, d_model=m.d_model, d_ff=expert_d_ff(config),
      # A bad model.activation is reported once, as a model key.
      activation=moe.get("activation", "") or (
          m.activation if m.activation in ACTIVATIONS else "relu"),
      queue_order=queue_order(config) if order in QUEUE_ORDER_KEYS else "choice_major",
      # A bad model.dtype is reported once, as a model key.
      dtype=m.dtype if m.dtype in DTYPES else "float32",
      # A bad model.init_scale is reported once, as a model key.
      model_init_scale=m.init_scale if is_real(m.init_scale) and m.init_scale > 0
      else 1.0)


def pattern_keys(model) -> tuple:
  """``(attn_layer_period, attn_layer_offset, moe_every, moe_offset,
  first_dense_layers, dense_layers)`` of a config's ``model`` section (keys missing
  from older configs take the all-attention, ``moe_every - 1``, no-dense-block
  defaults)."""
  return (model.get("attn_layer_period", 1), model.get("attn_layer_offset", 0),
          model.moe_every, model.get("moe_offset", None),
          model.get("first_dense_layers", 0), tuple(model.get("dense_layers", ())))


def model_pattern(config):
  """The per-block ``(mixer, ffn)`` list of a config (:func:`layer_pattern`)."""
  period, offset, every, moe_offset, first_dense, dense = pattern_keys(config.model)
  return layer_pattern(config.model.num_layers, attn_layer_period=period,
                       attn_layer_offset=offset, moe_every=every, moe_offset=moe_offset,
                       first_dense_layers=first_dense, dense_layers=dense)


def expert_d_ff(config):
  """The width of each expert: ``moe.d_ff``, or ``model.d_ff`` when it is 0 (or bad,
  which the config check reports as ``moe.d_ff``)."""
  d_ff = config.moe.get("d_ff", 0)
  return d_ff if is_int(d_ff) and d_ff > 0 else config.model.d_ff


def expert_activation(config) -> str:
  """The experts' activation: ``moe.activation``, or ``model.activation`` when it is
  "" (GLaM: gated GELU in the dense FFNs, plain GELU in the experts)."""
  return config.moe.get("activation", "") or config.model.activation
