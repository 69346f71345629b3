"""The sparse MoE feed-forward layer: group, route, dispatch, run experts, combine.

``y, aux = MoeLayer(cfg, rngs=rngs)(x)`` maps ``[B, L, M] -> [B, L, M]`` and returns the
losses and metrics explicitly as a typed :class:`MoeAux` pytree (V-MoE style), so a test
or notebook reads them without digging through collections.

The router family (``MoeConfig.router``, see
:data:`moe_jax.layers.router_families.ROUTERS`) and the dispatch path
(``MoeConfig.dispatch``, see :data:`moe_jax.layers.dispatch.DISPATCHERS`) are looked up
by name; every family returns the same :class:`~moe_jax.routing.RoutingOutput` and every
dispatch path consumes it. Optional shared experts (DeepSeek-MoE) are a dense FFN that
every token passes, added to the routed output.

The layer is open in both directions: ``context=``
(:class:`~moe_jax.layers.router_families.TokenContext`, e.g. the token ids) reaches the
router family grouped like the tokens, and with ``sow_routing`` set the layer records
the :class:`~moe_jax.routing.RoutingOutput` it dispatched with as an ``nnx.Intermediate``
named ``"routing"`` under ``nnx.capture`` (:func:`moe_jax.analysis.trace.trace_routing`
reads it), so nothing has to route twice.
"""

from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.layers.dispatch import (DISPATCHERS, Dispatcher, gather_dispatch,
                                     resolve_dispatch)
from moe_jax.layers.dropless import apply_lost
from moe_jax.layers.experts import DenseFfn, Experts, scaled_init
from moe_jax.layers.lora_adapters import weight
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.layers.projection import project
from moe_jax.layers.protocols import Flops, LoraWeight, param_size
from moe_jax.parallel.sharding import SINGLE_DEVICE, Layout
from moe_jax.layers.router_families import (ROUTERS, RouterInputs, SelectionBias,
                                            TokenContext, TrainingStep, causality)


# Logical axis names of the router's parameters: [M, E], E of the logits replicated;
# W_noise of noisy top-k alike.
ROUTER_AXES = {"kernel": ("embed", None), "noise_kernel": ("embed", None)}


@flax.struct.dataclass
class MoeAux:
  """Losses and metrics of one MoE layer (all float32, unscaled).

  Attributes:
    aux_loss: f32[] the router family's load-balancing loss (Switch's for "topk",
      importance + load for "noisy_topk", 0 for "expert_choice").
    z_loss: f32[] router z-loss.
    metrics: ``dropped_fraction``, ``expert_load`` f32[E], ``expert_fill`` f32[E],
      ``choice_counts`` f32[E], ``router_confidence``, ``router_entropy``,
      ``second_kept_fraction`` (as far as the family reports them; see
      :mod:`moe_jax.routing`), and ``gate_mass`` f32[E] (the summed gates each
      expert received, :func:`moe_jax.routing.gate_mass`; ESFT scores by it). With MoDE's no-op experts the vectors have ``E + N``
      entries (the no-op experts last) and ``noop_fraction`` is added
      (:func:`moe_jax.routing.split_noop_experts`).
  """

  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: dict[str, jax.Array]


