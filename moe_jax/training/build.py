"""What a config builds: the model (its MoE, Mamba and Transformer configs), the optimizer
and its schedule, and the model's sizes (``model_info.json``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.training import objectives
from moe_jax.training.config_views import (expert_activation, expert_d_ff, model_pattern,
                                           queue_order)
from moe_jax.training.sections import SECTIONS, derive
from moe_jax.models.layer_pattern import MAMBA, MLA
from moe_jax.models.mla_config import MlaConfig
from moe_jax.models.mamba import NO_WEIGHT_DECAY, MambaConfig
from moe_jax.models.scan import SCAN
from moe_jax.layers.moe_config import DTYPES, MoeConfig
from moe_jax.models.precision import cast_params
from moe_jax.models.sizes import count_params, flops_per_token
from moe_jax.models.transformer import Transformer
from moe_jax.models.model_config import TransformerConfig


RNG_STREAMS = ("default", "dropout", "jitter", "routing")


def moe_config(config) -> MoeConfig | None:
  """The MoeConfig of the model's MoE blocks, or None for a dense model.

  Every field is the ``moe`` key of its name (:func:`derive`) but those resolved here:
  the model's width and dtype, the expert width (``moe.d_ff``, 0: ``model.d_ff``),
  the experts' activation (``moe.activation``, "": ``model.activation``), the queue
  order (``"auto"``: by the objective) and the model-wide ``model.init_scale``
  (``moe.init_scale`` and ``moe.router_init_scale`` are factors on it).
  """
  if not config.model.moe_every:
    return None
  m, s = config.model, config.moe
  return derive(SECTIONS["moe"].cls, s, d_model=m.d_model, d_ff=expert_d_ff(config),
                activation=expert_activation(config), dtype=m.dtype,
                queue_order=queue_order(config),
                model_init_scale=m.init_scale)


def mamba_config(config) -> MambaConfig | None:
  """The MambaConfig of the model's Mamba blocks, or None if the pattern has none.

  Every field is the ``mamba`` key of its name (:func:`derive`) but ``d_model`` and the
  projections' ``init_scale``, the model-wide ``model.init_scale``.
  """
  if not any(kind.mixer == MAMBA for kind in model_pattern(config)):
    return None
  m = config.model
  return derive(SECTIONS["mamba"].cls, config.mamba, d_model=m.d_model,
                init_scale=m.init_scale)


def mla_config(config) -> MlaConfig | None:
  """The MlaConfig of the model's attention blocks with ``model.mixer="mla"`` (every
  field the ``mla`` key of its name), or None for plain attention."""
  if config.model.get("mixer", "attention") != MLA:
    return None
  return derive(SECTIONS["mla"].cls, config.mla)


def transformer_config(config, vocab_size: int) -> TransformerConfig:
  """The TransformerConfig of ``config``: every field is the ``model`` key of its name
  (:func:`derive`) but the vocabulary, ``max_len`` (``data.seq_len``), the MoE,
  Mamba and MLA configs and ``causal`` (the objective's)."""
  return derive(SECTIONS["model"].cls, config.model, vocab_size=vocab_size,
                max_len=max(config.data.seq_len, 1), moe=moe_config(config),
                mamba=mamba_config(config), mla=mla_config(config),
                causal=objectives.get_objective(config).causal)


def tokenizer_of(config, *, workdir: str | None = None):
  """The tokenizer of ``config``'s ``data.tokenizer`` (absent in older configs:
  "byte"), a relative path read from the run's ``workdir`` (None: the current
  directory); the byte tokenizer carries MASK for masked LM. See
  :func:`moe_jax.data.tokenizer.make_tokenizer`."""
  # Imported here, like objectives.Objective.tokenizer: moe_jax.data pulls in TFDS.
  from moe_jax.data.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
  return make_tokenizer(config.data.get("tokenizer", "byte"), base_dir=workdir,
                        mask_token=objectives.get_objective(config).mask_token)


def vocab_size_of(config, *, workdir: str | None = None) -> int:
  """The embedding's rows: ``data.vocab_size``, or when it is 0 (or absent, in older
  configs) the vocabulary of :func:`tokenizer_of` (the byte tokenizer's: 256 bytes +
  PAD/BOS/EOS = 259, + MASK = 260 for masked LM)."""
  vocab = int(config.data.get("vocab_size", 0))
  return vocab or tokenizer_of(config, workdir=workdir).vocab_size


def make_model(config, *, vocab_size: int | None = None, seed: int | None = None
               ) -> Transformer:
  """The Transformer of ``config`` (dense if ``model.moe_every == 0``), its
  parameters stored in ``model.param_dtype`` (:func:`moe_jax.models.precision.cast_params`:
  routers, norms and vectors stay float32).

  ``vocab_size`` defaults to :func:`vocab_size_of`.
  """
  seed = config.seed if seed is None else seed
  vocab_size = vocab_size or vocab_size_of(config)
  rngs = nnx.Rngs(params=seed, **{s: seed + 1 + i for i, s in enumerate(RNG_STREAMS)})
  model = Transformer(transformer_config(config, vocab_size), rngs=rngs)
  return cast_params(model, config.model.get("param_dtype", "float32"))


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``lr_end_fraction`` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.steps,
      end_value=config.learning_rate * config.lr_end_fraction)


def _decay_mask(params):
  """True where weight decay applies: matrices only (norms' scales and biases stay
  undecayed), and never Mamba's A_log and D (Mamba's ``_no_weight_decay``). The
  stacked parameters of a scanned model (under ``scan``) count one layer's dims."""
  def decay(path, x):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    name = keys[-1] if keys else None
    ndim = x.ndim - (SCAN in keys)
    return ndim >= 2 and name not in NO_WEIGHT_DECAY
  return jax.tree_util.tree_map_with_path(decay, params)


def _floats(tree, dtype):
  """``tree`` with its floating-point leaves cast to ``dtype`` (None stays None)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _in_float32(opt: optax.GradientTransformation, moment_dtype
                ) -> optax.GradientTransformation:
  """``opt`` computing in float32 with its state in ``moment_dtype``: the state is
  built from the parameters cast to ``moment_dtype`` (AdamW's mu and nu; Adafactor's
  statistics), and every update casts the gradients and parameters to float32 first,
  so the clipping norm, the moments' arithmetic and the updates are float32 whatever
  the parameter dtype. The updates come out float32; ``optax.apply_updates`` rounds
  ``p + u`` to the parameter's dtype."""
  def init(params):
    return opt.init(_floats(params, moment_dtype))

  def update(grads, state, params=None):
    return opt.update(_floats(grads, jnp.float32), state,
                      None if params is None else _floats(params, jnp.float32))

  return optax.GradientTransformation(init, update)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (default) or Adafactor with the warmup-cosine schedule and global-norm clip.

  ``moment_dtype`` is the storage dtype of both of AdamW's moments (Adafactor's
  statistics stay float32). With ``model.param_dtype`` or ``moment_dtype`` other than
  float32 the optimizer computes in float32 (:func:`_in_float32`); with both float32
  it is the plain optax chain.
  """
  schedule = make_schedule(config)
  moments = DTYPES[config.get("moment_dtype", "float32")]
  if config.optimizer == "adafactor":
    opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=(
        config.weight_decay or None), weight_decay_mask=_decay_mask)
  else:
    mu_dtype = None if moments == jnp.float32 else moments
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay, mask=_decay_mask,
                      mu_dtype=mu_dtype)
  if config.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
  if moments != jnp.float32 or config.model.get("param_dtype", "float32") != "float32":
    opt = _in_float32(opt, moments)
  return opt, schedule


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
