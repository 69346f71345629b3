"""Router families behind one registry, and the routing state a layer carries.

Each family is one pure function ``(cfg, RouterInputs) -> RoutingOutput`` in
:data:`ROUTERS` (flaxformer's router subclasses, vmoe's dispatchers): the MoE layer
computes float32 logits, gathers what the family may need into :class:`RouterInputs`
(the per-token :class:`TokenContext` of the model input included, grouped like the
tokens), and hands the result to whichever dispatch path the config names. The layer never asks
which router it has; what differs between families (who chooses, whether it learns a
noise scale, which config keys it reads) is data in its :class:`RouterFamily`, and
whether a layer's routing is causal is derived from that and the config
(:func:`causality`).

| ``router`` | paper | routing function |
|---|---|---|
| ``"topk"`` | Switch, GShard, Mixtral, DeepSeek | :func:`moe_jax.routing.route` |
| ``"noisy_topk"`` | Shazeer et al. 2017 | :func:`moe_jax.routing.noisy_top_k` |
| ``"expert_choice"`` | Zhou et al. 2022 | :func:`moe_jax.routing.expert_choice` |
| ``"hash"`` | Roller et al. 2021 | :func:`moe_jax.routing.hash_route` |

Routing state that is not learned by gradient descent lives in :class:`RoutingState`
variables (not ``nnx.Param``), so optimizers and ``nnx.grad`` never see it:

* :class:`SelectionBias` f32[E]: DeepSeek-V3's auxiliary-loss-free balancing bias, updated
  by the training step with :func:`moe_jax.routing.update_selection_bias`;
* :class:`TrainingStep` i32[]: the step the noise annealing of ``noisy_topk`` reads,
  set by the training step (not checkpointed: it is a copy of the train state's step).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing


class RoutingState(nnx.Variable):
  """Non-trainable routing state: no gradient, no optimizer; the training step sets it."""


class SelectionBias(RoutingState):
  """f32[E] bias added to the scores for the choice of experts only (DeepSeek-V3)."""


class TrainingStep(RoutingState):
  """i32[] completed training steps, for schedules inside the layer (noise annealing)."""


def set_training_step(model: Any, step: jax.Array) -> None:
  """Writes ``step`` into every :class:`TrainingStep` variable of ``model``."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, TrainingStep):
      node.set_value(jnp.asarray(step, jnp.int32))


@flax.struct.dataclass
class TokenContext:
  """What the model knows about each token besides its hidden state, for the router
  families that need it.

  The model fills it once per call (:meth:`moe_jax.models.transformer.Transformer.forward`,
  and :func:`moe_jax.inference.decode.forward` at decode time); blocks hand it to their
  MoE layer unchanged (Mixture-of-Depths gathers it with the tokens it runs), and the
  layer groups every field like the tokens into :attr:`RouterInputs.context`. A family
  that needs more per-token input adds a field here and fills it in those two places.

  Attributes:
    token_ids: i32[B, L] the model's input token ids, or None (a layer called on its
      own).
  """

  token_ids: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class RouterInputs:
  """What a layer hands its router family, besides its config.

  Attributes:
    logits: f32[G, S, E] clean router logits (after Switch jitter, when training); E
      counts MoDE's no-op experts too. None for a family without a router
      (:attr:`RouterFamily.router_kernel` False).
    capacity: C, slots per expert and group (with no-op experts, the larger of the
      real and the no-op capacity; the layer cuts each queue afterwards).
    token_mask: bool[G, S] or None; False marks padding.
    rng: PRNG key for the family's randomness (second-expert sampling, gating noise),
      or None: no randomness (evaluation).
    noise_std: f32[G, S, E] learned noise scale of ``noisy_topk`` when training, else
      None.
    noise_scale: f32[] annealing factor of the noise in [0, 1], or None (1).
    selection_bias: f32[E] or None.
    context: the layer's :class:`TokenContext` with every field grouped to
      ``[G, S, ...]`` (padding tokens hold 0), or None when the layer was given none.
  """

  logits: jax.Array | None
  capacity: int
  token_mask: jax.Array | None = None
  rng: jax.Array | None = None
  noise_std: jax.Array | None = None
  noise_scale: jax.Array | None = None
  selection_bias: jax.Array | None = None
  context: TokenContext | None = None


