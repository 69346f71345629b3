"""Parameter and FLOP counts of a :class:`~moe_jax.models.transformer.Transformer`, read
off its modules (not from the config), so that every family counts as it is built.

``count_params(model)`` and ``flops_per_token(model, seq_len)`` are also importable from
:mod:`moe_jax.models.transformer` and :mod:`moe_jax.training.train`.
"""

from __future__ import annotations

import jax
from flax import nnx

from moe_jax.layers.experts import DenseFfn
from moe_jax.models.mamba import MambaMixer, mixer_cost
from moe_jax.models.mod import DepthRouter, MlpPredictor
from moe_jax.layers.moe_layer import MoeLayer, Router
from moe_jax.models.block import Attention
from moe_jax.models.transformer import Transformer


def _size(module: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _active(n: int, layer: MoeLayer) -> int:
  """The part of a routed-expert count ``n`` that one token uses: ``k / (E + N)`` of
  it, ``k`` of the ``E`` real and ``N`` no-op experts being chosen on average (MoDE:
  a balanced router sends ``N / (E + N)`` of the choices to no-op experts)."""
  k = layer.experts_per_token
  if float(k).is_integer():
    return n * int(k) // layer.cfg.routed_experts
  return round(n * k / layer.cfg.routed_experts)


def count_params(model: Transformer) -> dict[str, int]:
  """Parameter counts.

  ``total`` is every parameter. ``active`` is what one token touches: routed experts
  count ``k / (E + N)`` of their weights (:func:`_active`), with ``k`` the experts a
  token visits (:attr:`MoeLayer.experts_per_token`: ``top_k``, an upper bound when a
  second-choice policy drops choices; ``capacity_factor`` on average for expert
  choice) and ``N`` MoDE's no-op experts; everything else fully, shared experts
  included (and every Mamba mixer, and a Mixture-of-Depths routed block, whose
  weights every token it runs uses). ``router`` counts the MoE routers and the
  Mixture-of-Depths routers, ``predictor`` the MLP predictors of routed blocks
  (``mod_predictor="mlp"``); both are in ``total`` and ``active``.
  """
  total = _size(model)
  expert_total = expert_active = router = predictor = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MoeLayer):
      n = _size(module.experts)
      expert_total += n
      expert_active += _active(n, module)
    elif isinstance(module, (Router, DepthRouter)):
      router += _size(module)
    elif isinstance(module, MlpPredictor):
      predictor += _size(module)
  return {"total": total, "active": total - expert_total + expert_active,
          "experts": expert_total, "router": router, "predictor": predictor}


def flops_per_token(model: Transformer, seq_len: int) -> dict[str, int]:
  """Forward FLOPs per token (2 per multiply-add), counted module by module.

  * dense matmuls: 2 x weights (attention projections, dense FFN, output projection;
    the embedding lookup is free);
  * attention scores and mixing: ``4 * context * N * D`` per token and block (QK^T and
    PV over the full context for each of the N query heads, the Kaplan et al. 2020
    convention with ``N * D = M`` by default; causal masking is not discounted;
    grouped-query attention's fewer KV heads shrink the key and value projections,
    counted with the weights, not this term); the context is ``seq_len``, or ``k`` in
    a routed block;
  * Mamba mixers: :func:`moe_jax.models.mamba.mixer_cost` (2 x the projection and conv
    weights plus ``6 * D_in * N`` for the scan; nothing grows with ``seq_len``);
  * routed experts: ``2 x k / (E + N)`` of their weights per token (``active``, as in
    :func:`count_params`) or all of them (``total``, every expert applied to every
    token); shared experts are a dense FFN that every token passes;
  * Mixture-of-Depths routed blocks (:mod:`moe_jax.models.mod`) run
    ``k = ceil(mod_capacity * seq_len)`` of the ``seq_len`` tokens, so everything in
    them counts ``k / seq_len`` of its per-token cost (their MoE routers too); an MLP
    predictor runs on every token, 2 x its parameters (biases included). The gather,
    the scatter and ``r * f`` are not counted;
  * the routers, ``2 * M * (E + N)`` per token of an MoE block and ``2 * M`` per token
    of a routed block, are reported on their own as ``router`` and left out of
    ``active``/``total``, as Switch does when it calls a model "FLOP-matched" to its
    dense baseline (it is < 1% here).

  Costs are summed per sequence and divided by ``seq_len`` once, rounding down.
  Training costs about 3x the forward FLOPs.
  """
  cfg = model.cfg
  active = total = router = 0  # per sequence
  for block in model.blocks:
    run = block.tokens_run(seq_len)  # tokens through the block, the attention context
    for _, module in nnx.iter_modules(block):
      if isinstance(module, Attention):
        width = module.cfg.num_heads * module.cfg.head_dim  # N * D, M by default
        n = (2 * _size(module) + 4 * run * width) * run
        active, total = active + n, total + n
      elif isinstance(module, MambaMixer):
        n = mixer_cost(module.cfg)["flops"] * run
        active, total = active + n, total + n
      elif isinstance(module, DenseFfn):
        n = 2 * _size(module) * run
        active, total = active + n, total + n
      elif isinstance(module, MoeLayer):
        n = 2 * _size(module.experts)
        active += _active(n, module) * run
        total += n * run
        router += 2 * _size(module.router) * run
      elif isinstance(module, DepthRouter):
        router += 2 * _size(module) * seq_len
      elif isinstance(module, MlpPredictor):
        n = 2 * _size(module) * seq_len
        active, total = active + n, total + n
  head = 2 * cfg.d_model * cfg.vocab_size  # output projection, tied or not
  return {"active": active // seq_len + head, "total": total // seq_len + head,
          "router": router // seq_len}
