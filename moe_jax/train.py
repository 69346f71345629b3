"""Training library: model and optimizer from a config, jitted steps, the training loop.

``train_and_evaluate(config, workdir)`` runs (or resumes) a run in ``workdir``:

* ``workdir/metrics.jsonl`` and ``workdir/tb``: see :mod:`moe_jax.metrics`;
* ``workdir/checkpoints``: see :mod:`moe_jax.checkpoint` (params, optimizer state,
  selection biases, step, rng and the data iterator's position; re-running resumes);
* ``workdir/config.json``, ``workdir/model_info.json``: the run's config and sizes.

Loss (what is differentiated)::

    loss = CE + aux_loss_coef * R_l(aux_l) + z_loss_coef * R_l(z_l)
              + mod_aux_loss_coef * sum_d BCE_d

with ``R_l`` the sum over the MoE blocks ``l`` for ``moe.loss_reduction="sum"`` (Switch
and ST-MoE: every layer's loss carries the coefficient) or their mean for ``"mean"`` (the
coefficient is shared out over the layers), and ``BCE_d`` the predictor loss of
Mixture-of-Depths routed block ``d`` (:mod:`moe_jax.mod`). ``metrics.jsonl`` reports CE
as ``loss`` and the two layer means, unscaled, as ``aux_loss`` / ``z_loss``, whatever
the reduction (and ``mod_aux_loss``, the mean BCE).

Randomness (jitter, second-expert sampling, dropout) is a pure function of
``(seed, step)``: every step reseeds the model's RNG streams from
``fold_in(key(seed), step)``, so a resumed run draws exactly what an uninterrupted run
draws.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
import zlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import decode, mod, moe_layer, objectives
from moe_jax.checkpoint import Checkpointer
from moe_jax.config import (ConfigError, check_config, default_config, expert_d_ff,
                            model_pattern, pattern_keys)
from moe_jax.evaluation import batch_stderr, evaluate
from moe_jax.layer_pattern import MAMBA
from moe_jax.mamba import NO_WEIGHT_DECAY, MambaConfig
from moe_jax.metrics import MetricsWriter
from moe_jax.moe_layer import MoeConfig, MoeLayer
from moe_jax.losses import LOSS_REDUCTIONS, lm_loss, moe_summary, training_loss  # noqa: F401
from moe_jax.routers import SelectionBias, set_training_step
from moe_jax.sizes import count_params, flops_per_token
from moe_jax.transformer import Transformer, TransformerConfig

__all__ = [
    "TrainState", "TrainingError", "batch_stderr", "count_params", "evaluate",
    "flops_per_token",
    "load_model", "make_eval_step", "make_model", "make_optimizer", "make_train_step",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)

RNG_STREAMS = ("default", "dropout", "jitter", "routing")

class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, unusable work directory, ...)."""


# ------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------


def moe_config(config) -> MoeConfig | None:
  """The MoeConfig of the model's MoE blocks, or None for a dense model.

  The config's ``moe.init_scale`` and ``moe.router_init_scale`` are relative to the
  model-wide ``model.init_scale``; the MoeConfig gets their products (absolute scales).
  """
  if not config.model.moe_every:
    return None
  m = config.moe
  return MoeConfig(
      d_model=config.model.d_model, d_ff=expert_d_ff(config), num_experts=m.num_experts,
      top_k=m.top_k, capacity_factor=m.capacity_factor,
      eval_capacity_factor=m.eval_capacity_factor, group_size=m.group_size,
      min_capacity=m.min_capacity, second_policy=m.second_policy,
      second_threshold=m.second_threshold, normalize_gates=m.normalize_gates,
      batch_priority=m.get("batch_priority", False),
      jitter_noise=m.jitter_noise, expert_dropout=m.expert_dropout,
      activation=config.model.activation,
      init_scale=config.model.init_scale * m.init_scale,
      # Runs from before router_init_scale existed drew the router at moe.init_scale.
      router_init_scale=config.model.init_scale * m.get("router_init_scale",
                                                        m.init_scale),
      dtype=config.model.dtype, dispatch=m.dispatch, router=m.router,
      score_fn=m.score_fn, expert_groups=m.expert_groups, top_groups=m.top_groups,
      gate_scale=m.gate_scale, balance_choices=m.balance_choices,
      bias_update_rate=m.bias_update_rate, num_shared_experts=m.num_shared_experts,
      noise_anneal_steps=m.noise_anneal_steps, ragged_exchange=m.ragged_exchange,
      ragged_buffer_factor=m.ragged_buffer_factor, noop_experts=m.get("noop_experts", 0),
      noop_capacity_factor=m.get("noop_capacity_factor", None))