def balance_scope(cfg) -> str:
  """``cfg.balance_scope``, or its family's :attr:`RouterFamily.balance_scope` when that
  is None (or absent): ``"group"`` or ``"batch"``."""
  scope = getattr(cfg, "balance_scope", None)
  return ROUTERS[cfg.router].balance_scope if scope is None else scope


def top_k_router(cfg, inputs: RouterInputs) -> routing.RoutingOutput:
  """Token choice: :func:`moe_jax.routing.route` with the layer's settings."""
  random_policy = cfg.top_k > 1 and cfg.second_policy == "random"
  return routing.route(
      inputs.logits, top_k=cfg.top_k, capacity=inputs.capacity,
      second_policy=cfg.second_policy, second_threshold=cfg.second_threshold,
      normalize_gates=cfg.normalize_gates, batch_priority=cfg.batch_priority,
      rng=inputs.rng if random_policy else None, token_mask=inputs.token_mask,
      score_fn=cfg.score_fn, selection_bias=inputs.selection_bias,
      expert_groups=cfg.expert_groups, top_groups=cfg.top_groups,
      gate_scale=cfg.gate_scale, balance_choices=cfg.balance_choices,
      queue_order=cfg.queue_order,
      balance_scope=balance_scope(cfg))


def noisy_top_k_router(cfg, inputs: RouterInputs) -> routing.RoutingOutput:
  """Shazeer et al. (2017) noisy top-k gating; noise only with a key and a noise scale.

  The annealed noise is ``noise_std * noise_scale``. A scale of exactly 0 (the end of
  the annealing) routes without noise, where the load loss counts choices instead of
  dividing by a zero standard deviation.
  """
  def run(rng, noise_std):
    return routing.noisy_top_k(inputs.logits, noise_std, top_k=cfg.top_k,
                               capacity=inputs.capacity, rng=rng,
                               token_mask=inputs.token_mask,
                               queue_order=cfg.queue_order,
                               balance_scope=balance_scope(cfg))

  if inputs.rng is None or inputs.noise_std is None:
    return run(None, jnp.ones_like(inputs.logits))
  if inputs.noise_scale is None:
    return run(inputs.rng, inputs.noise_std)
  scale = inputs.noise_scale
  return jax.lax.cond(scale > 0, lambda: run(inputs.rng, inputs.noise_std * scale),
                      lambda: run(None, inputs.noise_std))


def expert_choice_router(cfg, inputs: RouterInputs) -> routing.RoutingOutput:
  """Zhou et al. (2022): each expert picks its C best tokens of the group."""
  del cfg
  return routing.expert_choice(inputs.logits, capacity=inputs.capacity,
                               token_mask=inputs.token_mask)


def hash_router(cfg, inputs: RouterInputs) -> routing.RoutingOutput:
  """Roller et al. (2021) hash layers: each token id goes to a fixed expert
  (:func:`moe_jax.routing.hash_route`), top-1 with gate 1; no router, no logits."""
  token_ids = None if inputs.context is None else inputs.context.token_ids
  if token_ids is None:
    raise ValueError("router='hash' routes by token id: call the MoE layer with "
                     "context=TokenContext(token_ids=...) (a Transformer passes its "
                     "input tokens).")
  return routing.hash_route(token_ids, cfg.num_experts, capacity=inputs.capacity,
                            token_mask=inputs.token_mask)


