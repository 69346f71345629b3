"""Training library: model and optimizer from a config, jitted steps, the training loop.

``train_and_evaluate(config, workdir)`` runs (or resumes) a run in ``workdir``:

* ``workdir/metrics.jsonl`` and ``workdir/tb``: see :mod:`moe_jax.metrics`;
* ``workdir/checkpoints``: see :mod:`moe_jax.checkpoint` (params, optimizer state, step,
  rng and the data iterator's position; re-running resumes);
* ``workdir/config.json``, ``workdir/model_info.json``: the run's config and sizes.

Loss (what is differentiated)::

    loss = CE + aux_loss_coef * mean_l(aux_l) + z_loss_coef * mean_l(z_l)

with the mean over the MoE blocks ``l`` (not the sum), so the coefficients mean the same
whatever the depth; ``metrics.jsonl`` reports CE as ``loss`` and the two layer means
unscaled as ``aux_loss`` / ``z_loss``.

Randomness (jitter, second-expert sampling, dropout) is a pure function of
``(seed, step)``: every step reseeds the model's RNG streams from
``fold_in(key(seed), step)``, so a resumed run draws exactly what an uninterrupted run
draws.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import zlib
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import decode, moe_layer
from moe_jax.checkpoint import Checkpointer
from moe_jax.config import ConfigError, check_config
from moe_jax.metrics import MetricsWriter
from moe_jax.moe_layer import MoeConfig, MoeLayer
from moe_jax.transformer import (Transformer, TransformerConfig, count_params,
                                 flops_per_token)

__all__ = [
    "TrainState", "TrainingError", "count_params", "evaluate", "flops_per_token",
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
  """The MoeConfig of the model's MoE blocks, or None for a dense model."""
  if not config.model.moe_every:
    return None
  m = config.moe
  return MoeConfig(
      d_model=config.model.d_model, d_ff=config.model.d_ff, num_experts=m.num_experts,
      top_k=m.top_k, capacity_factor=m.capacity_factor,
      eval_capacity_factor=m.eval_capacity_factor, group_size=m.group_size,
      min_capacity=m.min_capacity, second_policy=m.second_policy,
      second_threshold=m.second_threshold, normalize_gates=m.normalize_gates,
      jitter_noise=m.jitter_noise, expert_dropout=m.expert_dropout,
      activation=config.model.activation, init_scale=m.init_scale,
      dtype=config.model.dtype, dispatch=m.dispatch)


def transformer_config(config, vocab_size: int) -> TransformerConfig:
  m = config.model
  return TransformerConfig(
      vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
      num_heads=m.num_heads, d_ff=m.d_ff, max_len=max(config.data.seq_len, 1),
      moe_every=m.moe_every, moe=moe_config(config), activation=m.activation,
      position=m.position, norm=m.norm, dropout=m.dropout, init_scale=m.init_scale,
      tie_embeddings=m.tie_embeddings, dtype=m.dtype)


def make_model(config, *, vocab_size: int = 259, seed: int | None = None) -> Transformer:
  """The Transformer of ``config`` (dense if ``model.moe_every == 0``).

  ``vocab_size`` defaults to the byte tokenizer's 256 bytes + PAD/BOS/EOS.
  """
  seed = config.seed if seed is None else seed
  rngs = nnx.Rngs(params=seed, **{s: seed + 1 + i for i, s in enumerate(RNG_STREAMS)})
  return Transformer(transformer_config(config, vocab_size), rngs=rngs)


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``lr_end_fraction`` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.steps,
      end_value=config.learning_rate * config.lr_end_fraction)


