"""Fine-tuning runs: a pretrained run's model, a PEFT method, the training loop.

``finetune(ft_config, init_from, workdir)`` (``experiments/finetune.py``) loads the
latest checkpoint of the pretraining run in ``init_from``, prepares the method of
``finetune.method`` and trains on ``data.name`` (default ``python_stdlib``):

| method | trainable (the nnx filter the model is split by; the optimizer sees that part only) |
|---|---|
| ``lora`` | ``nnx.LoRAParam`` adapters on ``finetune.targets`` (:mod:`moe_jax.peft.lora`) |
| ``esft`` | the experts ESFT selects per MoE layer (:mod:`moe_jax.peft.esft`), plus every weight of ``finetune.targets`` (default none; ``experts`` is refused) |
| ``full`` | every parameter (``finetune.targets`` must be unset or empty) |

The run's config is the base run's with the fine-tuning file's training keys on top
(steps, learning rate, batch size, data, ...); the model keys are always the base's.
``workdir`` gets:

* ``config.json`` (the merged config, with ``finetune``), ``finetune.json`` (base
  path and step, method, trainable and total parameter counts, optimizer-state bytes,
  ESFT's shares and selection);
* ``metrics.jsonl`` / ``tb``: train lines as pretraining writes them; eval lines at
  step 0 (before fine-tuning) and every ``eval_every`` steps, with the new domain as
  ``eval_*`` and the base run's data (the old domain) as ``old_eval_*``;
* ``checkpoints``: the trainable parameters only (adapters, or the trainable
  weights), their optimizer state, step, rng and the data position, with the base
  run's path and step in the checkpoint's meta. A re-run resumes exactly; SIGTERM
  saves and stops, as in pretraining.

:func:`load_model` rebuilds a fine-tuned model (adapters merged or not) for sampling.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict
import optax
from flax import nnx

from moe_jax.layers import lora_adapters as lora_lib
from moe_jax.training import build, evaluation, loop_utils, losses, run_state, train
from moe_jax.parallel import sharding
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.errors import ConfigError, TrainingError
from moe_jax.training.config import check_config
from moe_jax.training.metrics import MetricsWriter
from moe_jax.peft import esft
from moe_jax.peft import lora as peft_lora
from moe_jax.layers.router_families import set_training_step

METHODS = ("lora", "esft", "full")
INFO_FILE = "finetune.json"
# finetune.targets when unset: LoRA adapts the routed experts; ESFT trains the experts
# it selects and nothing else whole; full trains everything and takes no targets.
DEFAULT_TARGETS = {"lora": ("experts",), "esft": (), "full": ()}


def default_finetune_config() -> ml_collections.ConfigDict:
  """The ``finetune`` section's keys and defaults."""
  c = ml_collections.ConfigDict()
  c.method = "lora"
  # None: the method's default (DEFAULT_TARGETS): ("experts",) for lora, () for esft.
  c.targets = config_dict.placeholder(tuple)
  c.rank = 8
  c.alpha = 16.0  # the update is scaled by alpha / rank
  c.seed = 0  # draws the LoRA A factors
  # LoRA's A init: he_uniform (nnx.LoRA's, bound sqrt(6 / K)) | kaiming_uniform_a_sqrt5
  # (HF PEFT's, bound sqrt(1 / K), 2.45x smaller); moe_jax.layers.lora_adapters.A_INITS.
  c.a_init = "he_uniform"
  c.esft = ml_collections.ConfigDict()
  c.esft.score = "gate"  # "gate" (ESFT-Gate) | "token" (ESFT-Token)
  # Per layer, experts until their cumulative share reaches this; None: the paper's
  # threshold for the score (esft.DEFAULT_TOP_P: 0.1 for gate, 0.2 for token).
  c.esft.top_p = config_dict.placeholder(float)
  c.esft.batches = 8  # first training batches that score the experts
  c.eval_old_domain = True  # also evaluate on the base run's data (forgetting)
  return c


def resolved_targets(ft) -> tuple[str, ...]:
  """``finetune.targets``, or the method's default (:data:`DEFAULT_TARGETS`) when
  it is unset (None)."""
  if ft.get("targets") is None:
    return DEFAULT_TARGETS.get(ft.method, ())
  return tuple(ft.targets)