@dataclasses.dataclass(frozen=True)
class FamilyMetric:
  """A scalar metric a family's routing adds to the common ones (its
  ``RoutingOutput.metrics``); the train line logs its mean over the MoE layers
  (:mod:`moe_jax.training.metric_schema`).

  Attributes:
    name: its key in ``RoutingOutput.metrics`` and in the train line.
    doc: what it measures (one line of the metrics table of docs/training.md).
    per_group: a mean over routing groups, like ``aux_loss``: gradient accumulation
      averages the microbatches' values; False: a mean over valid tokens, weighted by
      each microbatch's real tokens.
  """

  name: str
  doc: str
  per_group: bool = False


@dataclasses.dataclass(frozen=True)
class RouterFamily:
  """One entry of :data:`ROUTERS`.

  Attributes:
    route: ``(cfg, RouterInputs) -> RoutingOutput``.
    paper: where the family comes from (for messages and docs).
    tokens_choose: each token picks its experts (token choice), and the picks queue
      for the capacity in ``queue_order``; False: each expert picks its tokens among
      the whole group (expert choice). :func:`causality` reads it.
    dropless: works without capacity (``dispatch="dropless"``).
    learned_noise: the router learns a noise projection ``W_noise [M, E]``.
    router_kernel: the layer has a learned :class:`~moe_jax.layers.moe_layer.Router`
      (the logits ``x W``); False: no router parameters at all, and ``route`` gets
      ``logits=None`` (a fixed assignment, e.g. from the token ids of
      :attr:`RouterInputs.context`).
    options: the router-specific config keys (of :data:`ROUTER_OPTIONS`) it reads.
    uses_rng: ``(cfg, deterministic) -> bool``: whether ``route`` needs a key.
    experts_per_token: ``cfg -> float``: experts a token visits on average when
      training (for active parameter and FLOP counts), no-op experts included.
    noop: supports MoDE's no-op experts (``moe.noop_experts``): tokens choose, so a
      token that picks a no-op expert skips the layer
      (:func:`moe_jax.routing.split_noop_experts`). Expert choice does not: its
      experts pick tokens, so a no-op expert would take no token from the others.
    balance_scope: where its balance loss counts its statistics when the config's
      ``balance_scope`` is None: ``"group"`` (per routing group) or ``"batch"`` (over
      the whole global batch, :func:`moe_jax.routing.pool_groups`); None for a family
      without a balance loss.
    metrics: the metrics its routing adds to the common ones, which the train line
      logs (:class:`FamilyMetric`).
  """

  route: Callable[[Any, RouterInputs], routing.RoutingOutput]
  paper: str
  tokens_choose: bool
  dropless: bool
  learned_noise: bool
  options: frozenset[str]
  uses_rng: Callable[[Any, bool], bool]
  experts_per_token: Callable[[Any], float]
  noop: bool = False
  balance_scope: str | None = None
  metrics: tuple[FamilyMetric, ...] = ()
  router_kernel: bool = True


# Router-specific config keys and their defaults. A key left at its default means the
# same thing to every family; a family refuses a changed key it does not read.
ROUTER_OPTIONS: dict[str, Any] = {
    "top_k": 1,
    "second_policy": "all",
    "normalize_gates": True,
    "batch_priority": False,
    "score_fn": "softmax",
    "expert_groups": 1,
    "top_groups": None,
    "gate_scale": 1.0,
    "balance_choices": "first",
    "bias_update_rate": 0.0,
    "noise_anneal_steps": 0,
    "balance_scope": None,  # None: the family's RouterFamily.balance_scope
}

