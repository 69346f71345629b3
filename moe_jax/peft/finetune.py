"""Fine-tuning runs: a pretrained run's model, a PEFT method, pretraining's loop.

``finetune(ft_config, init_from, workdir)`` (``experiments/finetune.py``) loads the
latest checkpoint of the pretraining run in ``init_from``, prepares the method of
``finetune.method`` and trains on ``data.name`` (default ``python_stdlib``) in the
training loop of pretraining (:func:`moe_jax.training.train.run_training`: the same
step, mesh, objective, gradient accumulation, selection-bias update, logging,
checkpoints and SIGTERM handling). Fine-tuning differs in what trains, what is loaded
and what is evaluated:

| method | trainable (the nnx filter the model is split by; the optimizer sees that part only) |
|---|---|
| ``lora`` | ``nnx.LoRAParam`` adapters on ``finetune.targets`` (:mod:`moe_jax.peft.lora`) |
| ``esft`` | the experts ESFT selects per MoE layer (:mod:`moe_jax.peft.esft`), plus every weight of ``finetune.targets`` (default none; ``experts`` is refused) |
| ``full`` | every parameter (``finetune.targets`` must be unset or empty) |

The run's config is the base run's with the fine-tuning file's training keys on top
(steps, learning rate, batch size, data, ...); the model keys and ``data.tokenizer``
are always the base's (a relative tokenizer path made absolute from the base run's
work directory).
``workdir`` gets:

* ``config.json`` (the merged config, with ``finetune``), ``finetune.json`` (base
  path and step, method, trainable and total parameter counts, optimizer-state bytes,
  ESFT's shares and selection);
* ``metrics.jsonl`` / ``tb``: train lines as pretraining writes them; eval lines at
  step 0 (before fine-tuning) and every ``eval_every`` steps, with the new domain as
  ``eval_*`` and the base run's data (the old domain) as ``old_eval_*``;
* ``checkpoints``: the trainable parameters only (adapters, or the trainable
  weights), their optimizer state, step, rng, the selection biases (DeepSeek-style
  models: they keep balancing the experts on the new data) and the data position,
  with the base run's path and step in the checkpoint's meta. The routers' step
  (noise annealing) stays at the base run's last. A re-run resumes exactly; SIGTERM
  saves and stops, as in pretraining.

:func:`load_model` rebuilds a fine-tuned model (adapters merged or not) for sampling.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict
import optax
from flax import nnx

from moe_jax.layers import lora_adapters as lora_lib
from moe_jax.models import param_sharding
from moe_jax.training import build, loop_utils, run_state, train
from moe_jax.parallel import sharding
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.errors import ConfigError, TrainingError
from moe_jax.training.config import check_config
from moe_jax.peft import esft
from moe_jax.peft import lora as peft_lora

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


def load_base(init_from: str, *, vocab_size: int | None = None):
  """``(model, config, step)`` of the pretraining run in ``init_from``; a scanned
  run's model comes unrolled (``model.scan_layers=False``), as fine-tuning needs.
  ``vocab_size`` None: the run's (:func:`~moe_jax.training.build.vocab_size_of`)."""
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
    model, config, step = run_state.load_model(path, vocab_size=vocab_size)
  except TrainingError:
    raise ConfigError([f"--init_from={init_from!r} has no checkpoint yet; train it "
                       "first (experiments/train.py) or pass another run."]) from None
  if config.model.get("scan_layers", False):
    # Adapters and expert masks address blocks one by one: fine-tune the unrolled twin.
    model = model.unrolled()
    config.model.scan_layers = False
  return model, config, step


