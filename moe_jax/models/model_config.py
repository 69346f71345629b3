"""The model's config: :class:`TransformerConfig` (the whole decoder-only model, with the
MoE and Mamba sub-configs), its one set of checks (:func:`validate_transformer_config`,
which the LM config's validation calls with the keys named as there) and the names it
accepts (:data:`POSITIONS`, :data:`NORMS`, :data:`MODEL_DTYPES`, the remat policies of
:data:`REMAT_POLICIES`). :mod:`moe_jax.models.block` builds the blocks from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import jax

from moe_jax.routing.depth import depth_errors, is_routed_layer
from moe_jax.models.attention_kernel import kernel_errors
from moe_jax.models.layer_pattern import (MAMBA, MOE, LayerKind, layer_pattern,
                                          pattern_errors)
from moe_jax.models.mamba import MambaConfig
from moe_jax.models.mla_config import MlaConfig, validate_mla_config
from moe_jax.models.rope import ROPE_SCALINGS
from moe_jax.models.scan import scan_errors
from moe_jax.layers.experts import ACTIVATIONS
from moe_jax.layers.moe_config import DTYPES, MoeConfig

POSITIONS = ("rotary", "learned", "none")
NORMS = ("rmsnorm", "layernorm")
# model.qk_norm: an RMSNorm on the queries and keys before the rotary embedding, over
# each whole projection (N * D values: OLMoE) or over each head (D values: Qwen3).
QK_NORMS = ("none", "projection", "head")
MODEL_DTYPES = ("float32", "bfloat16")  # compute dtypes of the model
# model.mixer: what the layer pattern's attention blocks mix with (moe_jax/models/block.py
# MIXERS): attention, or multi-head latent attention (moe_jax/models/mla.py).
MIXER_NAMES = ("attention", "mla")

# model.remat -> the jax.checkpoint policy of each block (None: jax.checkpoint's
# default, which saves nothing); "none" does not wrap the blocks at all.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the language model.

  Its fields are the LM config's ``model`` keys and defaults (all but ``vocab_size``,
  ``max_len``, ``moe``, ``mamba`` and ``causal``, which a run resolves;
  :func:`moe_jax.training.config.default_config`); :func:`validate_transformer_config`
  holds their rules.

  Attributes:
    vocab_size: V.
    num_layers: number of blocks.
    d_model: M.
    num_heads: N, query heads; ``d_model % num_heads == 0`` unless ``head_dim`` is set.
    num_kv_heads: N_kv, key/value heads (grouped-query attention, Ainslie et al. 2023):
      query head ``n`` reads KV head ``n // (N / N_kv)``; must divide ``num_heads``.
      0 (the default) resolves to ``num_heads`` at construction: multi-head attention.
    head_dim: D, the width of each head; 0 (the default) resolves to ``d_model //
      num_heads`` at construction. Both are stored resolved, so pass 0 again to
      ``dataclasses.replace`` to re-derive them for new widths.
    d_ff: H, hidden width of the dense FFN (each expert's is ``moe.d_ff``).
    max_len: longest sequence (learned positions only need it).
    moe_every: an MoE block every ``moe_every`` blocks; 0 is a dense model.
    moe_offset: block ``i`` is MoE when ``i % moe_every == moe_offset``; None is
      ``moe_every - 1`` (Switch's blocks 1, 3, ...; Jamba: 1).
    first_dense_layers: blocks ``i < first_dense_layers`` have a dense FFN whatever
      ``moe_every`` says (DeepSeek-MoE's ``first_k_dense_replace``; DeepSeekMoE 16B:
      1, with ``moe_every=1``). 0: none.
    dense_layers: blocks listed here have a dense FFN whatever ``moe_every`` says
      (Hugging Face Qwen2-MoE's and Qwen3-MoE's ``mlp_only_layers``). (): none.
    attn_layer_period, attn_layer_offset: block ``i`` mixes with attention when
      ``i % attn_layer_period == attn_layer_offset``, with Mamba otherwise (1, 0:
      all attention; Jamba: 8, 4).
    mamba: the Mamba mixer's settings (its ``d_model`` must match); needed when the
      pattern has Mamba blocks.
    moe: the MoE layer's settings (its ``d_model`` must match; its ``d_ff`` is each
      expert's width, below ``d_ff`` for fine-grained experts); None if dense.
    activation: the dense FFNs' activation; the experts' is ``moe.activation`` (an LM
      config's ``moe.activation=""`` takes this one).
    position: "rotary" | "learned" | "none".
    norm: "rmsnorm" | "layernorm".
    norm_eps: the epsilon of every norm of the blocks and the final norm (and of the
      q/k norms), added to the mean square (the variance for LayerNorm) under the
      square root (T5, Switch: 1e-6; Mixtral, OLMoE: 1e-5).
    qk_norm: "none" | "projection" (an RMSNorm over each token's whole query
      projection, ``N * D`` values, and over its whole key projection, ``N_kv * D``:
      OLMoE) | "head" (an RMSNorm over each head's ``D`` values, one scale shared by
      the heads: Qwen3), applied before the rotary embedding.
    qkv_bias: the query, key and value projections add a learned bias (Qwen2); the
      output projection has none.
    dropout: dropout on attention output and FFN output (residual branches).
    init_scale: the model-wide init scale s. Every weight matrix is drawn from a
      truncated normal of variance ``s / fan_in`` (attention, dense FFN, output
      projection), the embedding from a normal of variance ``s`` and learned positions
      with std ``0.02 * sqrt(s)``; norm scales start at 1. The MoE layer's experts and
      router take their own absolute scales from ``moe`` (an LM config derives them
      as ``s`` times its ``moe.init_scale`` / ``moe.router_init_scale``).
      Switch (Fedus et al. 2021, Sec. 2.3) uses s = 0.1.
    tie_embeddings: output projection is the transposed input embedding.
    dtype: compute dtype, "float32" | "bfloat16".
    rope_base: rotary base frequency.
    mod_every: Mixture-of-Depths: block ``i`` is routed when ``i % mod_every ==
      mod_every - 1``; 0 is off, otherwise >= 2 (Raposo et al. 2024: 2).
    mod_capacity: the fraction of each sequence a routed block runs, ``k =
      ceil(mod_capacity * L)`` (the paper's best: 0.125).
    mod_predictor: what decides routing at sampling, where the top-k over the
      sequence would look ahead: "router_bce" (``sigmoid(r) > 0.5``, with a BCE on the
      router logits) or "mlp" (a small MLP on stop-gradient inputs, with the same
      BCE); see :mod:`moe_jax.models.mod`.
    causal: attention is causal (a language model that generates); False:
      bidirectional, every token attends to every real token of its sequence (masked
      language modelling, :mod:`moe_jax.training.objectives`), and the model cannot
      decode.
    remat: what each block keeps for the backward pass (:data:`REMAT_POLICIES`):
      "none" keeps every residual, "full" recomputes the whole block from its input
      (``nnx.remat`` saving nothing), "dots" saves the matmuls without batch
      dimensions (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``) and
      recomputes the rest. The values are the same either way; only memory and
      compute change.
    scan_layers: run the blocks as a scan over the layer pattern's repeating unit
      (:mod:`moe_jax.models.scan`), so a deep model traces and compiles one unit; the
      values are the same as unrolled. The parameters of the unit are stacked
      (``scan/j`` with a leading ``[repeats]`` axis), so the checkpoint layout differs.
    mixer: what the layer pattern's attention blocks mix with: "attention" or "mla"
      (multi-head latent attention, :mod:`moe_jax.models.mla`, configured by ``mla``;
      same block paths ``attn_norm``/``attn``). Mamba blocks stay Mamba.
    mla: the MLA settings; needed when ``mixer="mla"`` (a run resolves it from the
      ``mla`` section).
    rope_scaling: "none" (RoFormer's frequencies) or "yarn" (YaRN, Peng et al. 2023,
      as DeepSeek-V3; :mod:`moe_jax.models.rope`), for attention's and MLA's rotary
      dims.
    rope_factor: YaRN's context extension factor ``s`` (DeepSeek-V3: 40).
    rope_original_max_len: the context the rotary base was trained for (Hugging Face
      ``original_max_position_embeddings``; DeepSeek-V3: 4096).
    yarn_beta_fast, yarn_beta_slow: the rotation counts that bound YaRN's ramp between
      kept and interpolated frequencies (32 and 1).
    yarn_mscale, yarn_mscale_all_dim: YaRN's magnitude scales (Hugging Face ``mscale``
      and ``mscale_all_dim``; DeepSeek-V3: 1 and 1). The rotated queries and keys are
      scaled by ``mscale(s, yarn_mscale) / mscale(s, yarn_mscale_all_dim)`` when both
      are non-zero, else by ``mscale(s) = 0.1 ln(s) + 1``; MLA's softmax scale is
      multiplied by ``mscale(s, yarn_mscale_all_dim)^2`` when it is non-zero.
    mtp_depth: D, multi-token prediction modules (DeepSeek-V3, Sec. 2.2;
      :mod:`moe_jax.models.mtp`): module k predicts token ``i + k + 1`` at position i
      from the shared embedding and output head; 0 (the default) is off (DeepSeek-V3:
      1). Needs a causal model.
    mtp_loss_coef: lambda, the MTP loss's weight: ``(lambda / D) * sum_k L^k`` is added
      to the training loss (DeepSeek-V3: 0.3, then 0.1).
    attention_kernel: how causal attention and MLA compute their softmax
      (:mod:`moe_jax.models.attention_kernel`): "dense" (the whole ``[Q, K]`` score
      matrix) or "blocked" (``attention_block``-long tiles with an online softmax:
      the same values, memory linear in the context; for long prefills).
      Bidirectional attention is always dense.
    attention_block: the blocked kernel's query and key tile length.
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  max_len: int = 2048
  moe_every: int = 0
  moe: MoeConfig | None = None
  activation: str = "gelu"
  position: str = "rotary"
  norm: str = "rmsnorm"
  dropout: float = 0.0
  init_scale: float = 1.0
  tie_embeddings: bool = False
  dtype: str = "float32"
  rope_base: float = 10000.0
  moe_offset: int | None = None
  attn_layer_period: int = 1
  attn_layer_offset: int = 0
  mamba: MambaConfig | None = None
  mod_every: int = 0
  mod_capacity: float = 0.125
  mod_predictor: str = "router_bce"
  causal: bool = True
  num_kv_heads: int = 0
  head_dim: int = 0
  remat: str = "none"
  scan_layers: bool = False
  first_dense_layers: int = 0
  dense_layers: tuple[int, ...] = ()
  norm_eps: float = 1e-6
  qk_norm: str = "none"
  qkv_bias: bool = False
  mixer: str = "attention"
  mla: MlaConfig | None = None
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 0.0
  mtp_depth: int = 0
  mtp_loss_coef: float = 0.3
  attention_kernel: str = "dense"
  attention_block: int = 512

  def __post_init__(self):
    if isinstance(self.dense_layers, list):  # a config read back from JSON
      object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
    for msg in validate_transformer_config(self):
      raise ValueError(msg)
    # Resolved here, so every reader sees the numbers in use.
    object.__setattr__(self, "head_dim", self.head_dim or self.d_model // self.num_heads)
    object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
    if self.moe_every and self.moe is None:
      raise ValueError("moe_every > 0 needs a MoeConfig in `moe`.")
    if self.mamba_blocks and self.mamba is None:
      raise ValueError(f"blocks {self.mamba_blocks} are Mamba blocks (attn_layer_period="
                       f"{self.attn_layer_period}); they need a MambaConfig in `mamba`.")
    if not self.causal and (self.mamba_blocks or self.mod_every):
      raise ValueError("causal=False needs an all-attention model without "
                       "Mixture-of-Depths blocks (Mamba's scan and MoD's predictor "
                       "are causal).")
    if self.mixer == "mla" and self.mla is None:
      raise ValueError("mixer='mla' needs an MlaConfig in `mla`.")
    for msg in validate_mla_config(self.mla) if self.mla is not None else ():
      raise ValueError(f"mla.{msg}")
    if not self.causal and self.mtp_depth:
      raise ValueError(f"mtp_depth={self.mtp_depth} predicts later tokens, which needs "
                       "causal=True; use mtp_depth=0.")
    if self.mamba is not None and self.mamba.d_model != self.d_model:
      raise ValueError(f"mamba.d_model={self.mamba.d_model} must equal d_model="
                       f"{self.d_model}.")

  @property
  def kv_groups(self) -> int:
    """Query heads per KV head, ``N / N_kv`` (1: multi-head attention)."""
    return self.num_heads // self.num_kv_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def layers(self) -> tuple[LayerKind, ...]:
    """``(mixer, ffn)`` of every block
    (:func:`~moe_jax.models.layer_pattern.layer_pattern`)."""
    return layer_pattern(self.num_layers, attn_layer_period=self.attn_layer_period,
                         attn_layer_offset=self.attn_layer_offset,
                         moe_every=self.moe_every, moe_offset=self.moe_offset,
                         first_dense_layers=self.first_dense_layers,
                         dense_layers=self.dense_layers)

  def is_moe_block(self, index: int) -> bool:
    return self.layers[index].ffn == MOE

  @property
  def moe_blocks(self) -> tuple[int, ...]:
    return tuple(i for i, kind in enumerate(self.layers) if kind.ffn == MOE)

  @property
  def mamba_blocks(self) -> tuple[int, ...]:
    return tuple(i for i, kind in enumerate(self.layers) if kind.mixer == MAMBA)

  @property
  def mod_blocks(self) -> tuple[int, ...]:
    """The Mixture-of-Depths routed blocks."""
    return tuple(i for i in range(self.num_layers) if is_routed_layer(i, self.mod_every))


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def validate_transformer_config(cfg, *, prefix: str = "",
                                seq_len: int | None = None) -> list[str]:
  """Every problem with the model keys of ``cfg``, one sentence each naming the key
  and the fix; the one home of these rules.

  ``cfg`` may be a :class:`TransformerConfig` or any object with its attributes: the
  LM config's ``model`` section is checked with ``prefix="model."`` (put before every
  key name) and its ``seq_len``, which Mixture-of-Depths' capacity needs. The
  sub-configs (``moe``, ``mamba``) have their own checks; the fields an LM config
  resolves (``vocab_size``, ``max_len``, ``causal``) are not checked here.
  """
  p, errors = prefix, []

  def need(name: str, ok: bool, fix: str):
    if not ok:
      errors.append(f"{p}{name}={getattr(cfg, name)!r} {fix}")

  for name in ("num_layers", "d_model", "num_heads", "d_ff"):
    need(name, _is_int(getattr(cfg, name)) and getattr(cfg, name) >= 1,
         "must be a positive integer.")
  kv_heads, head_dim, d_model, num_heads = (cfg.num_kv_heads, cfg.head_dim, cfg.d_model,
                                            cfg.num_heads)
  need("num_kv_heads", _is_int(kv_heads) and kv_heads >= 0,
       "must be an integer >= 0 (0: num_heads, multi-head attention).")
  need("head_dim", _is_int(head_dim) and head_dim >= 0,
       "must be a positive integer, or 0 for d_model / num_heads.")
  heads_ok = _is_int(num_heads) and num_heads >= 1
  if _is_int(kv_heads) and kv_heads >= 1 and heads_ok and num_heads % kv_heads:
    errors.append(f"{p}num_kv_heads={kv_heads} must divide {p}num_heads={num_heads}; use "
                  "a divisor of num_heads (0: num_heads).")
  if _is_int(head_dim) and head_dim >= 1 and cfg.position == "rotary" and head_dim % 2:
    errors.append(f"{p}head_dim={head_dim} must be even for rotary positions; use an "
                  f"even head_dim or {p}position='learned'.")
  if _is_int(d_model) and d_model >= 1 and heads_ok and head_dim == 0:
    if d_model % num_heads:
      errors.append(f"{p}d_model={d_model} must be divisible by {p}num_heads={num_heads}"
                    f"; change one of them, or set {p}head_dim.")
    elif cfg.position == "rotary" and (d_model // num_heads) % 2:
      errors.append(f"{p}d_model / {p}num_heads = {d_model // num_heads} must be even "
                    f"for rotary positions; change num_heads or use {p}position="
                    "'learned'.")
  need("moe_every", _is_int(cfg.moe_every) and cfg.moe_every >= 0,
       "must be an integer >= 0 (0 dense, 2 Switch: every other block).")
  errors.extend(pattern_errors(cfg.num_layers, cfg.attn_layer_period,
                               cfg.attn_layer_offset, cfg.moe_every, cfg.moe_offset,
                               first_dense_layers=cfg.first_dense_layers,
                               dense_layers=cfg.dense_layers, prefix=p))
  errors.extend(depth_errors(cfg.num_layers, cfg.mod_every, cfg.mod_capacity,
                             cfg.mod_predictor, prefix=p, seq_len=seq_len))
  need("dtype", cfg.dtype in MODEL_DTYPES, f"is unknown; use one of "
       f"{', '.join(MODEL_DTYPES)}.")
  need("position", cfg.position in POSITIONS, "is unknown; use 'rotary', 'learned' or "
       "'none' (no positional encoding, Jamba).")
  need("activation", cfg.activation in ACTIVATIONS, f"is unknown; use one of "
       f"{', '.join(ACTIVATIONS)}.")
  need("norm", cfg.norm in NORMS, "is unknown; use 'rmsnorm' or 'layernorm'.")
  need("norm_eps", _is_real(cfg.norm_eps) and cfg.norm_eps > 0,
       "must be a finite number > 0 (T5: 1e-6; Mixtral: 1e-5).")
  need("qk_norm", cfg.qk_norm in QK_NORMS, "is unknown; use 'none', 'projection' (over "
       "the whole query and key projections, OLMoE) or 'head' (per head, Qwen3).")
  need("qkv_bias", cfg.qkv_bias is True or cfg.qkv_bias is False,
       "must be True or False.")
  need("dropout", _is_real(cfg.dropout) and 0 <= cfg.dropout < 1, "must be in [0, 1).")
  need("init_scale", _is_real(cfg.init_scale) and cfg.init_scale > 0, "must be > 0.")
  need("rope_base", _is_real(cfg.rope_base) and cfg.rope_base > 0,
       "must be a finite number > 0 (RoFormer: 10000).")
  need("remat", cfg.remat in REMAT_POLICIES, "is unknown; use 'none', 'full' (recompute "
       "each block in the backward pass) or 'dots' (keep the matmuls without batch "
       "dimensions).")
  errors.extend(_mixer_errors(cfg, p))
  errors.extend(kernel_errors(getattr(cfg, "attention_kernel", "dense"),
                              getattr(cfg, "attention_block", 512), p))
  need("mtp_depth", _is_int(cfg.mtp_depth) and cfg.mtp_depth >= 0,
       "must be an integer >= 0 (0: no multi-token prediction; DeepSeek-V3: 1).")
  need("mtp_loss_coef", _is_real(cfg.mtp_loss_coef) and cfg.mtp_loss_coef >= 0,
       "must be a finite number >= 0 (DeepSeek-V3: 0.3, then 0.1).")
  if not errors:  # the unit is looked for in a valid pattern only
    errors.extend(scan_errors(cfg, prefix=p))
  return errors


def _mixer_errors(cfg, p: str) -> list[str]:
  """``mixer`` and the rotary scaling keys (YaRN), one line each."""
  errors = []

  def need(name: str, ok: bool, fix: str):
    value = getattr(cfg, name, None)
    if not ok:
      errors.append(f"{p}{name}={value!r} {fix}")

  mixer = getattr(cfg, "mixer", "attention")
  need("mixer", mixer in MIXER_NAMES, "is unknown; use 'attention' or 'mla' (multi-head "
       "latent attention, configured by the mla.* keys).")
  if mixer == "mla" and cfg.position != "rotary":
    errors.append(f"{p}mixer='mla' needs rotary positions (its qk_rope_head_dim dims), "
                  f"but {p}position={cfg.position!r}; use {p}position='rotary'.")
  scaling = getattr(cfg, "rope_scaling", "none")
  need("rope_scaling", scaling in ROPE_SCALINGS, "is unknown; use 'none' or 'yarn'.")
  if scaling != "yarn":
    return errors
  factor = cfg.rope_factor
  need("rope_factor", _is_real(factor) and factor >= 1,
       "must be a number >= 1 with rope_scaling='yarn' (DeepSeek-V3: 40).")
  need("rope_original_max_len", _is_int(cfg.rope_original_max_len)
       and cfg.rope_original_max_len >= 1,
       "must be a positive integer, the pre-YaRN context (DeepSeek-V3: 4096).")
  for name in ("yarn_beta_fast", "yarn_beta_slow"):
    need(name, _is_real(getattr(cfg, name)) and getattr(cfg, name) > 0,
         "must be a number > 0 (YaRN: beta_fast 32, beta_slow 1).")
  for name in ("yarn_mscale", "yarn_mscale_all_dim"):
    need(name, _is_real(getattr(cfg, name)) and getattr(cfg, name) >= 0,
         "must be a number >= 0 (DeepSeek-V3: 1).")
  return errors
