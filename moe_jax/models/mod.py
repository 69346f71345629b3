"""Mixture-of-Depths (Raposo et al. 2024): blocks that only some tokens go through.

A routed block (:class:`RoutedBlock`) is a :class:`~moe_jax.models.block.Block` with a
router in front (paper, Sec. 3):

* the router maps each token's block input to a scalar weight ``r = x . w`` (no bias,
  float32; :class:`DepthRouter`);
* in each sequence the ``k = ceil(mod_capacity * L)`` tokens with the largest ``r``
  are selected, ties to the lower position (:func:`moe_jax.routing.select_top_k`);
* they are gathered into ``[B, k, M]`` and only they run the block: attention among
  the selected tokens alone, causal by their original positions, rotary angles from
  their original positions; then the FFN (dense or MoE);
* with ``f`` the block's residual delta (attention and FFN branches together, not the
  block's output), a selected token leaves as ``x + r * f(x)``, every other token as
  ``x`` exactly. ``r`` multiplying ``f`` is what trains the router.

The top-k over a sequence looks at later tokens: in training a future token can push
an earlier one out of the selection (and so change the earlier outputs). Everything
else is causal. Sampling cannot look ahead, so it routes with a predictor of the
top-k choice, a token at a time (``mod_predictor``, :data:`PREDICTORS`):

* ``"router_bce"``: a binary cross-entropy on the router logits ``r`` against the
  top-k membership; sampling routes a token when ``sigmoid(r) > 0.5``;
* ``"mlp"``: a small MLP on stop-gradient block inputs, trained by the same BCE; it
  never touches the LM loss.

The BCE is weighted by ``model.mod_aux_loss_coef`` in the training loss
(:func:`moe_jax.training.depth_metrics.depth_loss`). At decoding
(:meth:`RoutedBlock.decode`) a token the predictor does not route writes no KV entry in
the block's cache, so later tokens cannot attend to it there, and with
``use_predictor=True`` the full forward pass routes the same way (the reference of
cached decoding). See docs/mod.md.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.experts import scaled_init
from moe_jax.layers.protocols import Flops, param_size
from moe_jax.layers.router_families import TokenContext
from moe_jax.routing import depth
from moe_jax.models.block import Block, BlockAux
from moe_jax.models.model_config import TransformerConfig

# Logical axis names of this file's parameters (moe_jax.parallel.sharding maps them; all
# replicated but for M, which no rule splits).
DEPTH_ROUTER_AXES = {"kernel": ("embed",)}
PREDICTOR_AXES = {"wi": ("embed", None), "bi": (None,), "wo": (None,), "bo": ()}


class DepthRouter(nnx.Module):
  """``r = x . w``: one bias-free float32 weight per token, ``w`` f32[M].

  Drawn like the model's other matrices (truncated normal of variance
  ``init_scale / M``), so ``r`` starts with the spread of a unit-variance input's
  projection.
  """

  def __init__(self, d_model: int, *, init_scale: float = 1.0, rngs: nnx.Rngs):
    w = scaled_init(init_scale)(rngs.params(), (d_model, 1), jnp.float32)[:, 0]
    self.kernel = nnx.Param(w, logical_axes=DEPTH_ROUTER_AXES["kernel"])

  def flops_per_token(self, tokens: int) -> Flops:
    """``2 * M``, counted as routing."""
    del tokens
    return Flops(router=2 * param_size(self))

  def param_groups(self) -> dict[str, int]:
    return {"router": param_size(self)}

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, M] any dtype -> f32[B, L] router weights."""
    # HIGHEST: no bf16/TF32 passes, so the selection does not depend on the backend.
    return jnp.einsum("BLM,M->BL", x.astype(jnp.float32), self.kernel[...],
                      precision=jax.lax.Precision.HIGHEST)


class RouterLogits(nnx.Module):
  """The ``"router_bce"`` predictor: the router weights are its logits (no
  parameters); its BCE trains the router itself."""

  def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
    del x
    return weights