def run_config(ft_config, base_config, init_from: str) -> ml_collections.ConfigDict:
  """The base run's config with the fine-tuning file's keys on top."""
  config = ml_collections.ConfigDict(base_config.to_dict())
  for key, value in ft_config.items():
    if key == "finetune":
      continue
    if key in ("model", "moe", "mamba"):
      raise ConfigError([f"the fine-tuning config sets {key!r}; the model is the base "
                         "run's, so drop that section."])
    if key == "data" and "tokenizer" in value and value.tokenizer != config.data.get(
        "tokenizer", "byte"):
      raise ConfigError([f"the fine-tuning config sets data.tokenizer={value.tokenizer!r};"
                         " the model reads the base run's tokenizer "
                         f"({config.data.get('tokenizer', 'byte')!r}), so drop that key."])
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
  # The base run's tokenizer, its relative path read from the base run's work directory.
  config.data.tokenizer = build.tokenizer_of(base_config,
                                             workdir=config.finetune.init_from).spec
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
# The optimizer
# ------------------------------------------------------------------------------------


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

  tokenizer = build.tokenizer_of(config)
  data = data_lib.make_lm_datasets(
      config.data.name, data_dir=config.data.data_dir, seq_len=config.data.seq_len,
      batch_size=config.batch_size, seed=config.seed, tokenizer=tokenizer)
  old = None
  if ft.eval_old_domain:
    old = data_lib.make_lm_datasets(
        base_config.data.name, data_dir=config.data.data_dir,
        seq_len=config.data.seq_len, batch_size=config.batch_size, seed=config.seed,
        tokenizer=tokenizer)
  score_batches = None
  if ft.method == "esft" and ft.get("esft_selected") is None:
    it = data.train_iter()
    score_batches = [next(it) for _ in range(ft.esft.batches)]
  total_base = _count(nnx.state(model, nnx.Param))
  plan = prepare(model, config, score_batches)

  # The model, its adapters included, on the run's mesh, as pretraining places it.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model)
  param_sharding.shard_model(model, mesh)
  _, params, _, _ = run_state.split_trainable(model, plan["wrt"])
  tx, schedule, masks = make_optimizer(config, params, plan["row_masks"])
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
          "optimizer_state_bytes": _nbytes(jax.eval_shape(tx.init, params)),
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

  # Pretraining's loop; what differs: the trainable part (plan["wrt"]) and ESFT's
  # frozen rows, the routers' step (fixed at the base run's), the eval at step 0 and
  # on the old domain, and the base run in every checkpoint's meta.
  out = train.run_training(
      model, config, workdir, mesh=mesh, tx=tx, schedule=schedule,
      train_iter=data.train_iter(),
      evals={"": data, **({"old_": old} if old is not None else {})},
      preemption=preemption, stop_at_step=stop_at_step, wrt=plan["wrt"],
      apply_gradients=(None if masks is None else
                       functools.partial(esft.apply_gradients, masks=masks)),
      routing_step=base_step, eval_at_start=True,
      meta={"base_workdir": ft.init_from, "base_step": base_step, "method": ft.method},
      steps_per_sec=True)
  state = out.pop("state")
  return {"info": info, **out, "params": state.params}


# ------------------------------------------------------------------------------------
# Loading a fine-tuned run
# ------------------------------------------------------------------------------------


def is_finetune_run(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, INFO_FILE))


def load_model(workdir: str, *, merge: bool = True, vocab_size: int | None = None):
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
  _, params, _, _ = run_state.split_trainable(model, plan["wrt"])
  tx, _, _ = make_optimizer(config, params, plan["row_masks"])
  abstract = jax.eval_shape(lambda p, s: run_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0)), model_state=s), params,
      run_state.model_state(model))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  try:
    restored = run_state.restore(checkpointer, abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise TrainingError(f"--workdir={workdir!r} has no checkpoint yet.")
  step, saved, _ = restored
  nnx.update(model, saved.params)
  if saved.model_state:  # the selection biases as fine-tuning left them
    nnx.update(model, saved.model_state)
  if merge:
    lora_lib.merge(model)
  return model, config, step


__all__ = ["DEFAULT_TARGETS", "METHODS", "default_finetune_config", "finetune",
           "finetune_errors", "is_finetune_run", "load_model", "make_optimizer",
           "prepare", "resolved_targets", "run_config"]
