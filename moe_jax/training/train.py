"""Training library: the one training loop (its jitted steps are
:mod:`moe_jax.training.steps`').

The model and optimizer a config builds are :mod:`moe_jax.training.build`'s, the run's
state and its restoring :mod:`moe_jax.training.run_state`'s.

:func:`run_training` is the loop of every run, pretraining and fine-tuning
(:mod:`moe_jax.peft.finetune`) alike, with :func:`make_train_step` its step: resuming,
logging, evaluating, checkpointing, SIGTERM, gradient accumulation and the selection
biases' update are done there once; a caller says what trains (an nnx filter), what
the optimizer is, what was loaded and what is evaluated.

``train_and_evaluate(config, workdir)`` (pretraining) runs (or resumes) a run in ``workdir``:

* ``workdir/metrics.jsonl`` and ``workdir/tb``: see :mod:`moe_jax.training.metrics`;
* ``workdir/checkpoints``: see :mod:`moe_jax.training.checkpoint` (params, optimizer
  state, selection biases, step, rng and the data iterator's position; re-running
  resumes);
* ``workdir/config.json``, ``workdir/model_info.json``: the run's config and sizes.

Loss (what is differentiated)::

    loss = CE + aux_loss_coef * R_l(aux_l) + z_loss_coef * R_l(z_l)
              + mod_aux_loss_coef * sum_d BCE_d

with ``R_l`` the sum over the MoE blocks ``l`` for ``moe.loss_reduction="sum"`` (Switch
and ST-MoE: every layer's loss carries the coefficient) or their mean for ``"mean"`` (the
coefficient is shared out over the layers), and ``BCE_d`` the predictor loss of
Mixture-of-Depths routed block ``d`` (:mod:`moe_jax.models.mod`). ``metrics.jsonl``
reports CE as ``loss`` and the two layer means, unscaled, as ``aux_loss`` /
``z_loss``, whatever the reduction (and ``mod_aux_loss``, the mean BCE).

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
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from moe_jax.errors import ConfigError, TrainingError
from moe_jax.inference import decode
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.training import evaluation, objectives
from moe_jax.training.build import (make_model, make_optimizer, model_info, tokenizer_of,
                                    vocab_size_of)
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.training.config import check_config
from moe_jax.training.evaluation import evaluate
from moe_jax.training.loop_utils import (Accumulator, Preemption, ShareCounter, fmt,
                                         prepare_workdir, say, train_line)
from moe_jax.training.metrics import MetricsWriter
from moe_jax.models.scan import block_kinds, find_unit
from moe_jax.training.run_state import (abstract_like, merge_model, restore,
                                        single_device_copy, split_trainable, to_checkpoint)
# The steps, imported here too, as part of this module's interface.
from moe_jax.training.steps import (init_train_state, make_eval_step,  # pylint: disable=unused-import
                                    make_train_step, split_microbatches)


log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------


def run_training(model: nnx.Module, config, workdir: str, *, mesh, tx, schedule,
                 train_iter, evals: dict[str, Any], preemption: Preemption,
                 stop_at_step: int | None = None, wrt: Any = nnx.Param,
                 apply_gradients: Callable | None = None,
                 routing_step: int | None = None, eval_at_start: bool = False,
                 meta: dict[str, Any] | None = None, start_texts: dict | None = None,
                 steps_per_sec: bool = False,
                 finish: Callable | None = None) -> dict[str, Any]:
  """The training loop of pretraining and fine-tuning: resumes from
  ``workdir/checkpoints``, trains to ``config.steps``, logs, evaluates, checkpoints,
  stops on SIGTERM or after ``stop_at_step`` (checkpoint, return).

  ``model`` is placed on ``mesh`` already. What trains is the nnx filter ``wrt``
  (the other parameters stay as loaded), updated by ``tx`` (``schedule`` the learning
  rate logged) through ``apply_gradients`` and ``routing_step``
  (:func:`make_train_step`). ``train_iter`` is the (checkpointable) iterator of
  this process's training batches. ``evals`` maps a metric prefix to a dataset whose
  ``eval_iter(num_steps=...)`` is scored at every eval (``""``: ``eval_*``, the run's
  own data; e.g. ``"old_"``: ``old_eval_*``), also at step 0 with ``eval_at_start``.
  ``meta`` is saved in every checkpoint's meta; ``start_texts`` (``{tag: text}``) are
  written to TensorBoard when the run starts at step 0; ``steps_per_sec`` adds that
  to the train lines. ``finish(writer, state, step)`` runs after the last step of a
  run that was not stopped, before the writer closes.

  Returns:
    ``{"step", "preempted", "train", "eval", "state"}``: the last step, whether the
    run stopped before ``config.steps``, the last train and eval lines, and the
    state.

  Raises:
    CheckpointError: the work directory holds checkpoints none of which is readable.
    TrainingError: the loss became non-finite (the last good checkpoint is kept).
  """
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  primary = jax.process_index() == 0
  objective = objectives.get_objective(config)
  state, state_sharding = init_train_state(model, tx, mesh, config.seed, wrt=wrt)
  _, _, frozen, _ = split_trainable(model, wrt)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  restored = restore(checkpointer, abstract_like(state), data_iterator=train_iter,
                     scan_unit=find_unit(block_kinds(config.model)))
  saved_meta: dict[str, Any] = {}
  step0 = 0
  if restored is not None:
    step0, state, saved_meta = restored
    say(f"Resuming from the checkpoint at step {step0} in {checkpointer.directory}.")
  if step0 >= config.steps:
    say(f"Already trained to step {step0} >= steps={config.steps}; nothing to do.")

  writer = MetricsWriter(workdir, resume_step=step0, enabled=primary,
                         tags={"objective": objective.name})
  if primary and step0 == 0:
    for tag, text in (start_texts or {}).items():
      writer.write_text(tag, text, 0)
  train_step = make_train_step(model, tx, config, wrt=wrt,
                               apply_gradients=apply_gradients,
                               routing_step=routing_step, state_sharding=state_sharding)
  eval_step = make_eval_step(model)
  acc = Accumulator(saved_meta.get("accumulator"))
  elapsed_before = float(saved_meta.get("elapsed_sec", 0.0))
  t_start = time.perf_counter()
  tokens_per_step = config.batch_size * config.data.seq_len
  summary: dict[str, Any] = {"preempted": False, "train": None, "eval": None}

  def save(step: int) -> None:
    checkpointer.save(step, to_checkpoint(state), data_iterator=train_iter, meta={
        "accumulator": acc.state(), **(meta or {}), **shares.state(),
        "elapsed_sec": elapsed_before + time.perf_counter() - t_start})

  def run_eval(step: int) -> None:
    num_steps = config.eval_steps
    if step == config.steps and config.get("final_eval_steps") is not None:
      num_steps = config.final_eval_steps
    score = functools.partial(eval_step, model_state=state.model_state)
    params = _deep_merge(frozen, state.params)
    values: dict[str, Any] = {}
    for prefix, dataset in evals.items():
      def batches(it):
        return objective.eval_batches(sharding.shard_batch(b, mesh) for b in it)
      # A mixture (moe_jax.data.streaming) is scored per source too: eval_loss/<source>.
      parts = dataset.eval_parts() if hasattr(dataset, "eval_parts") else {}
      line = (evaluation.evaluate_parts(score, params, {
          name: batches(part.eval_iter(num_steps=num_steps or None))
          for name, part in parts.items()}) if parts else
              evaluate(score, params, batches(dataset.eval_iter(num_steps=num_steps or None))))
      values.update({prefix + k: v for k, v in line.items()})
    summary["eval"] = writer.write("eval", step, values)
    if primary:
      pbar.write(f"step {step}: eval_loss {values['eval_loss']:.4f} ± "
                 f"{values['eval_loss_stderr']:.4f} over {values['eval_tokens']:,} tokens, "
                 f"bits/byte {values['eval_bits_per_byte']:.3f}" + "".join(
                     f"; {p}eval_loss {values[p + 'eval_loss']:.4f}" for p in evals if p))

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  pbar = tqdm(total=config.steps, initial=min(step0, config.steps), unit="step",
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
              disable=not (primary and config.progress_bar))
  first = True
  step = step0
  shares = ShareCounter(getattr(train_iter, "source_names", ()),
                         saved_meta.get("data_share_rows"))
  last_saved = step0
  try:
    if eval_at_start and step0 == 0:
      run_eval(0)
    for step in range(step0 + 1, config.steps + 1):
      t0 = time.perf_counter()
      batch = next(train_iter)
      if "source" in batch:  # a mixture's rows: data_share/<source> on the train lines
        shares.add(batch.pop("source"))
      batch = sharding.shard_batch(batch, mesh)
      state, metrics = train_step(state, batch, frozen)
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
        line = train_line(acc.means(), model.cfg.moe_blocks, model.cfg.mod_blocks)
        line["tokens_per_sec"] = (acc.timed_tokens / acc.time if acc.time
                                  else float("nan"))
        if steps_per_sec:
          line["steps_per_sec"] = line["tokens_per_sec"] / tokens_per_step
        line["elapsed_sec"] = elapsed_before + time.perf_counter() - t_start
        line["learning_rate"] = float(schedule(step - 1))
        line.update(shares.line())
        summary["train"] = writer.write("train", step, line)
        acc = Accumulator()
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
        say(f"\n{why}: saved the checkpoint at step {step}; re-run the same "
            "command to resume.")
        break
  finally:
    pbar.close()
    writer.flush()
    checkpointer.close()

  summary["step"], summary["state"] = step, state
  if not summary["preempted"] and summary["eval"] and step > step0:
    ev = summary["eval"]
    say(f"Finished step {step} in {elapsed_before + time.perf_counter() - t_start:.0f}s"
        f" of training: eval_loss {ev['eval_loss']:.4f} (perplexity "
        f"{ev['eval_perplexity']:.2f}, {ev['eval_bits_per_byte']:.3f} bits/byte).")
  try:
    if finish is not None and not summary["preempted"] and step >= config.steps:
      finish(writer, state, step)
  finally:
    writer.close()
  return summary


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


# ------------------------------------------------------------------------------------
# Pretraining
# ------------------------------------------------------------------------------------


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
  with Preemption() as preemption:
    return _train_and_evaluate(config, workdir, stop_at_step, preemption)


def _train_and_evaluate(config, workdir, stop_at_step, preemption) -> dict[str, Any]:
  # A relative data.tokenizer path is read from the work directory.
  tok_dir = os.path.abspath(os.path.expanduser(workdir))
  check_config(config, num_devices=None, workdir=tok_dir)
  if config.distributed:
    from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
    sharding.initialize_distributed()
  check_config(config, num_devices=jax.device_count(),
               process_count=jax.process_count(), workdir=tok_dir)
  workdir = prepare_workdir(workdir)

  from moe_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moe_jax.models import param_sharding  # pylint: disable=import-outside-toplevel
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel

  primary = jax.process_index() == 0
  if primary:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))

  objective = objectives.get_objective(config)
  if config.data.get("streaming", False) or config.data.get("mixture", ""):
    from moe_jax.data import streaming  # pylint: disable=import-outside-toplevel
    data = streaming.make_streaming_datasets(
        config.data.name, mixture=config.data.get("mixture", ""),
        data_dir=config.data.data_dir, seq_len=config.data.seq_len,
        batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        tokenizer=tokenizer_of(config, workdir=workdir),
        num_workers=config.data.get("num_workers", 0))
  else:
    data = data_lib.make_lm_datasets(
        config.data.name, data_dir=config.data.data_dir, seq_len=config.data.seq_len,
        batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        tokenizer=tokenizer_of(config, workdir=workdir))
  tokenizer = data.tokenizer

  model = make_model(config, vocab_size=vocab_size_of(config, workdir=workdir))
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
  say(f"Objective: {objective.description}.\nModel: {kind}; params {fmt(info['params_total'])} total / "
         f"{fmt(info['params_active'])} active per token; forward FLOPs/token "
         f"{fmt(info['flops_per_token_total'])} total / "
         f"{fmt(info['flops_per_token_active'])} active"
         + (f" (+{fmt(info['flops_per_token_router'])} router)"
            if info["flops_per_token_router"] else ""))
  if primary:
    with open(os.path.join(workdir, "model_info.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model,
                            fsdp=config.mesh.get("fsdp", 1))
  param_sharding.shard_model(model, mesh)
  tx, schedule = make_optimizer(config)
  summary: dict[str, Any] = {"model_info": info, "sample": None}

  def sample(writer, state, step) -> None:
    s = config.sample
    if not s.length:
      return
    sampler = single_device_copy(merge_model(*_merge_parts(model, state.params),
                                             state.model_state))
    if not primary:
      return
    prompt = tokenizer.encode(s.prompt) if s.prompt else np.array([tokenizer.eos_id])
    window = max(config.data.seq_len, 2)
    try:
      ids = decode.generate(sampler, [prompt[-window:]], s.length, max_len=window,
                            temperature=s.temperature, top_k=s.top_k,
                            seed=config.seed)[0]
    except ConfigError as e:  # a model that cannot decode (a non-causal router)
      say(f"\nNo sample: {e}")
    else:
      text = s.prompt + tokenizer.decode(ids)
      summary["sample"] = text
      writer.write_text("sample", text, step)
      say(f"\nSample at step {step} (temperature {s.temperature}, top-k "
          f"{s.top_k}):\n{text}")

  out = run_training(model, config, workdir, mesh=mesh, tx=tx, schedule=schedule,
                     train_iter=data.train_iter(), evals={"": data},
                     preemption=preemption, stop_at_step=stop_at_step,
                     start_texts={"model_info": json.dumps(info)}, finish=sample)
  del out["state"]
  return {**summary, **out}


def _moe_layers(model: nnx.Module) -> list[MoeLayer]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoeLayer)]


def _merge_parts(model: nnx.Module, params: dict):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest
