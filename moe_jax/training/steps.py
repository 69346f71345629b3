"""The jitted steps of a run: :func:`make_train_step` (forward, loss, backward, the
update; gradient accumulation over microbatches; the selection biases' update),
:func:`make_eval_step` (one batch's evaluation sums) and :func:`init_train_state` (the
train state placed on the mesh). :func:`moe_jax.training.train.run_training` is the
loop around them; the planner compiles the same train step for accelerators.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.layers.router_families import set_training_step
from moe_jax.training import depth_metrics, evaluation, metric_schema, objectives
from moe_jax.training.losses import lm_loss, moe_summary, token_mask, training_loss
from moe_jax.training.run_state import (TrainState, merge_model, model_state, reseed,
                                        split_model, split_trainable)


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation, config, *,
                    wrt: Any = nnx.Param, apply_gradients: Callable | None = None,
                    routing_step: int | None = None, state_sharding=None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """``state, metrics = train_step(state, batch, frozen=None)``, jitted, donating
  ``state``: the one step of pretraining and fine-tuning.

  ``batch`` is ``{"inputs": i32[B, L], "targets": i32[B, L]}`` (optional ``weights``),
  which the config's objective turns into what the model sees and what is scored
  (:mod:`moe_jax.training.objectives`). ``state.params`` holds the parameters the nnx
  filter ``wrt`` takes (all of them by default), ``frozen`` the others
  (:func:`moe_jax.training.run_state.split_trainable`; an argument, not constants baked
  into the program). ``apply_gradients(tx, grads, opt_state, params)`` returns
  ``(params, opt_state, grads, updates)`` (default: ``tx``'s update, applied; ESFT
  masks frozen rows), ``grad_norm`` being the norm of the returned ``grads``.
  ``routing_step`` fixes the step the routers see (noise annealing; default the
  state's step). ``state_sharding`` (a pytree of shardings like the state) fixes the
  output layout.

  With ``grad_accum_steps`` n > 1 the batch is split into n microbatches
  (:func:`split_microbatches`, after the objective's masking) that run forward and
  backward one after the other inside the step (``lax.scan``, so only one
  microbatch's activations are live), microbatch ``j`` drawing its randomness from
  ``fold_in(step key, j)``; their gradients add up to the global batch's (CE over the
  global batch's targets, the other losses averaged), and one optimizer update
  follows. Selection biases (DeepSeek-V3's auxiliary-loss-free balancing) move after
  the optimizer step, once, by the choice counts of the global batch.
  """
  graphdef, _, _, rest = split_trainable(model, wrt)
  objective = objectives.get_objective(config)
  initial_model_state = model_state(model)
  loss = training_loss(config)
  accum = config.get("grad_accum_steps", 1)
  shards = config.mesh.data * config.mesh.get("fsdp", 1) * config.mesh.expert
  apply_gradients = apply_gradients or _apply_gradients

  def merged(params, frozen, model_state_):
    m = nnx.merge(graphdef, params, frozen, rest, copy=True)
    if model_state_:
      nnx.update(m, model_state_)
    return m

  def loss_fn(params, frozen, model_state_, batch, key, step, **kwargs):
    m = merged(params, frozen, model_state_)
    reseed(m, key)
    set_training_step(m, step if routing_step is None else routing_step)
    return loss(m, batch, **kwargs)

  def accumulated_grads(params, frozen, model_state_, batch, key, step):
    """The gradients, metrics and choice counts of the global batch from ``accum``
    microbatches, one forward and backward pass at a time (``lax.scan``)."""
    micro = split_microbatches(batch, accum, shards)
    if "weights" in batch:
      num_targets = jnp.sum(batch["weights"].astype(jnp.float32))
    else:
      num_targets = jnp.asarray(batch["targets"].size, jnp.float32)
    # Each microbatch's share of the real tokens: the weight of its token means.
    mask = token_mask(micro)
    real = (jnp.sum(mask.astype(jnp.float32), axis=(1, 2)) if mask is not None
            else jnp.ones((accum,), jnp.float32))
    token_share = jnp.where(jnp.sum(real) > 0, real / jnp.maximum(jnp.sum(real), 1.0),
                            1.0 / accum)

    def body(grads, xs):
      index, mb, share = xs
      g, (metrics, counts) = jax.grad(loss_fn, has_aux=True)(
          params, frozen, model_state_, mb, jax.random.fold_in(key, index), step,
          num_targets=num_targets, share=1.0 / accum, token_share=share)
      return jax.tree.map(jnp.add, grads, g), (metrics, counts)

    # Summed in float32 whatever the parameter dtype (bfloat16 parameters give
    # bfloat16 gradients; the optimizer reads them in float32 anyway).
    zeros = jax.tree.map(
        lambda p: jnp.zeros_like(p, jnp.promote_types(p.dtype, jnp.float32)), params)
    grads, (metrics, counts) = jax.lax.scan(
        body, zeros, (jnp.arange(accum), micro, token_share))
    # CE is already each microbatch's share of the global batch's; the aux loss and
    # the expert fill (means over routing groups and their slots; the schema's
    # microbatch means) average, the metrics
    # over real tokens weigh each
    # microbatch by its real tokens (a standard deviation is pooled from the
    # microbatches' moments), and the choice counts add up.
    stacked = metrics

    def weighted(v):
      return jnp.tensordot(token_share, v, axes=1)

    metrics = {k: jnp.sum(v, 0) if k == "loss" else
               jnp.mean(v, 0) if k in metric_schema.microbatch_means() else weighted(v)
               for k, v in stacked.items()}
    if "mod_router_std" in stacked:
      mean, std = stacked["mod_router_mean"], stacked["mod_router_std"]
      metrics["mod_router_std"] = jnp.sqrt(jnp.maximum(
          weighted(std * std + mean * mean) - metrics["mod_router_mean"] ** 2, 0.0))
    return grads, (metrics, jax.tree.map(lambda c: jnp.sum(c, 0), counts))

  def train_step(state: TrainState, batch, frozen=None):
    frozen = frozen or {}
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = objective.train_batch(batch, key)
    model_state_ = state.model_state or initial_model_state
    if accum == 1:
      grads, (metrics, choice_counts) = jax.grad(loss_fn, has_aux=True)(
          state.params, frozen, model_state_, batch, key, state.step)
    else:
      grads, (metrics, choice_counts) = accumulated_grads(
          state.params, frozen, model_state_, batch, key, state.step)
    params, opt_state, grads, updates = apply_gradients(tx, grads, state.opt_state,
                                                        state.params)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_norm"] = optax.global_norm(updates)
    if model_state_:
      # DeepSeek-V3: after the optimizer step, each selection bias moves towards
      # balance by this step's choice counts; jit sums them over the global batch.
      m = merged(params, frozen, model_state_)
      m.update_selection_biases(choice_counts)
      model_state_ = model_state(m)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state_)
    return new_state, metrics

  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None))


def _apply_gradients(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, grads, updates


def split_microbatches(batch: dict, num: int, shards: int = 1) -> dict:
  """``{key: [B, ...]}`` -> ``{key: [num, B / num, ...]}``: microbatch ``j`` takes the
  ``j``-th of ``num`` consecutive slices of every one of the ``shards`` equal parts of
  the batch (the data-parallel devices' rows), so each microbatch spreads over the
  devices as the batch does and keeps its rows' order (a routing group of several
  sequences stays the same group)."""
  def split(x):
    rows = x.shape[0]
    if rows % (shards * num):
      raise ValueError(f"a batch of {rows} rows does not split into {num} microbatches "
                       f"on each of {shards} data-parallel devices.")
    x = x.reshape((shards, num, rows // (shards * num)) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((num, rows // num) + x.shape[3:])
  return jax.tree.map(split, batch)


def make_eval_step(model: nnx.Module) -> Callable[[dict, dict], dict]:
  """``sums = eval_step(params, batch, model_state=None)``: summed CE (nats), token and
  byte counts, MoE metrics; deterministic (no jitter or dropout;
  ``eval_capacity_factor``). ``model_state`` (``TrainState.model_state``) replaces the
  model's selection biases.

  A batch's ``weights`` (f32[B, L], optional) weight the targets; tokens of weight 0
  are padding, which the MoE layers neither route nor count, unless ``token_mask``
  (bool[B, L], a masked-LM batch) says which tokens are real."""
  graphdef, _, rest = split_model(model)

  def eval_step(params, batch, model_state=None):  # pylint: disable=redefined-outer-name
    m = merge_model(graphdef, params, rest, model_state)
    mask = token_mask(batch)
    # The main model's loss only: the multi-token prediction modules do not run.
    out = m.forward(batch["inputs"], deterministic=True, token_mask=mask, with_mtp=False)
    logits, moe_aux = out.logits, out.moe_aux
    ce_sum, count = lm_loss(logits, batch["targets"], batch.get("weights"))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    byte_nats, num_bytes = evaluation.byte_sums(ce, batch["targets"], batch.get("weights"),
                                                batch.get("target_bytes"))
    moe = moe_summary(moe_aux)
    sums = {"nats": ce_sum, "tokens": count, "byte_nats": byte_nats, "bytes": num_bytes,
            **{k: moe[k] for k in metric_schema.eval_layer_means()},
            **depth_metrics.depth_eval_sums(out.depth_aux)}
    if out.depth_aux:  # the causal loss: routed blocks route with their predictors
      causal, _ = m(batch["inputs"], deterministic=True, token_mask=mask,
                    use_predictor=True)
      sums["predictor_nats"] = lm_loss(causal, batch["targets"], batch.get("weights"))[0]
    return sums

  return jax.jit(eval_step)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh=None,
                     seed: int = 0, *, wrt: Any = nnx.Param
                     ) -> tuple[TrainState, Any]:
  """``(state, state_sharding)``: a run's first state and the sharding of every leaf,
  which the train step keeps and a checkpoint is restored to.

  ``state.params`` are the parameters the nnx filter ``wrt`` takes (all by default).
  ``mesh`` None: one device (the first). Otherwise ``model`` is placed on ``mesh``
  already (:func:`moe_jax.models.param_sharding.shard_model`). The parameters keep
  their shardings; the optimizer state follows them
  (:func:`moe_jax.parallel.optimizer_sharding.optimizer_state_sharding`: each expert's moments
  live on the devices that hold the expert); everything else (step, rng, selection
  biases, scalar statistics) is replicated.
  """
  from moe_jax.parallel import optimizer_sharding  # pylint: disable=import-outside-toplevel
  _, params, _, _ = split_trainable(model, wrt)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer_sharding.init_optimizer_state(tx, params),
                     rng=jax.random.key_data(jax.random.key(seed)),
                     model_state=model_state(model))
  # Pin every leaf's sharding (parameters as shard_model placed them, the optimizer
  # state like them, the rest replicated) and make the step keep it, so the second
  # step does not recompile.
  replicated = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state_sharding = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
      else replicated, state)
  return jax.device_put(state, state_sharding), state_sharding
