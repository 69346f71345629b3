"""Multi-token prediction (MTP; DeepSeek-V3 report, Liu et al. 2024, Sec. 2.2).

With ``model.mtp_depth`` D > 0 the :class:`~moe_jax.models.transformer.Transformer`
owns D sequential :class:`MtpModule` (``mtp/0`` .. ``mtp/D-1``). Module k (1-based)
takes, at position i, the previous depth's hidden state ``h^{k-1}_i`` (depth 0: the
main model's last hidden state, before its final norm) and the embedding of token
``t_{i+k}`` (the SHARED input embedding, without learned positions), and predicts token
``t_{i+k+1}``::

  h'_i = eh_proj @ [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]     # [2M] -> [M]
  h^k  = Block(h')                                              # one Transformer block
  logits^k = head(norm(h^k))                                    # the SHARED output head

The concatenation puts the normed embedding first and the normed hidden state second,
as DeepSeek-V3's released weights are applied (``eh_proj(cat(enorm(emb), hnorm(h)))``
in the reference inference code; the report's formula writes the two the other way
round): rows ``0..M-1`` of the ``[2M, M]`` kernel read the embedding, rows ``M..2M-1``
the hidden state. ``norm`` is the module's own final RMSNorm (DeepSeek-V3's
``shared_head.norm``); the unembedding (or the tied embedding) is the main model's.

The block is the model's own :class:`~moe_jax.models.block.Block` built as the last
block of the layer pattern (``index = num_layers - 1``): its mixer (attention or Mamba)
and FFN (dense or MoE) are the last main block's kinds. A Mixture-of-Depths routed last
block gives a plain block here (every token runs the MTP block). An MoE MTP block
reports its :class:`~moe_jax.layers.moe_layer.MoeAux` under the index ``num_layers + k
- 1`` (:func:`mtp_index`, ``ModelOutput.mtp_moe_aux``): its balance and z losses join
the main MoE layers' in the training loss and its choice counts move its selection
bias, but the logged MoE metrics are the main blocks' only.

Targets (:func:`mtp_targets`): with the batch's ``inputs`` ``t_0..t_{L-1}`` and
``targets`` ``t_1..t_L``, depth k's input token at position i is ``inputs[i + k]`` and
its target ``targets[i + k]``; the last k positions of each row have neither (weight
0), and padding keeps the batch's weights. The loss (:mod:`moe_jax.training.losses`)
is ``L_MTP = (mtp_loss_coef / D) * sum_k L^k``, each ``L^k`` the mean CE over depth k's
weighted targets.

Sampling (:mod:`moe_jax.inference.decode`) never runs these modules; ``model(tokens)``
skips them too (``forward(..., with_mtp=False)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.experts import scaled_init
from moe_jax.layers.moe_layer import MoeAux
from moe_jax.layers.projection import project
from moe_jax.layers.protocols import Flops, LoraWeight, param_size
from moe_jax.layers.router_families import TokenContext
from moe_jax.models.block import Block, Norm, _param
from moe_jax.models.model_config import TransformerConfig

# Logical axes of the parameters defined here: the [2M, M] projection's input is the
# concatenation (sharded like an FFN's hidden width), its output the model width.
MTP_AXES = {"eh_proj": ("mlp", "embed")}


class MtpModule(nnx.Module):
  """One MTP depth: ``enorm``, ``hnorm``, ``eh_proj`` f32[2M, M], ``block`` and its
  final ``norm`` (module docstring); the output head is the model's."""

  def __init__(self, cfg: TransformerConfig, depth: int, *, rngs: nnx.Rngs):
    self.depth = depth
    self.d_model = cfg.d_model
    self.vocab_size = cfg.vocab_size
    self.compute_dtype = cfg.compute_dtype
    self.enorm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.hnorm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.eh_proj = _param(
        scaled_init(cfg.init_scale)(rngs.params(), (2 * cfg.d_model, cfg.d_model),
                                    jnp.float32), MTP_AXES["eh_proj"])
    self.block = Block(cfg, cfg.num_layers - 1, rngs=rngs)
    self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)

  def flops_per_token(self, tokens: int) -> Flops:
    """The projection, ``2 * 2M * M``, and the shared output head it runs once more,
    ``2 * M * V``; the block counts its own."""
    del tokens
    return Flops.dense(2 * 2 * self.d_model * self.d_model
                       + 2 * self.d_model * self.vocab_size)

  def param_groups(self) -> dict[str, int]:
    """Every parameter of the module, as ``mtp`` (:func:`moe_jax.models.sizes.count_params`)."""
    return {"mtp": param_size(self)}

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """None: the projection is not adapted (the block declares its own)."""
    return ()

  def project_inputs(self, h: jax.Array, emb: jax.Array) -> jax.Array:
    """h [B, L, M] previous depth's hidden, emb [B, L, M] embeddings of t_{i+k} ->
    [B, L, M] ``eh_proj @ [enorm(emb); hnorm(h)]`` in the compute dtype."""
    x = jnp.concatenate([self.enorm(emb), self.hnorm(h)], axis=-1)
    x = x.astype(self.compute_dtype)
    return project(x, self.eh_proj[...].astype(x.dtype))


