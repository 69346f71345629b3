"""Expert-specialised fine-tuning (ESFT; Wang et al. 2024, "Let the Expert Stick to His
Last").

1. Score: pass the fine-tuning data's first batches through the pretrained model
   (evaluation mode) and give each routed expert of each MoE layer its routing share,
   :func:`routing_shares`:

   * ``"gate"`` (ESFT-Gate): the expert's summed gate over the tokens, divided by
     the layer's total, ``g_i = sum_t g_{i,t} / sum_j sum_t g_{j,t}``
     (:func:`moe_jax.routing.gate_mass`; DeepSeek's ``g_{i,t}`` is 0 for experts a
     token did not choose);
   * ``"token"`` (ESFT-Token): the expert's share of the token choices,
     ``r_i = #{(t, k): expert_k(t) = i} / (T * K)``.

   Both sum to 1 per layer. The paper averages per sample and then over samples;
   here the sums run over all valid tokens of the scoring batches (token-weighted).
   **Dropped choices:** the gate score sums the *kept* gates only (a choice dropped
   for capacity has gate 0 in ``RoutingOutput.gates``), while the token score counts
   every choice, kept or not. Scoring runs in evaluation mode, so the capacity is
   ``eval_capacity_factor``'s (dropless layers drop nothing, and then the two agree
   on which choices count).
2. Select (:func:`select_experts`): per layer, the fewest experts, by descending share
   (ties: lower index first), whose cumulative share reaches ``top_p``; unset, the
   paper's threshold for the score (:data:`DEFAULT_TOP_P`: 0.1 for the gate score, 0.2
   for the token score).
3. Train only those experts' rows of the stacked ``[E, ...]`` weights (plus, by config,
   whole other modules). The optimizer sees the whole stacks (:func:`apply_gradients`):
   the frozen rows' gradients are zeroed *before* it (a frozen expert has no gradient,
   so it takes no part in the global-norm clip or the Adam moments),
   :func:`freeze_rows` zeroes their updates *after* it (so AdamW's weight decay does
   not move them either), and the step keeps their old values bit for bit
   (:func:`keep_frozen`).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax.layers.experts import Experts

SCORES = ("gate", "token")
# The paper's thresholds p per score (Wang et al. 2024): 0.1 for ESFT-Gate, 0.2 for
# ESFT-Token.
DEFAULT_TOP_P = {"gate": 0.1, "token": 0.2}
# The MoeAux metric each score sums.
_METRIC = {"gate": "gate_mass", "token": "choice_counts"}


def resolved_top_p(score: str, top_p: float | None) -> float | None:
  """``top_p``, or the paper's threshold for ``score`` (:data:`DEFAULT_TOP_P`) when it
  is None (None for an unknown score, which the config check reports)."""
  return DEFAULT_TOP_P.get(score) if top_p is None else top_p


def routing_shares(model, batches: Iterable[dict], score: str = "gate"
                   ) -> dict[int, np.ndarray]:
  """``{MoE block index: f32[E] share}`` of ``model`` on ``batches`` (evaluation mode).

  Batches are ``{"inputs": i32[B, L], ...}``; a ``weights`` entry masks padding.
  """
  if score not in SCORES:
    raise ValueError(f"finetune.esft.score={score!r} is unknown; use one of "
                     f"{', '.join(SCORES)}.")
  graphdef, state = nnx.split(model)

  @jax.jit
  def sums(state, batch):
    m = nnx.merge(graphdef, state)
    mask = batch["weights"] > 0 if "weights" in batch else None
    out = m.forward(batch["inputs"], deterministic=True, token_mask=mask)
    return {i: a.metrics[_METRIC[score]] for i, a in out.moe_aux.items()}

  total: dict[int, np.ndarray] = {}
  for batch in batches:
    for i, v in jax.device_get(sums(state, batch)).items():
      total[i] = total.get(i, 0.0) + np.asarray(v, np.float64)
  if not total:
    raise ValueError("ESFT needs at least one scoring batch and a model with MoE blocks.")
  num_experts = {b.index: b.ffn.cfg.num_experts for b in model.blocks if b.is_moe}
  shares = {}
  for i, v in sorted(total.items()):
    v = v[:num_experts[i]]  # MoDE's no-op experts are last; they have no weights
    shares[i] = (v / max(v.sum(), 1e-30)).astype(np.float32)
  return shares


def select_experts(shares: dict[Any, np.ndarray], top_p: float
                   ) -> dict[Any, np.ndarray]:
  """``{layer: bool[E]}``: the fewest experts whose cumulative share reaches ``top_p``.

  Experts are taken by descending share, ties by lower index; the cut is the first
  prefix whose sum is ``>= top_p`` (with 1e-6 slack for float sums, so ``top_p=1``
  takes every expert with a nonzero share and never fails on rounding).
  """
  if not 0 < top_p <= 1:
    raise ValueError(f"finetune.esft.top_p={top_p!r} must be in (0, 1].")
  selected = {}
  for layer, share in shares.items():
    share = np.asarray(share, np.float64)
    order = np.argsort(-share, kind="stable")
    cum = np.cumsum(share[order])
    count = int(np.searchsorted(cum, top_p - 1e-6, side="left")) + 1
    mask = np.zeros(share.shape, bool)
    mask[order[:min(count, share.size)]] = True
    selected[layer] = mask
  return selected


def expert_row_masks(model, selected: dict[int, np.ndarray]) -> dict[tuple, np.ndarray]:
  """``{path of an expert weight: bool[E, 1, 1]}`` for every stacked expert weight of
  the MoE blocks in ``selected`` (True: that expert trains)."""
  masks = {}
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, Experts):
      continue
    block = path[1]  # ("blocks", i, ..., "experts")
    if block not in selected:
      continue
    keep = np.asarray(selected[block], bool)
    for name in ("wi", "wi_gate", "wo"):
      w = getattr(module, name, None)
      if w is not None:
        masks[(*path, name)] = keep.reshape((-1,) + (1,) * (w.ndim - 1))
  return masks


def mask_tree(params: dict, row_masks: dict[tuple, np.ndarray]) -> Any:
  """A pytree like ``params`` (a nested dict): the row mask at expert weights, else
  None (the leaf trains whole)."""
  def leaf(path, x):
    key = tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path)
    return row_masks.get(key)
  return jax.tree_util.tree_map_with_path(leaf, params)


def zero_frozen(tree: Any, masks: Any) -> Any:
  """``tree`` (gradients or updates, like ``params``) with the frozen rows set to 0."""
  return jax.tree.map(
      lambda u, m: u if m is None else jnp.where(m, u, jnp.zeros_like(u)), tree, masks)


def freeze_rows(masks: Any) -> optax.GradientTransformation:
  """Zeroes the updates of frozen expert rows; chain it *after* the optimizer."""
  def update(updates, state, params=None):
    del params
    return zero_frozen(updates, masks), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_gradients(tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                    params: Any, masks: Any | None) -> tuple[Any, Any, Any, Any]:
  """``(params, opt_state, grads, updates)`` after one optimizer step under ESFT.

  A frozen expert has no gradient in ESFT, so its rows of ``grads`` are zeroed
  *before* ``tx``: they do not enter the global-norm clip (which would otherwise
  shrink the selected experts' updates), the Adam moments, or the returned ``grads``
  (whose norm the step logs). ``tx`` should end with :func:`freeze_rows` (weight decay
  acts on the parameters, not the gradients), and :func:`keep_frozen` restores the
  frozen rows' bits. ``masks=None``: a plain optimizer step.
  """
  if masks is not None:
    grads = zero_frozen(grads, masks)
  updates, opt_state = tx.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  if masks is not None:
    new = keep_frozen(new, params, masks)
  return new, opt_state, grads, updates


def keep_frozen(new: Any, old: Any, masks: Any) -> Any:
  """``new`` with the frozen rows of ``old`` restored exactly (``p + 0`` would turn a
  -0.0 into +0.0)."""
  return jax.tree.map(lambda n, o, m: n if m is None else jnp.where(m, n, o), new, old,
                      masks)


def trainable_expert_params(model, selected: dict[int, np.ndarray]) -> int:
  """Parameters of the selected experts (the rows that train)."""
  total = 0
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Experts) and path[1] in selected:
      rows = int(np.sum(selected[path[1]]))
      for name in ("wi", "wi_gate", "wo"):
        w = getattr(module, name, None)
        if w is not None:
          total += rows * int(np.prod(w.shape[1:]))
  return total