def mamba_config(config) -> MambaConfig | None:
  """The MambaConfig of the model's Mamba blocks, or None if the pattern has none.

  Its projections take the model-wide ``model.init_scale``.
  """
  if not any(kind.mixer == MAMBA for kind in model_pattern(config)):
    return None
  s = config.mamba
  return MambaConfig(
      d_model=config.model.d_model, d_state=s.d_state, d_conv=s.d_conv,
      expand=s.expand, dt_rank=s.dt_rank, dt_min=s.dt_min, dt_max=s.dt_max,
      inner_norms=s.inner_norms, chunk_size=s.chunk_size,
      init_scale=config.model.init_scale)


def transformer_config(config, vocab_size: int) -> TransformerConfig:
  m = config.model
  period, offset, _, moe_offset = pattern_keys(m)
  return TransformerConfig(
      vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
      num_heads=m.num_heads, d_ff=m.d_ff, max_len=max(config.data.seq_len, 1),
      moe_every=m.moe_every, moe=moe_config(config), activation=m.activation,
      position=m.position, norm=m.norm, dropout=m.dropout, init_scale=m.init_scale,
      tie_embeddings=m.tie_embeddings, dtype=m.dtype, moe_offset=moe_offset,
      attn_layer_period=period, attn_layer_offset=offset, mamba=mamba_config(config),
      mod_every=m.get("mod_every", 0), mod_capacity=m.get("mod_capacity", 0.125),
      mod_predictor=m.get("mod_predictor", "router_bce"),
      causal=objectives.get_objective(config).causal)


def make_model(config, *, vocab_size: int | None = None, seed: int | None = None
               ) -> Transformer:
  """The Transformer of ``config`` (dense if ``model.moe_every == 0``).

  ``vocab_size`` defaults to the byte tokenizer's of the config's objective: 256 bytes
  + PAD/BOS/EOS, + MASK for masked LM.
  """
  seed = config.seed if seed is None else seed
  vocab_size = vocab_size or objectives.get_objective(config).vocab_size
  rngs = nnx.Rngs(params=seed, **{s: seed + 1 + i for i, s in enumerate(RNG_STREAMS)})
  return Transformer(transformer_config(config, vocab_size), rngs=rngs)


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``lr_end_fraction`` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.steps,
      end_value=config.learning_rate * config.lr_end_fraction)


def _decay_mask(params):
  """True where weight decay applies: matrices only (norms' scales and biases stay
  undecayed), and never Mamba's A_log and D (Mamba's ``_no_weight_decay``)."""
  def decay(path, x):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    return x.ndim >= 2 and name not in NO_WEIGHT_DECAY
  return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (default) or Adafactor with the warmup-cosine schedule and global-norm clip."""
  schedule = make_schedule(config)
  if config.optimizer == "adafactor":
    opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=(
        config.weight_decay or None), weight_decay_mask=_decay_mask)
  else:
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  if config.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
  return opt, schedule


# ------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a step changes (and a checkpoint saves).

  Attributes:
    step: i32[] completed updates.
    params: nested dict of parameters (``nnx.State.to_pure_dict()``).
    opt_state: optax state.
    rng: u32[2] raw key data of the run's base key.
    model_state: nested dict of the model's non-trainable state that the step updates
      outside the gradient: the MoE layers' selection biases (:func:`model_state`);
      empty when there are none. Left empty for a model that has some, the step
      starts from the model's own values.
  """

  step: jax.Array
  params: dict[str, Any]
  opt_state: Any
  rng: jax.Array
  model_state: dict[str, Any] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class _StateWithoutModelState:
  """The checkpoint layout of a :class:`TrainState` with an empty ``model_state``, the
  layout every checkpoint had before selection biases existed, so those still resume."""

  step: jax.Array
  params: dict[str, Any]
  opt_state: Any
  rng: jax.Array


