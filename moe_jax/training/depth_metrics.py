"""The training loop's view of Mixture-of-Depths: the routed blocks' loss term and metrics.

The loss and the eval line import this, not the model code
(:mod:`moe_jax.models.mod`): a model without routed blocks has an empty ``depth_aux``
and every function here returns nothing for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from moe_jax.training import metric_schema

if TYPE_CHECKING:
  from moe_jax.models.mod import DepthAux


# The routed blocks' metrics the train line reports per block as ``mod_<name>``, and
# the eval line as ``eval_mod_<name>`` (means over the validation tokens): the
# schema's Mixture-of-Depths keys.
METRICS = tuple(m.name[len("mod_"):] for m in metric_schema.TRAIN
                if m.when == metric_schema.MOD and m.layers == "per_layer")
EVAL_METRICS = tuple(m.name[len("eval_mod_"):] for m in metric_schema.EVAL
                     if m.when == metric_schema.MOD and m.layers == "per_layer")


def depth_loss(depth_aux: dict[int, DepthAux]) -> jax.Array:
  """f32[]: the predictors' BCE summed over the routed blocks (each carries the full
  ``model.mod_aux_loss_coef``, as the MoE losses do with ``loss_reduction="sum"``)."""
  if not depth_aux:
    return jnp.zeros((), jnp.float32)
  return jnp.sum(jnp.stack([a.bce_loss for a in depth_aux.values()]))


def depth_summary(depth_aux: dict[int, DepthAux]) -> dict[str, jax.Array]:
  """Per-step metrics: ``mod_aux_loss`` (mean BCE over the routed blocks) and, per
  name of :data:`METRICS`, ``mod_<name>`` f32[n] in block order; {} without routed
  blocks."""
  if not depth_aux:
    return {}
  blocks = [depth_aux[i] for i in sorted(depth_aux)]
  out = {"mod_aux_loss": jnp.mean(jnp.stack([a.bce_loss for a in blocks]))}
  for name in METRICS:
    out[f"mod_{name}"] = jnp.stack([a.metrics[name] for a in blocks])
  return out


def depth_eval_sums(depth_aux: dict[int, DepthAux]) -> dict[str, jax.Array]:
  """An eval batch's MoD metrics, ``"mod_<metric>/layer_<i>"`` scalars (means over
  the batch's tokens, which the evaluation averages weighted by tokens)."""
  return {f"mod_{name}/layer_{i}": a.metrics[name]
          for i, a in depth_aux.items() for name in EVAL_METRICS}


def depth_eval_line(means: dict[str, float]) -> dict[str, Any]:
  """``{"eval_mod_<metric>": {"layer_<i>": value}}`` from :func:`depth_eval_sums`' means."""
  line: dict[str, Any] = {}
  for key, value in means.items():
    if key.startswith("mod_") and "/" in key:
      name, layer = key.split("/", 1)
      line.setdefault(f"eval_{name}", {})[layer] = value
  return line