def _decay_mask(params):
  # Weight decay on matrices only; norms' scales stay undecayed.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


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
  """

  step: jax.Array
  params: dict[str, Any]
  opt_state: Any
  rng: jax.Array


def _path_salt(path) -> int:
  # Stable across processes (str hash() is salted per interpreter).
  return zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF


def reseed(model: nnx.Module, key: jax.Array) -> None:
  """Points every RNG stream of ``model`` at a key derived from ``key`` and its path."""
  keys = {s: jax.random.fold_in(key, i) for i, s in enumerate(RNG_STREAMS)}
  nnx.reseed(model, policy=lambda path, k, shape: jax.random.fold_in(k, _path_salt(path)),
             **keys)


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and token count. logits f32[B, L, V], targets i32[B, L]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       targets)
  if weights is None:
    weights = jnp.ones_like(ce)
  weights = weights.astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(weights)


def _moe_summary(moe_aux: dict) -> dict[str, jax.Array]:
  """Layer means of the MoE losses and scalar metrics, plus per-layer expert load."""
  if not moe_aux:
    zero = jnp.zeros((), jnp.float32)
    return {"aux_loss": zero, "z_loss": zero, "dropped_fraction": zero}
  layers = [moe_aux[i] for i in sorted(moe_aux)]
  out = {"aux_loss": jnp.mean(jnp.stack([a.aux_loss for a in layers])),
         "z_loss": jnp.mean(jnp.stack([a.z_loss for a in layers]))}
  for name in ("dropped_fraction", "router_confidence", "router_entropy",
               "second_kept_fraction"):
    out[name] = jnp.mean(jnp.stack([a.metrics[name] for a in layers]))
  out["expert_load"] = jnp.stack([a.metrics["expert_load"] for a in layers])  # [n, E]
  out["expert_fill"] = jnp.stack([a.metrics["expert_fill"] for a in layers])
  return out


def _split_model(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params.to_pure_dict(), rest


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation, config, *,
                    state_sharding=None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``state, metrics = train_step(state, batch)``, jitted, donating ``state``.

  ``batch`` is ``{"inputs": i32[B, L], "targets": i32[B, L]}`` (optional ``weights``).
  ``state_sharding`` (a pytree of shardings like the state) fixes the output layout.
  """
  graphdef, _, rest = _split_model(model)
  aux_coef, z_coef = config.moe.aux_loss_coef, config.moe.z_loss_coef

  def loss_fn(params, batch, key):
    m = nnx.merge(graphdef, params, rest, copy=True)
    reseed(m, key)
    logits, moe_aux = m(batch["inputs"], deterministic=False)
    ce_sum, count = lm_loss(logits, batch["targets"], batch.get("weights"))
    ce = ce_sum / jnp.maximum(count, 1.0)
    moe = _moe_summary(moe_aux)
    total = ce + aux_coef * moe["aux_loss"] + z_coef * moe["z_loss"]
    return total, dict(moe, loss=ce)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_norm"] = optax.global_norm(updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None))


def make_eval_step(model: nnx.Module) -> Callable[[dict, dict], dict]:
  """``sums = eval_step(params, batch)``: summed CE (nats), token and byte counts, MoE
  metrics; deterministic (no jitter or dropout; ``eval_capacity_factor``)."""
  graphdef, _, rest = _split_model(model)

  def eval_step(params, batch):
    m = nnx.merge(graphdef, params, rest, copy=True)
    logits, moe_aux = m(batch["inputs"], deterministic=True)
    ce_sum, count = lm_loss(logits, batch["targets"], batch.get("weights"))
    is_byte = (batch["targets"] < 256).astype(jnp.float32)
    if "weights" in batch:
      is_byte = is_byte * batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    moe = _moe_summary(moe_aux)
    return {"nats": ce_sum, "tokens": count, "byte_nats": jnp.sum(ce * is_byte),
            "bytes": jnp.sum(is_byte), "aux_loss": moe["aux_loss"],
            "dropped_fraction": moe["dropped_fraction"]}

  return jax.jit(eval_step)