def mtp_index(cfg: TransformerConfig, k: int) -> int:
  """The index that MTP depth k's block reports its MoE aux and choice counts under:
  ``num_layers + k - 1``, after the main blocks'."""
  return cfg.num_layers + k - 1


def shift_left(x: jax.Array, k: int, fill) -> jax.Array:
  """[B, L, ...] -> [B, L, ...] with ``out[:, i] = x[:, i + k]`` for ``i < L - k`` and
  ``fill`` at the last ``k`` positions."""
  pad = jnp.full((x.shape[0], min(k, x.shape[1]), *x.shape[2:]), fill, x.dtype)
  return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_inputs(tokens: jax.Array, token_mask: jax.Array | None, k: int
               ) -> tuple[jax.Array, jax.Array]:
  """Depth k's input tokens and real positions: tokens i32[B, L] -> (i32[B, L]
  ``t_{i+k}``, 0 past the end; bool[B, L] real: ``token_mask[i + k]`` (every token when
  None), False at the last k positions)."""
  mask = (jnp.ones(tokens.shape, jnp.bool_) if token_mask is None
          else token_mask.astype(jnp.bool_))
  return shift_left(tokens, k, 0), shift_left(mask, k, False)


def mtp_targets(targets: jax.Array, weights: jax.Array | None, k: int
                ) -> tuple[jax.Array, jax.Array]:
  """Depth k's targets and weights from the batch's: targets i32[B, L] (``t_{i+1}``)
  -> (i32[B, L] ``t_{i+k+1}``, f32[B, L] weights: the batch's at ``i + k``, 1 without
  weights, 0 at the last k positions)."""
  w = (jnp.ones(targets.shape, jnp.float32) if weights is None
       else weights.astype(jnp.float32))
  return shift_left(targets, k, 0), shift_left(w, k, 0.0)


def mtp_forward(model, tokens: jax.Array, h: jax.Array, positions: jax.Array,
                token_mask: jax.Array | None, run, logits: bool = True
                ) -> tuple[tuple[jax.Array, ...], dict[int, MoeAux]]:
  """The D modules of ``model.mtp`` in sequence from the main model's last hidden
  state ``h`` [B, L, M] (before the final norm) -> (D logits f32[B, L, V], depth k's at
  position i predicting ``t_{i+k+1}``; ``{mtp_index: MoeAux}`` of the MoE MTP
  blocks). ``run(block, x, positions, token_mask, context) -> (x, BlockAux)`` runs a
  block as the main model's forward does. ``logits=False``: each depth's normed
  hidden states [B, L, M] instead of its logits."""
  outs, moe_aux = [], {}
  embedding = model.embedding[...]
  for k, module in enumerate(model.mtp, start=1):
    shifted, mask = mtp_inputs(tokens, token_mask, k)
    emb = jnp.take(embedding, shifted, axis=0)
    x = module.project_inputs(h, emb)
    h, aux = run(module.block, x, positions, mask, TokenContext(token_ids=shifted))
    if aux.moe is not None:
      moe_aux[mtp_index(model.cfg, k)] = aux.moe
    normed = module.norm(h)
    outs.append(model.output(normed) if logits else normed)
  return tuple(outs), moe_aux


__all__ = ["MTP_AXES", "MtpModule", "mtp_forward", "mtp_index", "mtp_inputs",
           "mtp_targets", "shift_left"]
