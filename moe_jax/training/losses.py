"""The differentiated training loss (of :mod:`moe_jax.training.train` and fine-tuning).

The batch it sees is already the objective's (:mod:`moe_jax.training.objectives` turns
text into inputs, targets and weights); ``training_loss(config)(model, batch)`` is what
the training steps differentiate, for
pretraining (:mod:`moe_jax.training.train`) and fine-tuning
(:mod:`moe_jax.peft.finetune`) alike: CE plus the MoE layers' aux and z losses and the
Mixture-of-Depths predictor loss (and the multi-token prediction loss,
:func:`mtp_loss`), with the coefficients and reduction of the config; with
``loss_chunk`` > 0 the logits are made and scored a chunk of positions at a time
(:func:`chunked_lm_loss`). The
model sees the batch's real tokens (:func:`token_mask`) as the evaluation does: padding
is neither attended to, routed, nor counted in any loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.models.mtp import mtp_targets
from moe_jax.training import depth_metrics, metric_schema

# How the per-layer aux and z losses enter the differentiated loss (moe.loss_reduction).
LOSS_REDUCTIONS = {"sum": jnp.sum, "mean": jnp.mean}


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and token count. logits f32[B, L, V], targets i32[B, L]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       targets)
  if weights is None:
    weights = jnp.ones_like(ce)
  weights = weights.astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(weights)


def chunked_lm_loss(project: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                    targets: jax.Array, weights: jax.Array | None, chunk: int
                    ) -> tuple[jax.Array, jax.Array]:
  """:func:`lm_loss` of ``project(hidden)`` computed ``chunk`` positions of every row
  at a time (a scan; the last chunk padded with weight 0). Each chunk's logits are
  recomputed in the backward pass (``jax.checkpoint``), so f32[B, chunk, V] logits
  are held instead of f32[B, L, V].

  Args:
    project: [B, n, M] normed hidden states -> f32[B, n, V] logits (the model's
      ``output``).
    hidden: [B, L, M]; targets: i32[B, L]; weights: [B, L] or None (all 1).
    chunk: positions per chunk, >= 1.
  """
  b, length = targets.shape
  w = jnp.ones((b, length), jnp.float32) if weights is None else weights.astype(
      jnp.float32)
  n = -(-length // chunk)
  pad = n * chunk - length

  def pieces(x):  # [B, L, ...] -> [n, B, chunk, ...], zero-padded
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def piece(h, t, wt):
    return lm_loss(project(h), t, wt)

  def step(total, xs):
    ce_sum, count = piece(*xs)
    return (total[0] + ce_sum, total[1] + count), None

  zero = jnp.zeros((), jnp.float32)
  (ce_sum, count), _ = jax.lax.scan(step, (zero, zero),
                                    (pieces(hidden), pieces(targets), pieces(w)))
  return ce_sum, count


def token_mask(batch: dict) -> jax.Array | None:
  """bool[B, L]: the real tokens of a batch, what attention and the MoE layers see: its
  ``token_mask`` (a masked-LM batch, whose ``weights`` mark the picked tokens only),
  else ``weights > 0`` (padding has weight 0), else None (every token is real)."""
  if "token_mask" in batch:
    return batch["token_mask"]
  return batch["weights"] > 0 if "weights" in batch else None


def moe_summary(moe_aux: dict) -> dict[str, jax.Array]:
  """The step's MoE metrics of :func:`moe_jax.training.metric_schema.moe_layer_metrics`
  that the layers report: layer means, and ``f32[n, E]`` per-layer vectors in block
  order. Without MoE layers, the :data:`~moe_jax.training.metric_schema.ALWAYS` ones
  are 0."""
  specs = metric_schema.moe_layer_metrics()
  if not moe_aux:
    zero = jnp.zeros((), jnp.float32)
    return {m.name: zero for m in specs if m.when == metric_schema.ALWAYS}
  layers = [moe_aux[i] for i in sorted(moe_aux)]
  fields = {"aux_loss": [a.aux_loss for a in layers],
            "z_loss": [a.z_loss for a in layers]}
  out = {}
  for m in specs:
    if m.name in fields:
      values = fields[m.name]
    elif m.name in layers[0].metrics:  # noop_fraction: MoDE's no-op experts only
      values = [a.metrics[m.name] for a in layers]
    else:
      continue
    out[m.name] = jnp.mean(jnp.stack(values)) if m.layers == "mean" else jnp.stack(values)
  return out


def mtp_loss(mtp_logits: tuple[jax.Array, ...], targets: jax.Array,
             weights: jax.Array | None, coef: float, *,
             project: Callable[[jax.Array], jax.Array] | None = None,
             chunk: int = 0) -> dict[str, jax.Array]:
  """Multi-token prediction (DeepSeek-V3, Sec. 2.2; :mod:`moe_jax.models.mtp`): from
  the D depths' logits f32[B, L, V] and the batch's targets i32[B, L] (and weights),
  ``{"mtp_loss": (coef / D) * sum_k L^k, "mtp_loss/depth_<k>": f32[D] the L^k}``, each
  ``L^k`` the mean CE over depth k's weighted targets (:func:`mtp_targets`). With
  ``chunk`` > 0, ``mtp_logits`` are the depths' normed hidden states instead, which
  ``project`` maps to logits ``chunk`` positions at a time (:func:`chunked_lm_loss`)."""
  per_depth = []
  for k, logits in enumerate(mtp_logits, start=1):
    t, w = mtp_targets(targets, weights, k)
    ce_sum, count = (chunked_lm_loss(project, logits, t, w, chunk) if chunk
                     else lm_loss(logits, t, w))
    per_depth.append(ce_sum / jnp.maximum(count, 1.0))
  per_depth = jnp.stack(per_depth)
  return {"mtp_loss": coef * jnp.mean(per_depth), metric_schema.MTP_DEPTH_LOSS: per_depth}


def training_loss(config) -> Callable[[nnx.Module, dict], tuple[jax.Array, tuple]]:
  """``total, (metrics, choice_counts) = loss(model, batch)``: the differentiated
  training loss of the module docstring, on a model in training mode; ``metrics``
  holds CE as ``loss`` and the MoE summaries, ``choice_counts`` each MoE block's."""
  aux_coef, z_coef = config.moe.aux_loss_coef, config.moe.z_loss_coef
  mod_coef = config.model.get("mod_aux_loss_coef", 0.0)
  mtp_coef = config.model.get("mtp_loss_coef", 0.0)
  reduce = LOSS_REDUCTIONS[config.moe.loss_reduction]
  chunk = config.get("loss_chunk", 0)

  def loss(m, batch, *, num_targets=None, share=1.0, token_share=None):
    """``num_targets``, ``share`` and ``token_share`` serve gradient accumulation, so
    that the microbatches' totals sum to the global batch's: CE is divided by
    ``num_targets`` (f32[], the global batch's target count) instead of this batch's
    own; the aux losses (means over routing groups, as many in every microbatch) are
    scaled by ``share`` (1 / the number of microbatches), the z-losses and predictor
    BCEs and the multi-token prediction loss (means over the real tokens or targets)
    by ``token_share`` (f32[], this batch's share of the global batch's real tokens;
    None: ``share``)."""
    def scaled(x, by=share):
      return x if isinstance(by, float) and by == 1.0 else by * x

    per_token = share if token_share is None else token_share
    out = m.forward(batch["inputs"], deterministic=False, token_mask=token_mask(batch),
                    logits=not chunk)
    moe_aux = out.moe_aux
    if chunk:
      ce_sum, count = chunked_lm_loss(m.output, out.hidden, batch["targets"],
                                      batch.get("weights"), chunk)
    else:
      ce_sum, count = lm_loss(out.logits, batch["targets"], batch.get("weights"))
    ce = ce_sum / jnp.maximum(count if num_targets is None else num_targets, 1.0)
    moe = dict(moe_summary(moe_aux), **depth_metrics.depth_summary(out.depth_aux))
    total = ce + scaled(mod_coef * depth_metrics.depth_loss(out.depth_aux), per_token)
    # The MTP modules' MoE blocks are balanced as the main ones (not in the metrics).
    moe_aux = {**moe_aux, **out.mtp_moe_aux}
    if moe_aux:
      layers = [moe_aux[i] for i in sorted(moe_aux)]
      total = (total + scaled(aux_coef * reduce(jnp.stack([a.aux_loss for a in layers])))
               + scaled(z_coef * reduce(jnp.stack([a.z_loss for a in layers])),
                        per_token))
    if out.mtp_logits:
      mtp = mtp_loss(out.mtp_logits, batch["targets"], batch.get("weights"), mtp_coef,
                     project=m.output, chunk=chunk)
      total = total + scaled(mtp["mtp_loss"], per_token)
      moe.update(mtp)
    choice_counts = {i: a.metrics["choice_counts"] for i, a in moe_aux.items()}
    return total, (dict(moe, loss=ce), choice_counts)

  return loss