class MlpPredictor(nnx.Module):
  """The ``"mlp"`` predictor: ``gelu(sg(x) W_i + b_i) w_o + b_o`` -> f32[B, L] logits.

  Its input is the router's (the block input) behind a stop-gradient, so its BCE
  trains only these weights and the LM loss never sees them. Hidden width ``M / 4``
  (at least 1); float32.
  """

  def __init__(self, d_model: int, *, init_scale: float = 1.0, rngs: nnx.Rngs):
    width = max(1, d_model // 4)
    self.wi = nnx.Param(scaled_init(init_scale)(rngs.params(), (d_model, width),
                                                jnp.float32),
                        logical_axes=PREDICTOR_AXES["wi"])
    self.bi = nnx.Param(jnp.zeros((width,), jnp.float32),
                        logical_axes=PREDICTOR_AXES["bi"])
    self.wo = nnx.Param(scaled_init(init_scale)(rngs.params(), (width, 1),
                                                jnp.float32)[:, 0],
                        logical_axes=PREDICTOR_AXES["wo"])
    self.bo = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=PREDICTOR_AXES["bo"])

  def flops_per_token(self, tokens: int) -> Flops:
    """2 x its parameters, biases included."""
    del tokens
    return Flops.dense(2 * param_size(self))

  def param_groups(self) -> dict[str, int]:
    return {"predictor": param_size(self)}

  def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
    del weights
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    h = jax.nn.gelu(jnp.einsum("BLM,MP->BLP", x, self.wi[...], precision=hp)
                    + self.bi[...])
    return jnp.einsum("BLP,P->BL", h, self.wo[...], precision=hp) + self.bo[...]


# model.mod_predictor -> the predictor module (names: moe_jax.routing.depth).
PREDICTORS: dict[str, Callable[[TransformerConfig, nnx.Rngs], nnx.Module]] = {
    "router_bce": lambda cfg, rngs: RouterLogits(),
    "mlp": lambda cfg, rngs: MlpPredictor(cfg.d_model, init_scale=cfg.init_scale,
                                          rngs=rngs),
}


@flax.struct.dataclass
class DepthAux:
  """What a routed block reports (V-MoE style, explicit).

  Attributes:
    bce_loss: f32[] the predictor's BCE against the top-k membership, mean over
      valid tokens, unscaled.
    metrics: ``routed_fraction``, ``predicted_fraction``, ``predictor_accuracy``,
      ``router_mean``, ``router_std`` (:func:`moe_jax.routing.depth.depth_metrics`).
    selected: bool[B, L] the top-k membership (the predictor's target).
    routed: bool[B, L] the tokens that went through the block in this pass (the
      selection, or the predictor's choice with ``use_predictor``).
  """

  bce_loss: jax.Array
  metrics: dict[str, jax.Array]
  selected: jax.Array
  routed: jax.Array