def finetune_errors(ft) -> list[str]:
  """Every problem with a ``finetune`` section, one sentence each."""
  errors = []
  if ft.method not in METHODS:
    errors.append(f"finetune.method={ft.method!r} is unknown; use one of "
                  f"{', '.join(METHODS)}.")
  targets = ft.targets
  if targets is None:
    pass  # the method's default
  elif isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
    errors.append(f"finetune.targets={targets!r} must be a tuple of names from "
                  f"{', '.join(peft_lora.TARGETS)}.")
  else:
    for t in targets:
      if t not in peft_lora.TARGETS:
        errors.append(f"finetune.targets has {t!r}, which is not a target; use some of "
                      f"{', '.join(peft_lora.TARGETS)}.")
    if ft.method == "lora" and not targets:
      errors.append("finetune.targets is empty; LoRA needs at least one target (e.g. "
                    "--config.finetune.targets=\"('experts',)\").")
    if ft.method == "esft" and "experts" in targets:
      errors.append("finetune.targets has 'experts', but under finetune.method='esft' "
                    "the experts train only where ESFT selects them; drop it (targets "
                    "lists the modules ESFT trains whole besides, e.g. ('router',)).")
    if ft.method == "full" and targets:
      errors.append(f"finetune.targets={tuple(targets)!r} has no effect under "
                    "finetune.method='full' (every parameter trains); drop it.")
  if ft.method == "lora":
    if isinstance(ft.rank, bool) or not isinstance(ft.rank, int) or ft.rank < 1:
      errors.append(f"finetune.rank={ft.rank!r} must be a positive integer.")
    if isinstance(ft.alpha, bool) or not isinstance(ft.alpha, (int, float)) or not (
        ft.alpha > 0):
      errors.append(f"finetune.alpha={ft.alpha!r} must be a number > 0 (the update is "
                    "scaled by alpha / rank).")
    a_init = ft.get("a_init", "he_uniform")
    if a_init not in lora_lib.A_INITS:
      errors.append(f"finetune.a_init={a_init!r} is unknown; use one of "
                    f"{', '.join(lora_lib.A_INITS)}.")
  if ft.method == "esft":
    if ft.esft.score not in esft.SCORES:
      errors.append(f"finetune.esft.score={ft.esft.score!r} is unknown; use one of "
                    f"{', '.join(esft.SCORES)}.")
    top_p = ft.esft.top_p
    if top_p is not None and not (isinstance(top_p, (int, float))
                                  and not isinstance(top_p, bool) and 0 < top_p <= 1):
      errors.append(f"finetune.esft.top_p={ft.esft.top_p!r} must be in (0, 1].")
    if not (isinstance(ft.esft.batches, int) and ft.esft.batches >= 1):
      errors.append(f"finetune.esft.batches={ft.esft.batches!r} must be an integer >= 1.")
  return errors


# ------------------------------------------------------------------------------------
# Base model and config
# ------------------------------------------------------------------------------------


def _require_init_from(init_from: str | None) -> None:
  if not init_from:
    raise ConfigError(["--init_from is required: the work directory of a pretraining "
                       "run (experiments/train.py)."])


def load_base(init_from: str, *, vocab_size: int = 259):
  """``(model, config, step)`` of the pretraining run in ``init_from``."""
  _require_init_from(init_from)
  path = os.path.abspath(os.path.expanduser(init_from))
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConfigError([f"--init_from={init_from!r} holds no training run (no "
                       "config.json); pass the --workdir of an experiments/train.py run."])
  objective = run_state.load_config(path).model.get("objective", "causal_lm")
  if objective != "causal_lm":
    raise ConfigError([f"--init_from={init_from!r} was trained with model.objective="
                       f"{objective!r}; fine-tuning continues causal_lm runs only."])
  try:
    return run_state.load_model(path, vocab_size=vocab_size)
  except TrainingError:
    raise ConfigError([f"--init_from={init_from!r} has no checkpoint yet; train it "
                       "first (experiments/train.py) or pass another run."]) from None