class Router(nnx.Module):
  """Bias-free linear map to expert logits, always in float32.

  Training multiplies the router *inputs* by U[1-eps, 1+eps] noise (Switch jitter).
  With ``learned_noise`` it also holds Shazeer et al.'s (2017) ``W_noise [M, E]``,
  initialised to zero, for :meth:`noise_std`.
  """

  def __init__(self, d_model: int, num_experts: int, *, jitter_noise: float = 0.0,
               init_scale: float = 0.1, learned_noise: bool = False, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        scaled_init(init_scale)(rngs.params(), (d_model, num_experts), jnp.float32),
        logical_axes=ROUTER_AXES["kernel"])
    self.noise_kernel = (nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32),
                                   logical_axes=ROUTER_AXES["noise_kernel"])
                         if learned_noise else None)
    self.jitter_noise = jitter_noise
    self.rngs = rngs

  def flops_per_token(self, tokens: int) -> Flops:
    """``2 * M * E`` (and W_noise's when it has one), counted as routing."""
    del tokens
    return Flops(router=2 * param_size(self))

  def param_groups(self) -> dict[str, int]:
    return {"router": param_size(self)}

  def lora_targets(self) -> tuple[LoraWeight, ...]:
    """The kernel ``[M, E]``; ``noisy_topk``'s W_noise gets none and stays frozen."""
    return (LoraWeight("router", "kernel"),)

  def noise_std(self, x: jax.Array) -> jax.Array | None:
    """x: [G, S, M] -> f32[G, S, E] ``softplus(x W_noise) + 1e-2``; None without W_noise.

    The 1e-2 floor keeps the noise, and the load loss's division by it, away from 0
    (Shazeer et al. 2017, eq. 4, which has no floor).
    """
    if self.noise_kernel is None:
      return None
    h = project(x.astype(jnp.float32), self.noise_kernel[...].astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
    return jax.nn.softplus(h) + 1e-2

  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """x: [G, S, M] any dtype -> f32[G, S, E] logits."""
    x = x.astype(jnp.float32)
    if self.jitter_noise > 0 and not deterministic:
      noise = jax.random.uniform(self.rngs.jitter(), x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
      x = x * noise
    # HIGHEST: no bf16/TF32 passes, so routing decisions do not depend on the backend.
    return project(x, weight(self, "kernel").astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)


def group_tokens(num_tokens: int, group_size: int) -> tuple[int, int]:
  """(G, S) for ``num_tokens`` tokens: S = min(group_size, tokens), G = ceil(T / S)."""
  size = min(group_size, num_tokens)
  return -(-num_tokens // size), size


def check_groups(num_tokens: int, group_size: int, group_shards: int) -> None:
  """Raises unless the groups of ``num_tokens`` tokens split evenly over the devices."""
  if group_shards <= 1:
    return
  num_groups, size = group_tokens(num_tokens, group_size)
  if num_tokens % size or num_groups % group_shards:
    per_device = num_tokens / group_shards
    raise ValueError(
        f"MoE groups must not straddle devices: {num_tokens} tokens (B*L) in groups of "
        f"group_size={size} give G={num_tokens / size:g} groups, which is not a "
        f"multiple of the {group_shards} data-parallel devices (data*fsdp*expert). Set "
        f"moe.group_size to a divisor of the {per_device:g} tokens per device, or to 0 "
        "(one group per sequence).")


class SharedExpertGate(nnx.Module):
  """Qwen2-MoE's gate on the shared experts: ``x [..., M] -> f32[..., 1]
  sigmoid(x . w)``, with ``w [M]`` (a vector, so float32 and not decayed; Hugging Face's
  ``shared_expert_gate.weight [1, M]``), computed in float32."""

  def __init__(self, d_model: int, *, init_scale: float, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        scaled_init(init_scale, in_axis=0, out_axis=())(rngs.params(), (d_model,),
                                                        jnp.float32),
        logical_axes=("norm",))

  def flops_per_token(self, tokens: int) -> Flops:
    """``2 * M``, dense."""
    del tokens
    return Flops.dense(2 * self.kernel.size)

  def __call__(self, x: jax.Array) -> jax.Array:
    logit = jnp.einsum("...M,M->...", x.astype(jnp.float32),
                       self.kernel[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return jax.nn.sigmoid(logit)[..., None]


class MoeLayer(nnx.Module):
  """Sparse MoE FFN: ``y, aux = layer(x)`` with ``x, y: [B, L, M]``.

  ``layer.eval()`` / ``layer.train()`` (or ``deterministic=``) switch between training
  (jitter, gating noise, expert dropout, ``capacity_factor``) and evaluation (none of
  these, ``eval_capacity_factor``).

  Attributes:
    router: :class:`Router` (float32 logits; ``W_noise`` for "noisy_topk"), or None
      for a family without one (``RouterFamily.router_kernel`` False).
    experts: the E routed :class:`~moe_jax.layers.experts.Experts`.
    shared_experts: :class:`~moe_jax.layers.experts.DenseFfn` of width
      ``num_shared_experts * d_ff``, or None.
    shared_gate: :class:`SharedExpertGate` on the shared experts'
      output (``shared_expert_gate``), or None.
    selection_bias: :class:`~moe_jax.layers.router_families.SelectionBias` f32[E] when
      ``bias_update_rate > 0``, else None.
    training_step: :class:`~moe_jax.layers.router_families.TrainingStep` when
      ``noise_anneal_steps > 0``, else None.
    sow_routing: when True, each call sows its final
      :class:`~moe_jax.routing.RoutingOutput` (after the dropless path's lost choices)
      as ``nnx.Intermediate`` ``"routing"``; only under ``nnx.capture`` (False: the
      default, nothing is recorded).
  """

  def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    family = ROUTERS[cfg.router]
    self.router = (Router(cfg.d_model, cfg.routed_experts,
                          jitter_noise=cfg.jitter_noise,
                          init_scale=cfg.model_init_scale * cfg.router_init_scale,
                          learned_noise=family.learned_noise, rngs=rngs)
                   if family.router_kernel else None)
    self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff,
                           activation=cfg.activation, dropout_rate=cfg.expert_dropout,
                           init_scale=cfg.model_init_scale * cfg.init_scale,
                           dtype=cfg.compute_dtype,
                           grouped_matmul=cfg.grouped_matmul, rngs=rngs)
    self.shared_experts = (DenseFfn(
        cfg.d_model, cfg.num_shared_experts * cfg.d_ff, activation=cfg.activation,
        dropout_rate=cfg.expert_dropout,
        init_scale=cfg.model_init_scale * cfg.init_scale,
        dtype=cfg.compute_dtype, lora_target="shared_experts",
        rngs=rngs) if cfg.num_shared_experts else None)
    self.shared_gate = (SharedExpertGate(
        cfg.d_model, init_scale=cfg.model_init_scale * cfg.router_init_scale, rngs=rngs)
                        if cfg.shared_expert_gate else None)
    self.selection_bias = (SelectionBias(jnp.zeros((cfg.routed_experts,), jnp.float32))
                           if cfg.bias_update_rate > 0 else None)
    self.training_step = (TrainingStep(jnp.zeros((), jnp.int32))
                          if cfg.noise_anneal_steps > 0 else None)
    self.rngs = rngs
    self.deterministic = False
    self.sow_routing = False
    # moe_jax.models.param_sharding.shard_model swaps in a MeshLayout for the model's
    # mesh.
    self.layout: Layout = SINGLE_DEVICE

  @property
  def is_causal(self) -> bool:
    """A token's routing never depends on later tokens, so the layer can run in a
    causal LM and decode token by token
    (:func:`moe_jax.layers.router_families.causality`). False for expert choice, for
    Batch Prioritized Routing and for choice-major queues with ``top_k > 1``, unless
    nothing can be dropped."""
    return causality(self.cfg) is None

  @property
  def experts_per_token(self) -> float:
    """Routed experts a token visits on average when training (top_k for token
    choice, capacity_factor for expert choice)."""
    return ROUTERS[self.cfg.router].experts_per_token(self.cfg)

  # Sizes (moe_jax.models.sizes): the layer counts its routed experts' FLOPs, since
  # only it knows the share of them a token visits; the router and the shared experts
  # count their own.
  flops_include = ("experts",)

  def active_count(self, n: int) -> int:
    """The part of a routed-expert count ``n`` (parameters or FLOPs) that one token
    uses: ``k / (E + N)`` of it, ``k`` (:attr:`experts_per_token`) of the ``E`` real
    and ``N`` no-op experts being chosen on average (MoDE: a balanced router sends
    ``N / (E + N)`` of the choices to no-op experts)."""
    k = self.experts_per_token
    if float(k).is_integer():
      return n * int(k) // self.cfg.routed_experts
    return round(n * k / self.cfg.routed_experts)

  def flops_per_token(self, tokens: int) -> Flops:
    """The routed experts: ``2 x`` their weights for ``total`` (every expert on every
    token), :meth:`active_count` of that for ``active``."""
    del tokens
    n = 2 * param_size(self.experts)
    return Flops(active=self.active_count(n), total=n)

  def param_groups(self) -> dict[str, int]:
    """The routed experts' parameters, and those of them a token does not use."""
    n = param_size(self.experts)
    return {"experts": n, "inactive": n - self.active_count(n)}

  def constrain(self, x: jax.Array, name: str) -> jax.Array:
    """Sharding hook: ``"groups"`` for ``[G, S, M]``, ``"expert_buffers"`` for
    ``[E, G, C, M]``."""
    return self.layout.constrain(x, name)

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """C for groups of ``group_size`` tokens; S for ``dispatch="dropless"``. With
    no-op experts the share is over all ``E + N`` of them."""
    if self.cfg.dispatch == "dropless":
      return group_size
    cf = self.cfg.eval_capacity_factor if deterministic else self.cfg.capacity_factor
    return routing.expert_capacity(group_size, self.cfg.routed_experts, cf,
                                   self.cfg.min_capacity)

  def noop_capacity(self, group_size: int) -> int:
    """Slots of each no-op expert: ``noop_capacity_factor``'s share, or S."""
    factor = self.cfg.noop_capacity_factor
    if factor is None or self.cfg.dispatch == "dropless":
      return group_size
    return routing.expert_capacity(group_size, self.cfg.routed_experts, factor,
                                   self.cfg.min_capacity)

  def noise_scale(self) -> jax.Array | None:
    """f32[] ``max(0, 1 - step / noise_anneal_steps)``, or None without annealing."""
    if self.training_step is None:
      return None
    step = self.training_step[...].astype(jnp.float32)
    return jnp.maximum(0.0, 1.0 - step / self.cfg.noise_anneal_steps)

  def route(self, logits: jax.Array | None, num_tokens: int, *, deterministic: bool,
            rng: jax.Array | None = None,
            noise_std: jax.Array | None = None,
            token_mask: jax.Array | None = None,
            capacity: int | None = None,
            context: TokenContext | None = None,
            groups: tuple[int, int] | None = None) -> routing.RoutingOutput:
    """Routes f32[G, S, E] router logits with this layer's router family and settings.

    A family without a router gets ``logits=None`` and ``groups=(G, S)``.

    ``num_tokens`` is B*L: when it is less than G*S, the trailing tokens of the last
    group are padding and are masked out. ``token_mask`` (bool[G, S], False for
    padding) replaces that mask when given. ``rng`` is the key of the family's
    randomness (``second_policy="random"``, the noise of "noisy_topk"; unused
    otherwise). ``noise_std`` is :meth:`Router.noise_std` of the grouped inputs
    ("noisy_topk" when training; without it the routing has no noise). ``capacity``
    overrides :meth:`capacity` (decode steps; ignored by ``dispatch="dropless"``).
    ``context`` is the :class:`~moe_jax.layers.router_families.TokenContext` grouped
    to ``[G, S, ...]``, handed to the family as is.
    """
    cfg = self.cfg
    num_groups, group_size = groups if logits is None else logits.shape[:2]
    if token_mask is None and num_groups * group_size != num_tokens:
      token_mask = (jnp.arange(num_groups * group_size) < num_tokens).reshape(
          num_groups, group_size)
    family = ROUTERS[cfg.router]
    bias = None
    if self.selection_bias is not None:
      bias = jax.lax.stop_gradient(self.selection_bias[...])
    noop_capacity = capacity
    if capacity is None or cfg.dispatch == "dropless":
      capacity = self.capacity(group_size, deterministic)
      noop_capacity = self.noop_capacity(group_size)
    if not cfg.noop_experts:
      noop_capacity = capacity
    inputs = RouterInputs(
        logits=logits, capacity=max(capacity, noop_capacity),
        token_mask=token_mask,
        rng=rng if family.uses_rng(cfg, deterministic) else None,
        noise_std=None if deterministic else noise_std,
        noise_scale=self.noise_scale(), selection_bias=bias, context=context)
    return routing.split_noop_experts(
        family.route(cfg, inputs), num_experts=cfg.num_experts, capacity=capacity,
        noop_capacity=noop_capacity, token_mask=token_mask)

  def update_selection_bias(self, choice_counts: jax.Array) -> None:
    """DeepSeek-V3: moves the selection bias towards balance from one step's f32[E]
    ``choice_counts`` (summed over the global batch); nothing without a bias."""
    if self.selection_bias is None:
      return
    self.selection_bias[...] = routing.update_selection_bias(
        self.selection_bias[...], choice_counts, self.cfg.bias_update_rate)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               token_mask: jax.Array | None = None, group_size: int | None = None,
               capacity: int | None = None,
               dispatcher: Dispatcher | None = None,
               context: TokenContext | None = None) -> tuple[jax.Array, MoeAux]:
    """x: [B, L, M] -> (y: [B, L, M] in the compute dtype, MoeAux).

    ``token_mask`` (bool[B, L], optional) marks padding with False: padded tokens are
    never routed (their routed output is 0), take no expert slot and enter no loss or
    metric. Shared experts, like a dense FFN, still run on every position.
    ``context`` (:class:`~moe_jax.layers.router_families.TokenContext` of ``[B, L,
    ...]`` fields, optional) is grouped like the tokens and handed to the router family.
    ``group_size``, ``capacity`` and ``dispatcher`` override the config's S, C and
    dispatch path; they serve decoding (:meth:`decode`).
    """
    if deterministic is None:
      deterministic = self.deterministic
    cfg = self.cfg
    batch, length, d_model = x.shape
    num_tokens = batch * length
    requested = group_size or cfg.group_size or length  # 0: one group per sequence
    num_groups, group_size = group_tokens(num_tokens, requested)
    check_groups(num_tokens, requested, self.layout.group_shards)
    pad = num_groups * group_size - num_tokens
    tokens = x.reshape(num_tokens, d_model)
    if pad:
      tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    grouped = self.constrain(tokens.reshape(num_groups, group_size, d_model), "groups")

    logits = noise_std = None
    if self.router is not None:
      logits = self.router(grouped, deterministic=deterministic)  # f32[G, S, E]
      noise_std = None if deterministic else self.router.noise_std(grouped)
    rng = None
    if ROUTERS[cfg.router].uses_rng(cfg, deterministic):
      rng = self.rngs.routing()
    mask = None
    if token_mask is not None:
      mask = jnp.pad(token_mask.reshape(num_tokens).astype(jnp.bool_), (0, pad))
      mask = mask.reshape(num_groups, group_size)

    def group(a):  # [B, L, ...] -> [G, S, ...], padding tokens 0
      a = a.reshape((num_tokens,) + a.shape[2:])
      a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
      return a.reshape((num_groups, group_size) + a.shape[1:])

    if context is not None:
      context = jax.tree.map(group, context)
    out = self.route(logits, num_tokens, deterministic=deterministic, rng=rng,
                     noise_std=noise_std, token_mask=mask, capacity=capacity,
                     context=context, groups=(num_groups, group_size))
    dispatch = dispatcher or DISPATCHERS[resolve_dispatch(cfg.dispatch)]
    y, lost = dispatch(grouped.astype(cfg.compute_dtype), out, self.experts,
                       self.layout, cfg=cfg, deterministic=deterministic)
    if lost is not None:
      # Over the valid tokens, as the routers count (padding is never routed or lost).
      out = apply_lost(out, lost, num_tokens if mask is None else jnp.sum(mask))
    if self.sow_routing:
      self.sow(nnx.Intermediate, "routing", out)
    y = self.constrain(y, "groups")
    y = y.reshape(num_groups * group_size, d_model)[:num_tokens]
    y = y.reshape(batch, length, d_model)
    if self.shared_experts is not None:
      # DeepSeek-MoE: every token also passes the shared experts (Qwen2-MoE: scaled by
      # its gate).
      shared = self.shared_experts(x, deterministic=deterministic)
      if self.shared_gate is not None:
        shared = shared * self.shared_gate(x).astype(shared.dtype)
      y = y + shared.astype(y.dtype)
    metrics = dict(out.metrics, gate_mass=routing.gate_mass(out))
    aux = MoeAux(aux_loss=out.aux_loss, z_loss=out.z_loss, metrics=metrics)
    return y, aux

  def decode(self, x: jax.Array, token_mask: jax.Array, *, prefill: bool,
             context: TokenContext | None = None) -> jax.Array:
    """The layer at decode time (evaluation mode): x: [B, L, M] -> [B, L, M].

    Padding (``token_mask`` False) takes no capacity. Prefill routes like evaluation
    (``eval_capacity_factor``). A step routes the B new tokens in groups of the
    tokens of one data-parallel device with ``C = S``, so no token is dropped for
    capacity: each token picks K distinct experts, so at most S choices reach one. On
    one device, a step whose B*K choices are fewer than E gathers just the chosen
    experts' weights (:func:`moe_jax.layers.dispatch.gather_dispatch`) instead of
    running all E. ``context`` is the new tokens' (see :meth:`__call__`).
    """
    if prefill:
      return self(x, deterministic=True, token_mask=token_mask, context=context)[0]
    num_tokens = x.shape[0] * x.shape[1]
    shards = self.layout.group_shards
    if num_tokens % shards:
      raise ValueError(f"a decode step of {num_tokens} rows cannot be split over the "
                       f"{shards} data-parallel devices; use a batch size that is a "
                       f"multiple of {shards}.")
    size = num_tokens // shards
    few = (self.layout.num_devices == 1
           and num_tokens * self.cfg.top_k < self.cfg.num_experts)
    return self(x, deterministic=True, token_mask=token_mask, group_size=size,
                capacity=size, dispatcher=gather_dispatch if few else None,
                context=context)[0]