class RoutedBlock(Block):
  """A Mixture-of-Depths routed block: :class:`~moe_jax.models.block.Block` (same
  mixer, FFN and parameter names) plus ``mod_router`` and ``predictor``.

  ``block(x, positions)`` runs the selected tokens only (see the module docstring);
  ``block.decode`` routes with the predictor and writes decode state only for the
  tokens it routes.
  """

  def __init__(self, cfg: TransformerConfig, index: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, index, rngs=rngs)
    self.capacity = cfg.mod_capacity
    self.mod_router = DepthRouter(cfg.d_model, init_scale=cfg.init_scale, rngs=rngs)
    self.predictor = PREDICTORS[cfg.mod_predictor](cfg, rngs)

  # Run on every token of the sequence; the mixer, the FFN and their norms on k.
  SEQUENCE_WIDE = ("mod_router", "predictor")

  def tokens_run(self, seq_len: int, child: str) -> int:
    """k = ``ceil(mod_capacity * seq_len)`` tokens of a sequence run the block's
    mixer and FFN (also their attention context); its router and predictor see all
    ``seq_len``."""
    if child in self.SEQUENCE_WIDE:
      return seq_len
    return depth.depth_capacity(seq_len, self.capacity)

  def __call__(self, x: jax.Array, positions: jax.Array, *, deterministic: bool,
               token_mask: jax.Array | None = None,
               use_predictor: bool = False,
               context: TokenContext | None = None) -> tuple[jax.Array, BlockAux]:
    """x: [B, L, M] at positions i32[L] -> ([B, L, M], BlockAux with a DepthAux).

    Without ``use_predictor`` the top-k tokens of each row run the block, gathered
    into ``[B, k, M]``. With it, the tokens the predictor routes run it (causal:
    each decision is the token's own); their number varies, so all ``L`` tokens are
    gathered, the routed ones first, and the others are kept out of attention and
    of the MoE capacity and come out unchanged (this is the reference for cached
    decoding, not a saving).
    ``token_mask`` (bool[B, L]) marks padding, which ranks below every real token.
    ``context`` (the model input's
    :class:`~moe_jax.layers.router_families.TokenContext`) is gathered with the tokens.
    """
    batch, length, _ = x.shape
    valid = (jnp.ones((batch, length), jnp.bool_) if token_mask is None
             else token_mask.astype(jnp.bool_))
    weights = self.mod_router(x)  # f32[B, L]
    logits = self.predictor(x, weights)  # f32[B, L]
    k = depth.depth_capacity(length, self.capacity)
    top = depth.select_top_k(weights, k, token_mask)  # i32[B, k]
    selected = depth.membership(top, length)
    original = jnp.broadcast_to(positions, (batch, length))
    if use_predictor:
      routed = depth.predicted(logits) & valid
      index, first = depth.pack_routed(routed)  # [B, L], routed tokens first
      # The others go after every routed token: no routed token attends to them.
      pos = depth.gather_tokens(original, index) + jnp.where(first, 0, length)
      run = first
    else:
      routed, index, run = selected, top, None
      pos = depth.gather_tokens(original, index)
    run_mask = None  # bool[B, k or L]: gathered tokens that take MoE capacity
    if token_mask is not None or run is not None:
      run_mask = depth.gather_tokens(valid, index)
      if run is not None:
        run_mask = run_mask & run
    xs = depth.gather_tokens(x, index)  # [B, k, M] (or [B, L, M])
    if context is not None:
      context = jax.tree.map(lambda a: depth.gather_tokens(a, index), context)
    h, y, moe_aux = self.branches(xs, pos, deterministic=deterministic,
                                  token_mask=run_mask, context=context)
    r = depth.gather_tokens(weights, index)[..., None]  # f32[B, k, 1]
    delta = r * (h + y).astype(jnp.float32)  # x + r * f(x), f = h + y
    if run is not None:
      delta = jnp.where(run[..., None], delta, 0.0)
    out = depth.scatter_add(x, index, delta.astype(x.dtype))
    aux = DepthAux(
        bce_loss=depth.predictor_bce(logits, selected, valid),
        metrics=depth.depth_metrics(weights, logits, selected, routed, valid),
        selected=selected, routed=routed)
    return out, BlockAux(moe=moe_aux, depth=aux)

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
             prefill: bool, context: TokenContext | None = None) -> jax.Array:
    """x: [B, L, M] new tokens at i32[B, L] positions, bool[B, L] real -> [B, L, M].

    A token goes through the block when the predictor routes it (and it is real);
    the others write no decode state here (no KV entry, so later tokens cannot attend
    to them in this block) and come out unchanged. One compiled step serves any
    routing: the branches run masked on every row, and a step where no row is
    routed skips them (``lax.cond``), which is where sampling saves compute.
    """
    weights = self.mod_router(x)
    routed = depth.predicted(self.predictor(x, weights)) & mask
    if prefill:
      delta = _routed_delta(self, x, positions, routed, weights, prefill=True,
                            context=context)
    else:
      # A functional cond: the parameters are read, the decode state (and RNG
      # counts) come back out of the branch that ran.
      graphdef, params, state = nnx.split(self, nnx.Param, ...)

      def branch(run):
        def fn(state, x, positions, routed, weights, context):
          block = nnx.merge(graphdef, params, state)
          delta = (_routed_delta(block, x, positions, routed, weights, prefill=False,
                                 context=context)
                   if run else jnp.zeros(x.shape, jnp.float32))
          return delta, nnx.state(block, nnx.Not(nnx.Param))
        return fn

      delta, state = jax.lax.cond(jnp.any(routed), branch(True), branch(False), state,
                                  x, positions, routed, weights, context)
      nnx.update(self, state)
    return x + delta.astype(x.dtype)


def _routed_delta(block: RoutedBlock, x, positions, routed, weights, *, prefill,
                  context=None):
  """f32[B, L, M]: ``r * f(x)`` where routed, 0 elsewhere, against the decode state."""
  h, y = block.decode_branches(x, positions, routed, prefill=prefill, context=context)
  return jnp.where(routed[..., None], weights[..., None] * (h + y).astype(jnp.float32),
                   0.0)