def run_config(ft_config, base_config, init_from: str) -> ml_collections.ConfigDict:
  """The base run's config with the fine-tuning file's keys on top."""
  config = ml_collections.ConfigDict(base_config.to_dict())
  for key, value in ft_config.items():
    if key == "finetune":
      continue
    if key in ("model", "moe", "mamba"):
      raise ConfigError([f"the fine-tuning config sets {key!r}; the model is the base "
                         "run's, so drop that section."])
    if isinstance(value, ml_collections.ConfigDict) and key in config:
      for k, v in value.items():
        config[key][k] = v
    else:
      config[key] = value
  ft = default_finetune_config()
  ft.update(ft_config.finetune.to_dict() if "finetune" in ft_config else {})
  ft.targets = resolved_targets(ft)  # config.json records what the run used
  ft.esft.top_p = esft.resolved_top_p(ft.esft.score, ft.esft.top_p)
  config.finetune = ft
  config.finetune.init_from = os.path.abspath(os.path.expanduser(init_from))
  return config


# ------------------------------------------------------------------------------------
# Methods: what trains
# ------------------------------------------------------------------------------------


def _path_filter(paths: set[tuple]):
  """An nnx filter that takes the ``nnx.Param`` variables at ``paths``."""
  def take(path, value):
    return isinstance(value, nnx.Param) and tuple(path) in paths
  return take


def _param_paths(model, weights) -> set[tuple]:
  return {(*w.path, w.name) for w in weights}


def prepare(model, config, score_batches=None) -> dict[str, Any]:
  """Sets ``model`` up for ``finetune.method``; returns the method's plan.

  The plan has ``wrt`` (the nnx filter of the trainable variables), ``row_masks``
  (ESFT's ``{path: bool[E, 1, 1]}``; empty otherwise) and ``info`` (JSON-able).
  ``score_batches`` (ESFT only) are the batches that score the experts; a resumed run
  passes the plan's recorded ``selected`` instead (``config.finetune.esft_selected``).
  """
  ft = config.finetune
  targets = resolved_targets(ft)
  try:
    extra = peft_lora.target_weights(model, targets) if (
        ft.method != "full" and targets) else []
  except ValueError as e:
    raise ConfigError([str(e)]) from None
  info: dict[str, Any] = {"method": ft.method}
  row_masks: dict[tuple, np.ndarray] = {}
  if ft.method == "lora":
    a_init = ft.get("a_init", "he_uniform")
    peft_lora.add_lora(model, targets, rank=ft.rank, alpha=ft.alpha, seed=ft.seed,
                       a_init=a_init)
    wrt: Any = nnx.LoRAParam
    info.update(targets=list(targets), rank=ft.rank, alpha=ft.alpha, a_init=a_init)
  elif ft.method == "full":
    wrt = nnx.Param
  else:
    if not model.cfg.moe_blocks:
      raise ConfigError(["finetune.method='esft' needs MoE blocks, but the base model "
                         "is dense (model.moe_every=0); use lora or full."])
    selected = ft.get("esft_selected")
    top_p = esft.resolved_top_p(ft.esft.score, ft.esft.top_p)
    if selected is None:
      shares = esft.routing_shares(model, score_batches, ft.esft.score)
      selected = esft.select_experts(shares, top_p)
      info["shares"] = {str(k): v.tolist() for k, v in shares.items()}
    selected = {int(k): np.asarray(v, bool) for k, v in dict(selected).items()}
    info["selected"] = {str(k): v.tolist() for k, v in selected.items()}
    row_masks = esft.expert_row_masks(model, selected)
    wrt = _path_filter(set(row_masks) | _param_paths(model, extra))
    info.update(targets=list(targets), score=ft.esft.score, top_p=top_p,
                selected_params=esft.trainable_expert_params(model, selected))
  return {"wrt": wrt, "row_masks": row_masks, "info": info}


# ------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def split(model, wrt):
  """``(graphdef, trainable, frozen, rest)``: pure dicts of the trainable and the other
  parameters, and the non-parameter state."""
  graphdef, trainable, frozen, rest = nnx.split(model, wrt, nnx.Param, ...)
  return graphdef, trainable.to_pure_dict(), frozen.to_pure_dict(), rest