def evaluate(eval_step, params, batches: Iterator[dict]) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches``; returns the eval line's values.

  ``eval_loss`` is the mean CE (nats) over all target tokens, ``eval_perplexity`` its
  exp, and ``eval_bits_per_byte`` the CE over byte targets only (the EOS separators
  are not bytes) in bits.
  """
  totals: dict[str, float] = {}
  n = 0
  for batch in batches:
    out = jax.device_get(eval_step(params, batch))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
  if not n:
    return {}
  loss = totals["nats"] / max(totals["tokens"], 1.0)
  return {
      "eval_loss": loss,
      "eval_perplexity": math.exp(min(loss, 700.0)),
      "eval_bits_per_byte": totals["byte_nats"] / max(totals["bytes"], 1.0) / math.log(2),
      "eval_aux_loss": totals["aux_loss"] / n,
      "eval_dropped_fraction": totals["dropped_fraction"] / n,
      "eval_batches": n,
  }


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
  import ml_collections  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise TrainingError(f"--workdir={workdir!r} holds no run (no config.json); train "
                        "first with experiments/train.py.")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def load_model(workdir: str, *, vocab_size: int = 259) -> tuple[Transformer, Any, int]:
  """``(model, config, step)`` from the latest readable checkpoint of a run."""
  config = load_config(workdir)
  model = make_model(config, vocab_size=vocab_size)
  tx, _ = make_optimizer(config)
  graphdef, params, rest = _split_model(model)
  abstract = jax.eval_shape(lambda p: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0))), params)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  try:
    restored = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise TrainingError(f"--workdir={workdir!r} has no checkpoint yet.")
  step, state, _ = restored
  return nnx.merge(graphdef, state.params, rest), config, step


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


def _train_line(means: dict, moe_blocks: tuple[int, ...]) -> dict[str, Any]:
  line = {k: means[k] for k in ("loss", "aux_loss", "z_loss", "dropped_fraction",
                                "grad_norm")}
  for k in ("router_confidence", "router_entropy", "second_kept_fraction"):
    if k in means:
      line[k] = means[k]
  if "expert_load" in means:
    line["expert_load"] = {f"layer_{b}": means["expert_load"][i]
                           for i, b in enumerate(moe_blocks)}
    line["expert_fill"] = {f"layer_{b}": means["expert_fill"][i]
                           for i, b in enumerate(moe_blocks)}
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
          "moe_blocks": list(model.cfg.moe_blocks)}


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

  data = data_lib.make_lm_datasets(
      config.data.name, data_dir=config.data.data_dir, seq_len=config.data.seq_len,
      batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  tokenizer = data.tokenizer

  model = make_model(config, vocab_size=tokenizer.vocab_size)
  info = model_info(model, config.data.seq_len)
  kind = (f"MoE ({len(info['moe_blocks'])} of {config.model.num_layers} blocks, "
          f"{config.moe.num_experts} experts, top-{config.moe.top_k})"
          if info["moe_blocks"] else "dense")
  _print(f"Model: {kind}; params {_fmt(info['params_total'])} total / "
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
                     rng=jax.random.key_data(jax.random.key(config.seed)))
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
  restored = checkpointer.restore(abstract, data_iterator=train_iter)
  meta: dict[str, Any] = {}
  if restored is not None:
    step0, state, meta = restored
    _print(f"Resuming from the checkpoint at step {step0} in {checkpointer.directory}.")
  else:
    step0 = 0
  if step0 >= config.steps:
    _print(f"Already trained to step {step0} >= steps={config.steps}; nothing to do.")

  writer = MetricsWriter(workdir, resume_step=step0, enabled=primary)
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
    checkpointer.save(step, state, data_iterator=train_iter, meta={
        "accumulator": acc.state(),
        "elapsed_sec": elapsed_before + time.perf_counter() - t_start})

  def run_eval(step: int) -> None:
    batches = (sharding.shard_batch(b, mesh)
               for b in data.eval_iter(num_steps=config.eval_steps))
    values = evaluate(eval_step, state.params, batches)
    summary["eval"] = writer.write("eval", step, values)
    if primary:
      pbar.write(f"step {step}: eval_loss {values['eval_loss']:.4f}, "
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
        line = _train_line(acc.means(), moe_blocks)
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
    sampler = single_device_copy(nnx.merge(*_merge_parts(model, state.params)))
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


def _merge_parts(model: nnx.Module, params: dict):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest
