"""Parameter and FLOP counts of a :class:`~moe_jax.models.transformer.Transformer`, read
off its modules (not from the config), so that every family counts as it is built.

Each module declares its own costs (:mod:`moe_jax.layers.protocols`): its forward FLOPs
per token (``flops_per_token(tokens)``) and, for the parameter groups reported here,
``param_groups()``. The functions below walk the model and sum what the modules say;
they never ask which class a module is. A module that owns parameters but declares no
FLOP count is an error (:class:`UndeclaredFlops`), never 0 FLOPs.
"""

from __future__ import annotations

from typing import Any, Iterator

from flax import nnx

from moe_jax.layers.protocols import Flops, param_size


class UndeclaredFlops(TypeError):
  """A module owns parameters but declares no ``flops_per_token(tokens)``."""


def count_params(model: Any) -> dict[str, int]:
  """Parameter counts.

  ``total`` is every parameter. ``active`` is what one token touches: routed experts
  count ``k / (E + N)`` of their weights
  (:meth:`~moe_jax.layers.moe_layer.MoeLayer.active_count`), with ``k`` the experts a
  token visits (:attr:`MoeLayer.experts_per_token`: ``top_k``, an upper bound when a
  second-choice policy drops choices; ``capacity_factor`` on average for expert
  choice) and ``N`` MoDE's no-op experts; everything else fully, shared experts
  included (and every Mamba mixer, and a Mixture-of-Depths routed block, whose
  weights every token it runs uses). ``router`` counts the MoE routers and the
  Mixture-of-Depths routers, ``predictor`` the MLP predictors of routed blocks
  (``mod_predictor="mlp"``); both are in ``total`` and ``active``. ``mtp`` counts the
  multi-token prediction modules (:mod:`moe_jax.models.mtp`; the embedding and output
  head they share are the main model's), which are in ``total`` and ``active`` too, as
  every token of a training step runs them: the main model alone is ``total - mtp``
  (DeepSeek-V3 reports 671B main + 14B MTP). The groups are the modules'
  ``param_groups()``.
  """
  model = _unrolled(model)
  groups = {"experts": 0, "inactive": 0, "router": 0, "predictor": 0, "mtp": 0}
  for _, module in nnx.iter_modules(model):
    declare = getattr(module, "param_groups", None)
    for group, n in (declare() if declare is not None else {}).items():
      groups[group] += n
  total = param_size(model)
  return {"total": total, "active": total - groups["inactive"],
          "experts": groups["experts"], "router": groups["router"],
          "predictor": groups["predictor"], "mtp": groups["mtp"]}


def _unrolled(model: Any) -> Any:
  """A scanned model's unrolled shapes (its stacked unit counted once per row)."""
  unrolled = getattr(model, "unrolled", None)
  return model if unrolled is None else unrolled(abstract=True)


def _owns_params(module: Any) -> bool:
  return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _child_modules(module: Any) -> Iterator[tuple[str, Any]]:
  for key, child in nnx.iter_children(module):
    if isinstance(child, nnx.Module):
      yield str(key), child


def _sequence_flops(module: Any, tokens: int, path: tuple) -> Flops:
  """Forward FLOPs of ``module`` and what is under it for one sequence of which it
  sees ``tokens`` tokens."""
  included = ()  # children whose FLOPs the module's own count includes
  count = getattr(module, "flops_per_token", None)  # CountsFlops
  if count is not None:
    cost = count(tokens) * tokens
    included = getattr(module, "flops_include", ())
  elif _owns_params(module):
    raise UndeclaredFlops(
        f"{'/'.join(path) or 'the model'}: {type(module).__name__} owns parameters but "
        "declares no flops_per_token(tokens) (moe_jax.layers.protocols.CountsFlops); "
        "define it, so that its FLOPs are counted instead of taken as 0.")
  else:
    cost = Flops()
  tokens_run = getattr(module, "tokens_run", None)
  for name, child in _child_modules(module):
    if name in included:
      continue
    run = tokens if tokens_run is None else tokens_run(tokens, name)
    cost = cost + _sequence_flops(child, run, (*path, name))
  return cost


def flops_per_token(model: Any, seq_len: int) -> dict[str, int]:
  """Forward FLOPs per token (2 per multiply-add), summed over the modules'
  ``flops_per_token``. What the model's modules declare:

  * dense matmuls: 2 x weights (attention projections, dense FFN, output projection;
    the embedding lookup is free; norms count 0);
  * attention scores and mixing: ``4 * context * N * D`` per token and block (QK^T and
    PV over the full context for each of the N query heads, the Kaplan et al. 2020
    convention with ``N * D = M`` by default; causal masking is not discounted;
    grouped-query attention's fewer KV heads shrink the key and value projections,
    counted with the weights, not this term); the context is ``seq_len``, or ``k`` in
    a routed block;
  * multi-head latent attention (:mod:`moe_jax.models.mla`): 2 x its projections plus
    ``2 * context * N * (Dn + Dr + Dv)`` (the training forward, keys and values
    expanded; absorbed decoding costs differently and is not what is counted);
  * Mamba mixers: :func:`moe_jax.models.mamba.mixer_cost` (2 x the projection and conv
    weights plus ``6 * D_in * N`` for the scan; nothing grows with ``seq_len``);
  * routed experts: ``2 x k / (E + N)`` of their weights per token (``active``, as in
    :func:`count_params`) or all of them (``total``, every expert applied to every
    token), counted by their MoE layer; shared experts are a dense FFN that every
    token passes;
  * Mixture-of-Depths routed blocks (:mod:`moe_jax.models.mod`) run
    ``k = ceil(mod_capacity * seq_len)`` of the ``seq_len`` tokens
    (``tokens_run(seq_len, child)``), so everything in them counts ``k / seq_len`` of
    its per-token cost (their MoE routers too); their router and MLP predictor run on
    every token, the predictor 2 x its parameters (biases included). The gather, the
    scatter and ``r * f`` are not counted;
  * the routers, ``2 * M * (E + N)`` per token of an MoE block and ``2 * M`` per token
    of a routed block, are reported on their own as ``router`` and left out of
    ``active``/``total``, as Switch does when it calls a model "FLOP-matched" to its
    dense baseline (it is < 1% here);
  * LoRA adapters count 0 (their factors are counted with the weight they adapt).

  Costs are summed per sequence and divided by ``seq_len`` once, rounding down.
  Training costs about 3x the forward FLOPs.

  Raises:
    UndeclaredFlops: a module owns parameters but declares no FLOP count.
  """
  cost = _sequence_flops(_unrolled(model), seq_len, ())
  return {"active": cost.active // seq_len, "total": cost.total // seq_len,
          "router": cost.router // seq_len}