def make_step(model, wrt, tx, config, masks, base_step: int):
  """``state, metrics = step(state, frozen, batch)``, jitted, donating ``state``.

  ``state.params`` holds only the trainable parameters; ``frozen`` the others, passed
  as an argument (not baked into the program as constants). ``masks`` (ESFT) zero
  the frozen expert rows' gradients before the optimizer (``grad_norm`` is their
  norm) and restore the rows after the update (:func:`esft.apply_gradients`). The routing step of noise annealing stays
  at the base run's last step.
  """
  graphdef, _, _, rest = split(model, wrt)
  loss = losses.training_loss(config)

  def loss_fn(params, frozen, batch, key):
    m = nnx.merge(graphdef, params, frozen, rest, copy=True)
    run_state.reseed(m, key)
    set_training_step(m, base_step)
    return loss(m, batch)

  def step(state, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, (metrics, _) = jax.grad(loss_fn, has_aux=True)(state.params, frozen, batch,
                                                          key)
    params, opt_state, grads, updates = esft.apply_gradients(
        tx, grads, state.opt_state, state.params, masks)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_norm"] = optax.global_norm(updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, donate_argnums=0)


def make_optimizer(config, params, row_masks):
  """``(tx, schedule, masks)``: pretraining's optimizer (clip, AdamW or Adafactor) on
  the trainable ``params``; with ESFT's ``row_masks``, :func:`esft.freeze_rows` chained
  after it and ``masks`` (a tree like ``params``) for :func:`esft.apply_gradients`."""
  tx, schedule = build.make_optimizer(config)
  masks = None
  if row_masks:
    masks = esft.mask_tree(params, row_masks)
    tx = optax.chain(tx, esft.freeze_rows(masks))  # after the optimizer: decay too
  return tx, schedule, masks


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------


def finetune(ft_config, init_from: str, workdir: str, *,
             stop_at_step: int | None = None) -> dict[str, Any]:
  """Fine-tunes (or resumes) in ``workdir``; returns a summary like pretraining's."""
  with loop_utils.Preemption() as preemption:
    return _finetune(ft_config, init_from, workdir, stop_at_step, preemption)


def _check(ft_config, init_from, workdir):
  section = default_finetune_config()
  if "finetune" in ft_config:
    try:
      section.update(ft_config.finetune.to_dict())
    except (KeyError, AttributeError) as e:
      raise ConfigError([f"finetune: unknown key ({e}); see "
                         "experiments/configs/finetune_lora.py."]) from None
  errors = finetune_errors(section)
  if errors:
    raise ConfigError(errors)
  _require_init_from(init_from)  # before the recorded base is compared with it
  info_path = os.path.join(os.path.abspath(workdir), INFO_FILE)
  if os.path.exists(info_path):
    with open(info_path, encoding="utf-8") as f:
      recorded = json.load(f)
    if recorded["base_workdir"] != os.path.abspath(os.path.expanduser(init_from)):
      raise ConfigError([f"--workdir={workdir!r} fine-tunes {recorded['base_workdir']!r},"
                         f" not --init_from={init_from!r}; use a new --workdir."])
    return recorded
  return None


def _finetune(ft_config, init_from, workdir, stop_at_step, preemption):
  recorded = _check(ft_config, init_from, workdir)
  from moe_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  model, base_config, base_step = load_base(init_from)
  if recorded is not None and recorded["base_step"] != base_step:
    raise ConfigError([f"--init_from={init_from!r} is now at step {base_step}, but this "
                       f"run started from step {recorded['base_step']}; use a new "
                       "--workdir."])
  config = run_config(ft_config, base_config, init_from)
  check_config(config, num_devices=jax.device_count())
  workdir = loop_utils.prepare_workdir(workdir)
  ft = config.finetune
  if recorded is not None and "selected" in recorded["plan"]:
    with ft.unlocked():
      ft.esft_selected = recorded["plan"]["selected"]

  data = data_lib.make_lm_datasets(
      config.data.name, data_dir=config.data.data_dir, seq_len=config.data.seq_len,
      batch_size=config.batch_size, seed=config.seed)
  old = None
  if ft.eval_old_domain:
    old = data_lib.make_lm_datasets(
        base_config.data.name, data_dir=config.data.data_dir,
        seq_len=config.data.seq_len, batch_size=config.batch_size, seed=config.seed)
  score_batches = None
  if ft.method == "esft" and ft.get("esft_selected") is None:
    it = data.train_iter()
    score_batches = [next(it) for _ in range(ft.esft.batches)]
  total_base = _count(nnx.state(model, nnx.Param))
  plan = prepare(model, config, score_batches)

  graphdef, params, frozen, _ = split(model, plan["wrt"])
  tx, schedule, masks = make_optimizer(config, params, plan["row_masks"])
  # The optimizer state of the trainable subset lives where its parameters do.
  state = run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=sharding.init_optimizer_state(tx, params),
                           rng=jax.random.key_data(jax.random.key(config.seed)))
  trainable = _count(params) if masks is None else int(sum(
      x.size if m is None else x.size // m.shape[0] * int(m.sum())
      for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(
          jax.tree.map(lambda x, m: m, params, masks), is_leaf=lambda x: x is None))))
  plan_info = plan["info"]
  if recorded is not None:
    # A resumed run keeps the recorded plan: ESFT's shares were scored once, at the
    # start, and prepare() (given the recorded selection) does not score again.
    plan_info = {**recorded["plan"], **plan_info}
  info = {"base_workdir": ft.init_from, "base_step": base_step, "plan": plan_info,
          "params_base": total_base, "params_trainable": trainable,
          "params_in_optimizer": _count(params),
          "trainable_fraction": trainable / total_base,
          "optimizer_state_bytes": _nbytes(state.opt_state),
          "checkpoint_params_bytes": _nbytes(params)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
    with open(os.path.join(workdir, INFO_FILE), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)
  loop_utils.say(
      f"Fine-tuning ({ft.method}) step {base_step} of {ft.init_from}: "
      f"{trainable:,} of {total_base:,} parameters train "
      f"({100 * trainable / total_base:.3f}%); optimizer state "
      f"{info['optimizer_state_bytes']:,} bytes.")

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  train_iter = data.train_iter()
  restored = checkpointer.restore(
      run_state.to_checkpoint(run_state.abstract_like(state)),
      data_iterator=train_iter)
  meta: dict[str, Any] = {}
  step0 = 0
  if restored is not None:
    step0, saved, meta = restored
    state = run_state.from_checkpoint(saved)
    loop_utils.say(f"Resuming from the checkpoint at step {step0}.")

  writer = MetricsWriter(workdir, resume_step=step0, enabled=jax.process_index() == 0,
                        tags={"objective": config.model.objective})
  step_fn = make_step(model, plan["wrt"], tx, config, masks, base_step)
  eval_step = train.make_eval_step(model)
  acc = loop_utils.Accumulator(meta.get("accumulator"))
  elapsed_before = float(meta.get("elapsed_sec", 0.0))
  t_start = time.perf_counter()
  tokens_per_step = config.batch_size * config.data.seq_len
  summary: dict[str, Any] = {"info": info, "preempted": False, "train": None,
                             "eval": None}

  def run_eval(step):
    full = _deep_merge(frozen, state.params)
    values = evaluation.evaluate(eval_step, full, data.eval_iter(
        num_steps=config.eval_steps or None))
    if old is not None:
      old_values = evaluation.evaluate(eval_step, full, old.eval_iter(
          num_steps=config.eval_steps or None))
      values.update({f"old_{k}": v for k, v in old_values.items()})
    summary["eval"] = writer.write("eval", step, values)
    loop_utils.say(f"step {step}: eval_loss {values['eval_loss']:.4f}"
                 + (f", old domain {values['old_eval_loss']:.4f}" if old else ""))

  def save(step):
    checkpointer.save(step, run_state.to_checkpoint(state),
                      data_iterator=train_iter, meta={
                          "accumulator": acc.state(), "base_workdir": ft.init_from,
                          "base_step": base_step, "method": ft.method,
                          "elapsed_sec": elapsed_before + time.perf_counter() - t_start})

  step, last_saved, first = step0, step0, True
  try:
    if step0 == 0:
      run_eval(0)
    for step in range(step0 + 1, config.steps + 1):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, frozen, next(train_iter))
      metrics = jax.device_get(metrics)
      if not all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm")):
        raise TrainingError(
            f"Non-finite loss at step {step} (loss={float(metrics['loss'])}); stopping. "
            "Lower --config.learning_rate or enable --config.grad_clip.")
      acc.add(metrics)
      if first:
        first = False  # the compiling step is left out of the throughput
      else:
        acc.time += time.perf_counter() - t0
        acc.timed_tokens += tokens_per_step
      if step % config.log_every == 0 or step == config.steps:
        line = loop_utils.train_line(acc.means(), model.cfg.moe_blocks,
                                     model.cfg.mod_blocks)
        line["tokens_per_sec"] = acc.timed_tokens / acc.time if acc.time else float("nan")
        line["steps_per_sec"] = line["tokens_per_sec"] / tokens_per_step
        line["elapsed_sec"] = elapsed_before + time.perf_counter() - t_start
        line["learning_rate"] = float(schedule(step - 1))
        summary["train"] = writer.write("train", step, line)
        acc = loop_utils.Accumulator()
      if step % config.eval_every == 0 or step == config.steps:
        run_eval(step)
      if step % config.checkpoint_every == 0 or step == config.steps:
        save(step)
        last_saved = step
      if preemption.requested or step == stop_at_step:
        if last_saved != step:
          save(step)
        summary["preempted"] = True
        why = "SIGTERM" if preemption.requested else "stop_at_step"
        loop_utils.say(f"Stopped at step {step} ({why}); the checkpoint is saved; "
                       "re-run the same command to resume.")
        break
  finally:
    writer.flush()
    checkpointer.close()
    writer.close()
  summary["step"] = step
  summary["params"] = state.params
  return summary