ROUTERS: dict[str, RouterFamily] = {
    "topk": RouterFamily(
        route=top_k_router, paper="Switch / GShard / Mixtral / DeepSeek",
        tokens_choose=True,
        dropless=True, learned_noise=False,
        options=frozenset({"top_k", "second_policy", "normalize_gates", "batch_priority",
                           "score_fn", "expert_groups", "top_groups", "gate_scale",
                           "balance_choices", "bias_update_rate", "balance_scope"}),
        uses_rng=lambda cfg, deterministic: (cfg.top_k > 1
                                             and cfg.second_policy == "random"),
        experts_per_token=lambda cfg: cfg.top_k, noop=True, balance_scope="group"),
    "noisy_topk": RouterFamily(
        route=noisy_top_k_router, paper="Shazeer et al. 2017", tokens_choose=True,
        dropless=True, learned_noise=True,
        options=frozenset({"top_k", "noise_anneal_steps", "balance_scope"}),
        uses_rng=lambda cfg, deterministic: not deterministic,
        # Shazeer et al. count importance and load over the batch.
        experts_per_token=lambda cfg: cfg.top_k, noop=True, balance_scope="batch",
        metrics=(FamilyMetric("importance_cv2", "`cv2` of the gates each expert "
                              "received (the importance term of `aux_loss`)",
                              per_group=True),
                 FamilyMetric("load_cv2", "`cv2` of each expert's (smooth) load, the "
                              "load term of `aux_loss`", per_group=True))),
    # Each expert takes C = ceil(cf * S / E) tokens, so a token visits cf experts on
    # average (Zhou et al. 2022, Sec. 3.1).
    "expert_choice": RouterFamily(
        route=expert_choice_router, paper="Zhou et al. 2022", tokens_choose=False,
        dropless=False, learned_noise=False, options=frozenset(),
        uses_rng=lambda cfg, deterministic: False,
        experts_per_token=lambda cfg: cfg.capacity_factor,
        metrics=(FamilyMetric("experts_per_token", "mean number of experts that "
                              "picked each valid token"),)),
    # A fixed assignment of token ids to experts: top-1 (top_k stays 1), no router
    # parameters, no balance loss or z-loss (both 0), no no-op experts.
    "hash": RouterFamily(
        route=hash_router, paper="Roller et al. 2021", tokens_choose=True,
        dropless=True, learned_noise=False, options=frozenset(),
        uses_rng=lambda cfg, deterministic: False,
        experts_per_token=lambda cfg: 1, router_kernel=False),
}


def routed_experts(cfg) -> int:
  """E + N, the experts the router chooses among, of any object with MoeConfig's
  attributes (N: MoDE's no-op experts; 0 when it has none or a bad value)."""
  noop = getattr(cfg, "noop_experts", 0)
  ok = isinstance(noop, numbers.Integral) and not isinstance(noop, bool) and noop > 0
  return cfg.num_experts + (noop if ok else 0)


def never_drops(cfg) -> bool:
  """No choice can be dropped for capacity: ``dispatch="dropless"``, or both capacity
  factors at least the number of experts the router chooses among (then ``C = S``)."""
  if cfg.dispatch == "dropless":
    return True
  return min(cfg.capacity_factor, cfg.eval_capacity_factor) >= routed_experts(cfg)


def causality(cfg) -> str | None:
  """Why the routing of a layer with config ``cfg`` looks at later tokens of its
  group, or None when it does not (it can then run in a causal LM and decode token by
  token).

  Derived, not declared per family: experts that pick their tokens see the whole
  group; token choice is causal when nothing is dropped, or when the queue for the
  capacity is in position order (no Batch Prioritized Routing) and a token's choices
  queue together (``top_k == 1`` or ``queue_order="token_major"``). Choice-major
  queues put every first choice of the group before any second one, so whether a
  token's later choices are kept depends on the first choices of later tokens.
  """
  if not ROUTERS[cfg.router].tokens_choose:
    return ("each expert picks its tokens among the whole group (expert choice), so "
            "routing sees later tokens of the sequence")
  if never_drops(cfg):
    return None
  if getattr(cfg, "batch_priority", False):
    return ("tokens queue for the capacity by their top gate over the whole group "
            "(batch_priority), so a token's routing depends on later tokens")
  if cfg.top_k > 1 and cfg.queue_order != "token_major":
    return (f"with top_k={cfg.top_k} and queue_order={cfg.queue_order!r} every first "
            "choice of the group queues before any second one, so whether a token's "
            "second choice is kept depends on the first choices of later tokens")
  return None
