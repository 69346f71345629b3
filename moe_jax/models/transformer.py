"""Decoder-only causal Transformer whose feed-forward blocks are (some of them) MoE layers.

``logits, moe_aux = Transformer(cfg, rngs=rngs)(tokens)`` maps ``i32[B, L]`` tokens to
``f32[B, L, V]`` next-token logits and a dict ``{layer index: MoeAux}`` with one entry
per MoE block (empty for a dense model).

Architecture (nanoGPT-sized, T5/Switch conventions):

* pre-norm residual blocks ``x + mixer(norm(x))``, ``x + ffn(norm(x))``, final norm;
  RMSNorm by default (T5), LayerNorm optional;
* multi-head or grouped-query (``num_kv_heads``) causal self-attention with rotary
  positions (RoFormer), learned absolute positions, or none (Jamba: the Mamba layers
  carry the order);
* the layer pattern (:mod:`moe_jax.models.layer_pattern`, Jamba's keys) picks each
  block's token mixer and FFN. Block ``i`` (0-based) mixes with causal self-attention
  when ``i % attn_layer_period == attn_layer_offset`` and with a Mamba mixer
  (:mod:`moe_jax.models.mamba`) otherwise; the defaults (1, 0) are a plain Transformer.
  The mixers are built from the :data:`~moe_jax.models.block.MIXERS` registry, so a
  block never asks which one it has. Its FFN is an
  :class:`~moe_jax.layers.moe_layer.MoeLayer` when ``moe_every > 0 and i % moe_every ==
  moe_offset`` (``moe_offset`` None: ``moe_every - 1``) and ``i >= first_dense_layers``,
  otherwise a :class:`~moe_jax.layers.experts.DenseFfn` of width ``d_ff`` and
  ``activation`` (the experts' are ``moe.d_ff`` and ``moe.activation``).
  Switch (Fedus et al. 2021) replaces every other FFN, i.e. ``moe_every=2`` -> blocks
  1, 3, ... A dense model is the same network with ``moe_every=0``;
* Mixture-of-Depths (Raposo et al. 2024, :mod:`moe_jax.models.mod`): with
  ``mod_every > 0`` block ``i`` is a routed block when ``i % mod_every == mod_every -
  1`` (2: blocks 1, 3, ..., alternating with full blocks). Only the ``k =
  ceil(mod_capacity * L)`` tokens of each sequence with the largest router weight ``r``
  run it, and they come out as ``x + r * f(x)``; the others skip it. ``forward`` reports
  each routed block's :class:`~moe_jax.models.mod.DepthAux`;
* separate input and output embeddings by default (tying is an option);
* multi-token prediction (DeepSeek-V3, :mod:`moe_jax.models.mtp`): with ``mtp_depth``
  D > 0 the model owns D modules ``mtp/0 .. mtp/D-1`` after the blocks (never
  scanned), which share the embedding and output head; ``forward`` returns their
  logits as ``ModelOutput.mtp_logits``;
* ``remat`` (``model.remat``): ``forward`` wraps every block in ``nnx.remat`` with the
  policy of :data:`~moe_jax.models.model_config.REMAT_POLICIES` ("none" leaves them unwrapped).
* ``scan_layers`` (``model.scan_layers``): the blocks after an unscanned prefix run as
  a ``jax.lax.scan`` over the layer pattern's repeating unit (:mod:`moe_jax.models.scan`),
  whose parameters are stacked (``scan/j``); the values are the unrolled model's, and
  :meth:`Transformer.unrolled` gives the unrolled twin (decoding uses it).

Compute runs in ``dtype`` (float32 or bfloat16); norms, softmax, the router (inside
MoeLayer) and the logits stay float32. The weights are built float32;
``moe_jax.training.build.make_model`` stores them in ``model.param_dtype``
(:mod:`moe_jax.models.precision`: routers, norm scales and vectors stay float32).

Every module declares its parameters' logical axes (``logical_axes`` metadata; this
file's are :data:`EMBED_AXES`), its forward FLOPs and its LoRA targets
(:mod:`moe_jax.layers.protocols`). ``param_sharding.shard_model`` maps the axes onto a
mesh; ``param_sharding.format_sharding`` prints the table; :mod:`moe_jax.models.sizes`
sums the FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.experts import scaled_init
from moe_jax.layers.moe_layer import MoeAux, MoeLayer
from moe_jax.layers.projection import project
from moe_jax.layers.protocols import Flops
from moe_jax.layers.router_families import SelectionBias, TokenContext
from moe_jax.models.block import Block, Norm, _param
from moe_jax.models.model_config import REMAT_POLICIES, TransformerConfig
from moe_jax.models.mod import RoutedBlock
from moe_jax.models.mtp import MtpModule, mtp_forward, mtp_index
from moe_jax.models.scan import LAYERS_AXIS, ScanUnit, model_unit, unstack_layers

# Logical axis names of the parameters defined in this file.
EMBED_AXES = {"embedding": ("vocab", "embed"), "positions": ("length", "embed"),
              "unembed": ("embed", "vocab")}


@flax.struct.dataclass
class ModelOutput:
  """:meth:`Transformer.forward`'s result.

  Attributes:
    logits: f32[B, L, V]; None when :meth:`Transformer.forward` was asked for the
      hidden states instead (``logits=False``).
    moe_aux: ``{block index: MoeAux}`` of the MoE blocks.
    depth_aux: ``{block index: DepthAux}`` of the Mixture-of-Depths routed blocks.
    mtp_logits: D f32[B, L, V], the multi-token prediction modules' (depth k's at
      position i predicts token ``i + k + 1``); None without them (``mtp_depth=0``)
      or when not asked for.
    mtp_moe_aux: ``{num_layers + k - 1: MoeAux}`` of the MoE blocks of the MTP modules
      (:func:`~moe_jax.models.mtp.mtp_index`); empty without them.
    hidden: [B, L, M], the final normed hidden states, what :meth:`Transformer.output`
      projects to ``logits`` (``logits=False`` only; then ``mtp_logits`` hold the MTP
      modules' normed states, [B, L, M] each, likewise).
  """

  logits: jax.Array | None
  moe_aux: dict[int, MoeAux]
  depth_aux: dict[int, Any]
  mtp_logits: tuple[jax.Array, ...] | None = None
  mtp_moe_aux: dict[int, MoeAux] = dataclasses.field(default_factory=dict)
  hidden: jax.Array | None = None


class Transformer(nnx.Module):
  """Decoder-only causal LM: ``logits, moe_aux = model(tokens)``; ``model.forward``
  also returns the Mixture-of-Depths blocks' aux (:class:`ModelOutput`)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    if cfg.moe is not None and cfg.moe.d_model != cfg.d_model:
      raise ValueError("moe.d_model must equal the model's d_model.")
    self.cfg = cfg
    # Embedding std 1 (T5); logits are scaled by 1/sqrt(M) when tied, below. Untied
    # (the default of the experiment configs) starts from uniform predictions instead
    # of favouring the input token, which a tied embedding does at init.
    std = cfg.init_scale ** 0.5
    self.embedding = _param(
        std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32),
        EMBED_AXES["embedding"])
    self.positions = (_param(
        0.02 * std * jax.random.normal(rngs.params(), (cfg.max_len, cfg.d_model)),
        EMBED_AXES["positions"]) if cfg.position == "learned" else None)
    blocks = [(RoutedBlock if i in cfg.mod_blocks else Block)(cfg, i, rngs=rngs)
              for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      # Built unrolled (the same draws), then the unit's blocks take the stacked state.
      unit = model_unit(cfg)
      self.blocks = nnx.List(blocks[:unit.prefix])
      self.scan = nnx.List([_stacked(blocks, unit, j) for j in range(unit.period)])
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.unembed = (_param(
        scaled_init(cfg.init_scale)(rngs.params(), (cfg.d_model, cfg.vocab_size),
                                    jnp.float32),
        EMBED_AXES["unembed"]) if not cfg.tie_embeddings else None)
    # Built last, so that the main model's draws are those of a model without them.
    self.mtp = (nnx.List([MtpModule(cfg, k, rngs=rngs)
                          for k in range(1, cfg.mtp_depth + 1)])
                if cfg.mtp_depth else None)

  def flops_per_token(self, tokens: int) -> Flops:
    """The output projection, ``2 * M * V``, tied or not; the embedding lookup and
    learned positions are free."""
    del tokens
    return Flops.dense(2 * self.cfg.d_model * self.cfg.vocab_size)

  def __call__(self, tokens: jax.Array, *, deterministic: bool = False,
               token_mask: jax.Array | None = None, use_predictor: bool = False
               ) -> tuple[jax.Array, dict[int, MoeAux]]:
    """tokens: i32[B, L] -> (f32[B, L, V] logits, {block index: MoeAux}).

    ``token_mask`` (bool[B, L], optional) marks padding with False; MoE layers neither
    route it nor count it in their losses and metrics (causal attention already keeps
    trailing padding from affecting real tokens). ``use_predictor``: see
    :meth:`forward`. The multi-token prediction modules do not run.
    """
    out = self.forward(tokens, deterministic=deterministic, token_mask=token_mask,
                       use_predictor=use_predictor, with_mtp=False)
    return out.logits, out.moe_aux

  def forward(self, tokens: jax.Array, *, deterministic: bool = False,
              token_mask: jax.Array | None = None,
              use_predictor: bool = False, with_mtp: bool = True,
              logits: bool = True) -> ModelOutput:
    """tokens: i32[B, L] -> :class:`ModelOutput` (logits, MoE and MoD aux, and the
    multi-token prediction logits when the model has MTP modules and ``with_mtp``).
    ``logits=False`` stops before the output projection: the result holds the normed
    hidden states instead (``hidden``, and the MTP modules' in ``mtp_logits``), for a
    loss that projects them a chunk at a time (``loss_chunk``,
    :func:`moe_jax.training.losses.chunked_lm_loss`).

    Mixture-of-Depths routed blocks select each sequence's top-k tokens by router
    weight (training and evaluation; the choice looks at later tokens, see
    docs/mod.md), or with ``use_predictor`` the tokens their predictor routes, one
    token at a time, as cached sampling does (causal). Every block's MoE layer receives
    the token ids in its :class:`~moe_jax.layers.router_families.TokenContext`.
    """
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self.embed(tokens, positions)
    context = TokenContext(token_ids=tokens)
    moe_aux, depth_aux = {}, {}

    def run(block, x, positions, token_mask, context):
      return block(x, positions, deterministic=deterministic, token_mask=token_mask,
                   use_predictor=use_predictor, context=context)

    if self.cfg.remat != "none":
      # Each block's backward pass recomputes its forward pass from the block's input
      # (and the RNG counts it read, so the recomputation draws the same noise).
      run = nnx.remat(run, policy=REMAT_POLICIES[self.cfg.remat])
    for block in self.blocks:
      x, aux = run(block, x, positions, token_mask, context)
      if aux.moe is not None:
        moe_aux[block.index] = aux.moe
      if aux.depth is not None:
        depth_aux[block.index] = aux.depth
    if self.cfg.scan_layers:
      x = self._run_scan(run, x, positions, token_mask, context, moe_aux, depth_aux)
    mtp_logits, mtp_moe_aux = None, {}
    if self.mtp is not None and with_mtp:
      mtp_logits, mtp_moe_aux = mtp_forward(self, tokens, x, positions, token_mask, run,
                                            logits=logits)
    if not logits:
      return ModelOutput(logits=None, moe_aux=moe_aux, depth_aux=depth_aux,
                         mtp_logits=mtp_logits, mtp_moe_aux=mtp_moe_aux,
                         hidden=self.final_norm(x))
    return ModelOutput(logits=self.head(x), moe_aux=moe_aux, depth_aux=depth_aux,
                       mtp_logits=mtp_logits, mtp_moe_aux=mtp_moe_aux)

  @property
  def unit(self) -> ScanUnit:
    """The scanned unit (``cfg.scan_layers`` only)."""
    return model_unit(self.cfg)

  def _run_scan(self, run, x, positions, token_mask, context, moe_aux, depth_aux):
    """Runs the stacked unit ``repeats`` times (``jax.lax.scan``): each step merges row
    ``r`` of every unit block's state into modules, runs them in order and returns
    their new state (RNG counts), which goes back into the stacked variables. The aux
    of row ``r`` of unit block ``j`` is block ``prefix + r * period + j``'s."""
    unit = self.unit
    shared = _shared_rngs(self.scan)
    graphdef, rngs, state = nnx.split(self.scan, shared, ...)

    def body(carry, row_state):
      x, rngs = carry
      blocks = nnx.merge(graphdef, rngs, row_state)
      auxes = []
      for block in blocks:
        x, aux = run(block, x, positions, token_mask, context)
        auxes.append(aux)
      _, rngs, row_state = nnx.split(blocks, shared, ...)
      return (x, rngs), (row_state, auxes)

    (x, rngs), (state, auxes) = jax.lax.scan(body, (x, rngs), state)
    nnx.update(self.scan, rngs, state)
    for j, aux in enumerate(auxes):
      for r in range(unit.repeats):
        index = unit.block_index(r, j)
        if aux.moe is not None:
          moe_aux[index] = jax.tree.map(lambda a, r=r: a[r], aux.moe)
        if aux.depth is not None:
          depth_aux[index] = jax.tree.map(lambda a, r=r: a[r], aux.depth)
    return x

  def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """i32[B, L] tokens at i32[L] or i32[B, L] positions -> [B, L, M] (compute dtype)."""
    # Added in float32 when that is the compute dtype (bfloat16 weights cast up first).
    x = jnp.take(self.embedding[...], tokens, axis=0)
    x = x.astype(jnp.promote_types(x.dtype, self.cfg.compute_dtype))
    if self.positions is not None:
      x = x + jnp.take(self.positions[...], positions, axis=0)
    return x.astype(self.cfg.compute_dtype)

  def head(self, x: jax.Array) -> jax.Array:
    """[B, L, M] last hidden states -> f32[B, L, V] logits (final norm, unembedding)."""
    return self.output(self.final_norm(x))

  def output(self, x: jax.Array) -> jax.Array:
    """[B, L, M] normed hidden states -> f32[B, L, V] logits: the output projection
    (the unembedding, or the tied embedding over sqrt(M)), which the multi-token
    prediction modules share."""
    cfg = self.cfg
    if self.unembed is None:
      kernel = self.embedding[...].T / jnp.sqrt(cfg.d_model)
    else:
      kernel = self.unembed[...]
    return project(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)

  def update_selection_biases(self, choice_counts: dict[int, jax.Array]) -> None:
    """Moves each MoE block's selection bias (if it has one) by its f32[E] choice
    counts, ``{block index: MoeAux.metrics["choice_counts"]}`` of one training step
    (the MTP modules' blocks under :func:`~moe_jax.models.mtp.mtp_index`)."""
    for block in self.blocks:
      if block.is_moe and block.index in choice_counts:
        block.ffn.update_selection_bias(choice_counts[block.index])
    for k, module in enumerate(self.mtp or (), start=1):
      if module.block.is_moe and mtp_index(self.cfg, k) in choice_counts:
        module.block.ffn.update_selection_bias(choice_counts[mtp_index(self.cfg, k)])
    if not self.cfg.scan_layers:
      return
    unit = self.unit
    for j, block in enumerate(self.scan):
      if not block.is_moe or unit.block_index(0, j) not in choice_counts:
        continue
      # Row by row: each row is a layer whose bias moves by its own counts.
      graphdef, biases, rest = nnx.split(block.ffn, SelectionBias, ...)
      rows = []
      for r in range(unit.repeats):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], biases), rest)
        layer.update_selection_bias(choice_counts[unit.block_index(r, j)])
        rows.append(nnx.state(layer, SelectionBias))
      nnx.update(block.ffn, jax.tree.map(lambda *a: jnp.stack(a), *rows))

  def unrolled(self, *, abstract: bool = False) -> "Transformer":
    """This model with ``scan_layers=False``: itself when not scanned, otherwise a copy
    with the unit's rows as blocks ``prefix .. L-1`` (the same values; MoE layers
    keep this model's layout; its RNG streams are fresh, seed 0). ``abstract``:
    shapes only (``nnx.eval_shape``), for counting parameters and FLOPs."""
    if not self.cfg.scan_layers:
      return self
    cfg = dataclasses.replace(self.cfg, scan_layers=False)
    copy = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    if abstract:
      return copy
    graphdef, streams, state = nnx.split(copy, nnx.RngState, ...)
    values = unstack_layers(
        nnx.state(self, nnx.Not(nnx.RngState)).to_pure_dict(), self.unit)
    nnx.replace_by_pure_dict(state, values)
    copy = nnx.merge(graphdef, streams, state)
    for _, stream in nnx.iter_graph(copy):  # fresh streams (reseed before training)
      if isinstance(stream, nnx.RngStream):
        stream.key.set_value(jax.random.key(0))
        stream.count.set_value(jnp.zeros((), jnp.uint32))
    layouts = [m.layout for _, m in nnx.iter_modules(self) if isinstance(m, MoeLayer)]
    for _, module in nnx.iter_modules(copy):
      if isinstance(module, MoeLayer) and layouts:
        module.layout = layouts[0]
    return copy


def _shared_rngs(module):
  """An nnx filter of the state under the model-wide ``nnx.Rngs`` that the MoE layers
  share (jitter and routing draws): one stream whose count runs on from block to
  block, so a scan carries it instead of stacking it."""
  prefixes = [tuple(path) for path, node in nnx.iter_graph(module)
              if isinstance(node, nnx.Rngs)]
  return lambda path, _: any(tuple(path[:len(p)]) == p for p in prefixes)


def _stacked(blocks: list[Block], unit: ScanUnit, position: int) -> Block:
  """Unit block ``position`` holding the state of its ``unit.repeats`` rows stacked
  along a new leading axis, whose logical axis is ``"layers"``."""
  rows = [blocks[unit.block_index(r, position)] for r in range(unit.repeats)]
  block = rows[0]
  shared = _shared_rngs(block)
  nnx.update(block, jax.tree.map(lambda *a: jnp.stack(a), *[
      nnx.split(row, shared, ...)[2] for row in rows]))
  for _, var in nnx.iter_graph(block):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata().get("logical_axes")
      if axes is not None:
        var.set_metadata(logical_axes=(LAYERS_AXIS, *axes))
  return block