# ------------------------------------------------------------------------------------
# Loading a fine-tuned run
# ------------------------------------------------------------------------------------


def is_finetune_run(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, INFO_FILE))


def load_model(workdir: str, *, merge: bool = True, vocab_size: int = 259):
  """``(model, config, step)`` of a fine-tuning run's latest checkpoint.

  The base model is rebuilt from the recorded pretraining run (which must still be at
  the recorded step), the method applied, and the trainable parameters restored.
  ``merge`` folds LoRA adapters into the weights (no effect for esft and full).
  """
  with open(os.path.join(workdir, INFO_FILE), encoding="utf-8") as f:
    info = json.load(f)
  config = run_state.load_config(workdir)
  model, _, base_step = load_base(info["base_workdir"], vocab_size=vocab_size)
  if base_step != info["base_step"]:
    raise ConfigError([f"the base run {info['base_workdir']!r} is now at step "
                       f"{base_step}, but {workdir!r} fine-tuned step "
                       f"{info['base_step']}; its adapters no longer fit."])
  with config.unlocked():
    config.finetune = ml_collections.ConfigDict(config.finetune)
    if "selected" in info["plan"]:
      config.finetune.esft_selected = info["plan"]["selected"]
  plan = prepare(model, config)
  _, params, _, _ = split(model, plan["wrt"])
  tx, _, _ = make_optimizer(config, params, plan["row_masks"])
  abstract = jax.eval_shape(lambda p: run_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0))), params)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  try:
    restored = checkpointer.restore(run_state.to_checkpoint(abstract))
  finally:
    checkpointer.close()
  if restored is None:
    raise TrainingError(f"--workdir={workdir!r} has no checkpoint yet.")
  step, saved, _ = restored
  nnx.update(model, saved.params)
  if merge:
    lora_lib.merge(model)
  return model, config, step


__all__ = ["DEFAULT_TARGETS", "METHODS", "default_finetune_config", "finetune",
           "finetune_errors", "is_finetune_run", "load_model", "make_optimizer",
           "prepare", "resolved_targets", "run_config"]