def _to_checkpoint(state: TrainState):
  if state.model_state:
    return state
  return _StateWithoutModelState(step=state.step, params=state.params,
                                 opt_state=state.opt_state, rng=state.rng)


def _from_checkpoint(saved) -> TrainState:
  if isinstance(saved, TrainState):
    return saved
  return TrainState(step=saved.step, params=saved.params, opt_state=saved.opt_state,
                    rng=saved.rng)


def _path_salt(path) -> int:
  # Stable across processes (str hash() is salted per interpreter).
  return zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF


def reseed(model: nnx.Module, key: jax.Array) -> None:
  """Points every RNG stream of ``model`` at a key derived from ``key`` and its path."""
  keys = {s: jax.random.fold_in(key, i) for i, s in enumerate(RNG_STREAMS)}
  nnx.reseed(model, policy=lambda path, k, shape: jax.random.fold_in(k, _path_salt(path)),
             **keys)


def _split_model(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params.to_pure_dict(), rest


def model_state(model: nnx.Module) -> dict[str, Any]:
  """The model's selection biases as a nested dict (``TrainState.model_state``)."""
  return nnx.state(model, SelectionBias).to_pure_dict()


def _merge(graphdef, params, rest, model_state_):
  m = nnx.merge(graphdef, params, rest, copy=True)
  if model_state_:
    nnx.update(m, model_state_)
  return m


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation, config, *,
                    state_sharding=None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``state, metrics = train_step(state, batch)``, jitted, donating ``state``.

  ``batch`` is ``{"inputs": i32[B, L], "targets": i32[B, L]}`` (optional ``weights``),
  which the config's objective turns into what the model sees and what is scored
  (:mod:`moe_jax.objectives`). ``state_sharding`` (a pytree of shardings like the
  state) fixes the output layout.
  """
  graphdef, _, rest = _split_model(model)
  objective = objectives.get_objective(config)
  initial_model_state = model_state(model)
  loss = training_loss(config)

  def loss_fn(params, model_state_, batch, key, step):
    m = _merge(graphdef, params, rest, model_state_)
    reseed(m, key)
    set_training_step(m, step)
    return loss(m, batch)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = objective.train_batch(batch, key)
    model_state_ = state.model_state or initial_model_state
    grads, (metrics, choice_counts) = jax.grad(loss_fn, has_aux=True)(
        state.params, model_state_, batch, key, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_norm"] = optax.global_norm(updates)
    if model_state_:
      # DeepSeek-V3: after the optimizer step, each selection bias moves towards
      # balance by this step's choice counts; jit sums them over the global batch.
      m = _merge(graphdef, params, rest, model_state_)
      m.update_selection_biases(choice_counts)
      model_state_ = model_state(m)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state_)
    return new_state, metrics

  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None))


def make_eval_step(model: nnx.Module) -> Callable[[dict, dict], dict]:
  """``sums = eval_step(params, batch, model_state=None)``: summed CE (nats), token and
  byte counts, MoE metrics; deterministic (no jitter or dropout;
  ``eval_capacity_factor``). ``model_state`` (``TrainState.model_state``) replaces the
  model's selection biases.

  A batch's ``weights`` (f32[B, L], optional) weight the targets; tokens of weight 0
  are padding, which the MoE layers neither route nor count, unless ``token_mask``
  (bool[B, L], a masked-LM batch) says which tokens are real."""
  graphdef, _, rest = _split_model(model)

  def eval_step(params, batch, model_state=None):  # pylint: disable=redefined-outer-name
    m = _merge(graphdef, params, rest, model_state)
    mask = batch.get("token_mask", batch["weights"] > 0 if "weights" in batch else None)
    out = m.forward(batch["inputs"], deterministic=True, token_mask=mask)
    logits, moe_aux = out.logits, out.moe_aux
    ce_sum, count = lm_loss(logits, batch["targets"], batch.get("weights"))
    is_byte = (batch["targets"] < 256).astype(jnp.float32)
    if "weights" in batch:
      is_byte = is_byte * batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    moe = moe_summary(moe_aux)
    sums = {"nats": ce_sum, "tokens": count, "byte_nats": jnp.sum(ce * is_byte),
            "bytes": jnp.sum(is_byte), "aux_loss": moe["aux_loss"],
            "dropped_fraction": moe["dropped_fraction"], **mod.eval_sums(out.depth_aux)}
    if out.depth_aux:  # the causal loss: routed blocks route with their predictors
      causal, _ = m(batch["inputs"], deterministic=True, token_mask=mask,
                    use_predictor=True)
      sums["predictor_nats"] = lm_loss(causal, batch["targets"], batch.get("weights"))[0]
    return sums

  return jax.jit(eval_step)


def single_device_copy(model: Transformer) -> Transformer:
  """A host copy of ``model`` with MoE layers laid out for one device (for sampling)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(_gather_to_host, state)
  copy = nnx.merge(graphdef, state)
  for _, module in nnx.iter_modules(copy):
    if isinstance(module, MoeLayer):
      module.layout = moe_layer.SINGLE_DEVICE
  return copy


def _gather_to_host(x):
  if not isinstance(x, jax.Array):
    return x
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.device_put(x, jax.local_devices()[0])


def load_config(workdir: str):
  """The ConfigDict a run in ``workdir`` was started with (``workdir/config.json``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise TrainingError(f"--workdir={workdir!r} holds no run (no config.json); train "
                        "first with experiments/train.py.")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  # Keys added since the run started take their defaults (which reproduce the old model).
  config = default_config()
  _update_known(config, saved)
  return config


def _update_known(node, values: dict) -> None:
  for k, v in values.items():
    if isinstance(v, dict) and k in node and hasattr(node[k], "items"):
      _update_known(node[k], v)
    else:
      node[k] = v


def load_model(workdir: str, *, vocab_size: int | None = None
               ) -> tuple[Transformer, Any, int]:
  """``(model, config, step)`` from the latest readable checkpoint of a run."""
  config = load_config(workdir)
  model = make_model(config, vocab_size=vocab_size)
  tx, _ = make_optimizer(config)
  graphdef, params, rest = _split_model(model)
  abstract = jax.eval_shape(lambda p, s: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0)), model_state=s), params,
      model_state(model))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  try:
    restored = checkpointer.restore(_to_checkpoint(abstract))
  finally:
    checkpointer.close()
  if restored is None:
    raise TrainingError(f"--workdir={workdir!r} has no checkpoint yet.")
  step, state, _ = restored
  state = _from_checkpoint(state)
  return _merge(graphdef, state.params, rest, state.model_state), config, step


# ------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------


class _Accumulator:
  """Sums of per-step metrics over one logging interval (saved in checkpoints)."""

  def __init__(self, state: dict | None = None):
    state = state or {}
    self.sums: dict[str, Any] = {k: (np.asarray(v) if isinstance(v, list) else v)
                                 for k, v in state.get("sums", {}).items()}
    self.count: int = state.get("count", 0)
    self.time: float = state.get("time", 0.0)
    self.timed_tokens: int = state.get("timed_tokens", 0)

  def add(self, metrics: dict[str, Any]) -> None:
    for k, v in metrics.items():
      v = np.asarray(v, np.float64)
      v = float(v) if v.ndim == 0 else v
      self.sums[k] = self.sums[k] + v if k in self.sums else v
    self.count += 1

  def means(self) -> dict[str, Any]:
    return {k: v / self.count for k, v in self.sums.items()}

  def state(self) -> dict:
    return {"sums": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                     for k, v in self.sums.items()},
            "count": self.count, "time": self.time, "timed_tokens": self.timed_tokens}


def _prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError([f"--workdir={workdir!r} cannot be created ({e.strerror}); pick a "
                       "writable directory."]) from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError([f"--workdir={workdir!r} is not writable; pick a writable "
                       "directory."])
  return workdir


def _train_line(means: dict, moe_blocks: tuple[int, ...],
                mod_blocks: tuple[int, ...] = ()) -> dict[str, Any]:
  line = {k: means[k] for k in ("loss", "aux_loss", "z_loss", "dropped_fraction",
                                "grad_norm")}
  for k in ("router_confidence", "router_entropy", "second_kept_fraction",
            "noop_fraction"):
    if k in means:
      line[k] = means[k]
  if "expert_load" in means:
    line["expert_load"] = {f"layer_{b}": means["expert_load"][i]
                           for i, b in enumerate(moe_blocks)}
    line["expert_fill"] = {f"layer_{b}": means["expert_fill"][i]
                           for i, b in enumerate(moe_blocks)}
  line.update(mod.train_line(means, mod_blocks))
  return line


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _fmt(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def model_info(model: Transformer, seq_len: int) -> dict[str, Any]:
  params = count_params(model)
  flops = flops_per_token(model, seq_len)
  return {"params_total": params["total"], "params_active": params["active"],
          "params_experts": params["experts"],
          "flops_per_token_total": flops["total"],
          "flops_per_token_active": flops["active"],
          "flops_per_token_router": flops["router"],
          "moe_blocks": list(model.cfg.moe_blocks),
          "mamba_blocks": list(model.cfg.mamba_blocks),
          "mod_blocks": list(model.cfg.mod_blocks)}


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None
                       ) -> dict[str, Any]:
  """Trains (or resumes) ``config`` in ``workdir``; returns a summary dict.

  ``stop_at_step`` stops after that step as a preemption would (checkpoint, return),
  for time-boxed jobs and for testing that a resumed run matches an uninterrupted one.

  The summary has ``step``, ``preempted``, the last train and eval lines, ``sample``
  and ``model_info``.

  Raises:
    ConfigError: bad config or work directory (before anything is traced).
    CheckpointError: the work directory holds checkpoints none of which is readable.
    TrainingError: the loss became non-finite (the last good checkpoint is kept).
  """
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, stop_at_step, preemption)


def _train_and_evaluate(config, workdir, stop_at_step, preemption) -> dict[str, Any]:
  check_config(config, num_devices=None)
  if config.distributed:
    from moe_jax import sharding  # pylint: disable=import-outside-toplevel
    sharding.initialize_distributed()
  check_config(config, num_devices=jax.device_count(),
               process_count=jax.process_count())
  workdir = _prepare_workdir(workdir)

  from moe_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moe_jax import sharding  # pylint: disable=import-outside-toplevel

  primary = jax.process_index() == 0
  if primary:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))

  objective = objectives.get_objective(config)
  data = data_lib.make_lm_datasets(
      config.data.name, data_dir=config.data.data_dir, seq_len=config.data.seq_len,
      batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  tokenizer = data.tokenizer

  model = make_model(config, vocab_size=objective.vocab_size)
  info = dict(model_info(model, config.data.seq_len), objective=objective.name)
  routed = (f"top-{config.moe.top_k}" if config.moe.router == "topk" else
            f"{config.moe.router}, {_moe_layers(model)[0].experts_per_token:g} "
            "experts per token")
  kind = (f"MoE ({len(info['moe_blocks'])} of {config.model.num_layers} blocks, "
          f"{config.moe.num_experts} experts, {routed})"
          if info["moe_blocks"] else "dense")
  if info["mod_blocks"]:
    kind += (f", Mixture-of-Depths ({len(info['mod_blocks'])} routed blocks at "
             f"capacity {config.model.mod_capacity:g})")
  if info["mamba_blocks"]:
    mamba = len(info["mamba_blocks"])
    kind += (f", {config.model.num_layers - mamba} attention + {mamba} Mamba "
             "blocks")
  _print(f"Objective: {objective.description}.\nModel: {kind}; params {_fmt(info['params_total'])} total / "
         f"{_fmt(info['params_active'])} active per token; forward FLOPs/token "
         f"{_fmt(info['flops_per_token_total'])} total / "
         f"{_fmt(info['flops_per_token_active'])} active"
         + (f" (+{_fmt(info['flops_per_token_router'])} router)"
            if info["flops_per_token_router"] else ""))
  if primary:
    with open(os.path.join(workdir, "model_info.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model)
  sharding.shard_model(model, mesh)
  tx, schedule = make_optimizer(config)
  _, params, _ = _split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=jax.jit(tx.init)(params),
                     rng=jax.random.key_data(jax.random.key(config.seed)),
                     model_state=model_state(model))
  # Pin every leaf's sharding (parameters as shard_model placed them, the rest
  # replicated) and make the step keep it, so the second step does not recompile.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sharding = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
      else replicated, state)
  state = jax.device_put(state, state_sharding)

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  train_iter = data.train_iter()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpointer.restore(_to_checkpoint(abstract), data_iterator=train_iter)
  meta: dict[str, Any] = {}
  if restored is not None:
    step0, state, meta = restored
    state = _from_checkpoint(state)
    _print(f"Resuming from the checkpoint at step {step0} in {checkpointer.directory}.")
  else:
    step0 = 0
  if step0 >= config.steps:
    _print(f"Already trained to step {step0} >= steps={config.steps}; nothing to do.")

  writer = MetricsWriter(workdir, resume_step=step0, enabled=primary,
                         tags={"objective": objective.name})
  if primary and step0 == 0:
    writer.write_text("model_info", json.dumps(info), 0)
  train_step = make_train_step(model, tx, config, state_sharding=state_sharding)
  eval_step = make_eval_step(model)
  acc = _Accumulator(meta.get("accumulator"))
  elapsed_before = float(meta.get("elapsed_sec", 0.0))
  t_start = time.perf_counter()
  tokens_per_step = config.batch_size * config.data.seq_len
  moe_blocks = model.cfg.moe_blocks
  summary: dict[str, Any] = {"model_info": info, "preempted": False, "train": None,
                             "eval": None, "sample": None}

  def save(step: int) -> None:
    checkpointer.save(step, _to_checkpoint(state), data_iterator=train_iter, meta={
        "accumulator": acc.state(),
        "elapsed_sec": elapsed_before + time.perf_counter() - t_start})

  def run_eval(step: int) -> None:
    num_steps = config.eval_steps
    if step == config.steps and config.get("final_eval_steps") is not None:
      num_steps = config.final_eval_steps
    batches = objective.eval_batches(sharding.shard_batch(b, mesh)
                                     for b in data.eval_iter(num_steps=num_steps or None))
    values = evaluate(functools.partial(eval_step, model_state=state.model_state),
                      state.params, batches)
    summary["eval"] = writer.write("eval", step, values)
    if primary:
      pbar.write(f"step {step}: eval_loss {values['eval_loss']:.4f} ± "
                 f"{values['eval_loss_stderr']:.4f} over {values['eval_tokens']:,} tokens, "
                 f"bits/byte {values['eval_bits_per_byte']:.3f}")

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  pbar = tqdm(total=config.steps, initial=min(step0, config.steps), unit="step",
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
              disable=not (primary and config.progress_bar))
  first = True
  step = step0
  last_saved = step0
  try:
    for step in range(step0 + 1, config.steps + 1):
      t0 = time.perf_counter()
      batch = sharding.shard_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      metrics = jax.device_get(metrics)
      dt = time.perf_counter() - t0
      # A finite loss with a non-finite update would save NaN parameters next.
      if not all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm")):
        good = checkpointer.latest_step()
        raise TrainingError(
            f"Non-finite loss at step {step} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}, "
            f"update_norm={float(metrics['update_norm'])}); stopping. "
            + (f"The last good checkpoint (step {good}) is kept; "
               if good is not None else "No checkpoint was saved yet; ")
            + "lower --config.learning_rate or enable --config.grad_clip.")
      acc.add(metrics)
      if first:
        first = False  # the step that compiled is left out of tokens/sec
      else:
        acc.time += dt
        acc.timed_tokens += tokens_per_step
      if primary:
        pbar.update(1)
        tps = acc.timed_tokens / acc.time if acc.time else float("nan")
        pbar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tps:,.0f}",
                         refresh=False)
      if step % config.log_every == 0 or step == config.steps:
        line = _train_line(acc.means(), moe_blocks, model.cfg.mod_blocks)
        line["tokens_per_sec"] = (acc.timed_tokens / acc.time if acc.time
                                  else float("nan"))
        line["elapsed_sec"] = elapsed_before + time.perf_counter() - t_start
        line["learning_rate"] = float(schedule(step - 1))
        summary["train"] = writer.write("train", step, line)
        acc = _Accumulator()
      if step % config.eval_every == 0 or step == config.steps:
        run_eval(step)
      if step % config.checkpoint_every == 0 or step == config.steps:
        save(step)
        last_saved = step
      if preemption.requested or step == stop_at_step:
        if last_saved != step:
          save(step)
          last_saved = step
        summary["preempted"] = True
        why = "Preempted (SIGTERM)" if preemption.requested else "Stopped early"
        _print(f"\n{why}: saved the checkpoint at step {step}; re-run the same "
               "command to resume.")
        break
  finally:
    pbar.close()
    writer.flush()
    checkpointer.close()

  summary["step"] = step
  if not summary["preempted"] and summary["eval"] and step > step0:
    ev = summary["eval"]
    _print(f"Finished step {step} in {elapsed_before + time.perf_counter() - t_start:.0f}s"
           f" of training: eval_loss {ev['eval_loss']:.4f} (perplexity "
           f"{ev['eval_perplexity']:.2f}, {ev['eval_bits_per_byte']:.3f} bits/byte).")
  if not summary["preempted"] and config.sample.length and step >= config.steps:
    s = config.sample
    sampler = single_device_copy(_merge(*_merge_parts(model, state.params),
                                        state.model_state))
    if primary:
      prompt = tokenizer.encode(s.prompt) if s.prompt else np.array([tokenizer.eos_id])
      window = max(config.data.seq_len, 2)
      try:
        ids = decode.generate(sampler, [prompt[-window:]], s.length, max_len=window,
                              temperature=s.temperature, top_k=s.top_k,
                              seed=config.seed)[0]
      except ConfigError as e:  # a model that cannot decode (a non-causal router)
        _print(f"\nNo sample: {e}")
      else:
        text = s.prompt + tokenizer.decode(ids)
        summary["sample"] = text
        writer.write_text("sample", text, step)
        _print(f"\nSample at step {step} (temperature {s.temperature}, top-k "
               f"{s.top_k}):\n{text}")
  writer.close()
  return summary


def _moe_layers(model: nnx.Module) -> list[MoeLayer]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoeLayer)]


def _merge_parts(model: nnx.Module, params: dict):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest
