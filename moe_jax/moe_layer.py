"""The sparse MoE feed-forward layer: group, route, dispatch, run experts, combine.

``y, aux = MoeLayer(cfg, rngs=rngs)(x)`` maps ``[B, L, M] -> [B, L, M]`` and returns the
losses and metrics explicitly as a typed :class:`MoeAux` pytree (V-MoE style), so a test
or notebook reads them without digging through collections.

Dispatch paths share one interface (:data:`DISPATCHERS`) and are chosen by
``MoeConfig.dispatch``:

* ``"einsum"``: one-hot ``[G, S, E, C]`` dispatch/combine tensors (Mesh-TF, GShard,
  flaxformer). The reference path; under a mesh the two einsums become all-to-alls.
* ``"indices"``: scatters token ids into ``[G, E, C]`` slot tables and gathers, never
  building the one-hot tensors. Same numbers, work proportional to ``S*K*M`` per group
  instead of ``S*E*C*M``.
* ``"dropless"``: no capacity. Every kept choice is sorted by expert and the experts run
  as grouped matmuls (``jax.lax.ragged_dot``, as in MegaBlocks and MaxText), so the work
  is exactly the routed tokens, however unbalanced. Equal to the other paths with
  ``C = S``. One device only: see :func:`dropless_dispatch`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.experts import ACTIVATIONS, Experts, scaled_init

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Hyper-parameters of one MoE layer.

  Attributes:
    d_model: M, model width.
    d_ff: H, hidden width of each expert.
    num_experts: E.
    top_k: K, experts per token (1 Switch, 2 GShard).
    capacity_factor: train capacity factor; ``C = ceil(cf * S / E)`` (no factor of K).
    eval_capacity_factor: capacity factor when ``deterministic``.
    group_size: S, tokens routed together. The B*L tokens are split into groups of S in
      row-major order; if B*L < S one group of B*L tokens is used, and if B*L is not a
      multiple of S the last group is padded with masked tokens that are never routed
      and never enter a loss or a metric. On a mesh (see :mod:`moe_jax.sharding`) each
      group must come from one device's slice of the batch: B*L must be a multiple of
      S and G = B*L / S a multiple of the data-parallel device count D = data*expert,
      i.e. S must divide the B*L / D tokens of a device. The grouping never depends on
      the mesh, so a sharded run routes exactly like a single-device one.
    min_capacity: lower bound on C.
    second_policy, second_threshold, normalize_gates, batch_priority: see
      :func:`moe_jax.routing.route`.
    jitter_noise: eps of the multiplicative U[1-eps, 1+eps] jitter on router inputs,
      training only (Switch uses 0.01 in some setups; default off).
    expert_dropout: dropout rate on the experts' hidden layer, training only.
    activation: "relu" | "gelu" | "swiglu".
    init_scale: variance scale of the truncated-normal fan-in init (Switch: 0.1).
    dtype: compute dtype of dispatch and experts; the router is always float32.
    dispatch: "einsum" | "indices" | "dropless" | "auto". "auto" picks, per backend,
      the capacity-based path that measured faster (docs/benchmarks.md): "indices" on
      CPU and GPU, "einsum" on TPU, where the one-hot matmuls run on the MXU.
      "dropless" ignores ``capacity_factor``, ``eval_capacity_factor`` and
      ``min_capacity`` (no token is dropped for capacity; the second-expert policy
      still applies), and its ``expert_fill`` metric counts kept choices per ``S``
      tokens of a group.
  """

  d_model: int
  d_ff: int
  num_experts: int
  top_k: int = 1
  capacity_factor: float = 1.0
  eval_capacity_factor: float = 2.0
  group_size: int = 1024
  min_capacity: int = 4
  second_policy: str = "all"
  second_threshold: float = 0.2
  normalize_gates: bool = True
  batch_priority: bool = False
  jitter_noise: float = 0.0
  expert_dropout: float = 0.0
  activation: str = "relu"
  init_scale: float = 0.1
  dtype: str = "float32"
  dispatch: str = "auto"

  def __post_init__(self):
    for msg in validate_moe_config(self):
      raise ValueError(msg)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def validate_moe_config(cfg) -> list[str]:
  """Every problem with ``cfg`` as one sentence naming the key and the fix.

  ``cfg`` may be a :class:`MoeConfig` or any object with the same attributes (an
  ``ml_collections.ConfigDict``), so experiment configs are checked with the same rules
  before anything is traced.
  """
  errors = []

  def positive_int(name):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      errors.append(f"{name}={v!r} must be a positive integer.")
      return False
    return True

  ok = all([positive_int("d_model"), positive_int("d_ff"),
            positive_int("num_experts"), positive_int("group_size"),
            positive_int("min_capacity")])
  top_k = cfg.top_k
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    errors.append(f"top_k={top_k!r} must be an integer >= 1 (1 Switch, 2 GShard).")
  elif ok and top_k > cfg.num_experts:
    errors.append(f"top_k={top_k} must be <= num_experts={cfg.num_experts}; lower top_k "
                  "or add experts.")
  for name in ("capacity_factor", "eval_capacity_factor"):
    v = getattr(cfg, name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
      errors.append(f"{name}={v!r} must be > 0 (1.0 is an even share per expert; "
                    "1.25 or 2.0 leave headroom).")
  if cfg.second_policy not in routing.SECOND_POLICIES:
    errors.append(f"second_policy={cfg.second_policy!r} is unknown; use one of "
                  f"{', '.join(routing.SECOND_POLICIES)}.")
  elif cfg.second_policy == "random" and not cfg.second_threshold > 0:
    errors.append(f"second_threshold={cfg.second_threshold!r} must be > 0 with "
                  "second_policy='random' (ST-MoE uses 0.2).")
  if not 0.0 <= cfg.jitter_noise < 1.0:
    errors.append(f"jitter_noise={cfg.jitter_noise!r} must be in [0, 1).")
  if not 0.0 <= cfg.expert_dropout < 1.0:
    errors.append(f"expert_dropout={cfg.expert_dropout!r} must be in [0, 1).")
  if cfg.activation not in ACTIVATIONS:
    errors.append(f"activation={cfg.activation!r} is unknown; use one of "
                  f"{', '.join(ACTIVATIONS)}.")
  if not cfg.init_scale > 0:
    errors.append(f"init_scale={cfg.init_scale!r} must be > 0.")
  if cfg.dtype not in DTYPES:
    errors.append(f"dtype={cfg.dtype!r} is unknown; use one of {', '.join(DTYPES)}.")
  if cfg.dispatch not in DISPATCHERS and cfg.dispatch != "auto":
    errors.append(f"dispatch={cfg.dispatch!r} is unknown; use one of "
                  f"{', '.join(DISPATCHERS)} or auto.")
  return errors


@flax.struct.dataclass
class MoeAux:
  """Losses and metrics of one MoE layer (all float32, unscaled).

  Attributes:
    aux_loss: f32[] Switch load-balancing loss.
    z_loss: f32[] router z-loss.
    metrics: ``dropped_fraction``, ``expert_load`` f32[E], ``expert_fill`` f32[E],
      ``router_confidence``, ``router_entropy``, ``second_kept_fraction``.
  """

  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: dict[str, jax.Array]


class Router(nnx.Module):
  """Bias-free linear map to expert logits, always in float32.

  Training multiplies the router *inputs* by U[1-eps, 1+eps] noise (Switch jitter).
  """

  def __init__(self, d_model: int, num_experts: int, *, jitter_noise: float = 0.0,
               init_scale: float = 0.1, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        scaled_init(init_scale)(rngs.params(), (d_model, num_experts), jnp.float32))
    self.jitter_noise = jitter_noise
    self.rngs = rngs

  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """x: [G, S, M] any dtype -> f32[G, S, E] logits."""
    x = x.astype(jnp.float32)
    if self.jitter_noise > 0 and not deterministic:
      noise = jax.random.uniform(self.rngs.jitter(), x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
      x = x * noise
    # HIGHEST: no bf16/TF32 passes, so routing decisions do not depend on the backend.
    return jnp.einsum("GSM,ME->GSE", x, self.kernel[...].astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


class Dispatcher(Protocol):
  """Moves grouped tokens to the experts, runs them and combines their outputs."""

  def __call__(self, x: jax.Array, out: routing.RoutingOutput, experts: Experts,
               constrain: Callable[[jax.Array, str], jax.Array], *,
               deterministic: bool) -> jax.Array:
    """x: [G, S, M] -> [G, S, M]."""


def einsum_dispatch(x, out, experts, constrain, *, deterministic):
  """Reference path with one-hot ``[G, S, E, C]`` tensors (GShard / flaxformer)."""
  dispatch = out.dispatch_mask.astype(x.dtype)
  combine = out.combine_weights.astype(x.dtype)
  # Each device fills the buffers of its own groups, then one all-to-all moves them to
  # the devices that hold their experts; the reverse happens before the combine.
  buffers = constrain(jnp.einsum("GSEC,GSM->EGCM", dispatch, x), "group_buffers")
  y = experts(constrain(buffers, "expert_buffers"), deterministic=deterministic)
  y = constrain(constrain(y, "expert_buffers"), "group_buffers")
  return jnp.einsum("GSEC,EGCM->GSM", combine, y)


def _slot_table(slot: jax.Array, group_size: int, num_slots: int) -> jax.Array:
  """i32[S, K] flat slot of each choice -> i32[E*C] token of each slot (S if empty)."""
  token = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[:, None], slot.shape)
  table = jnp.full((num_slots,), group_size, jnp.int32)
  return table.at[slot].set(token, mode="drop")


def _gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
  """[N, M] rows with a zero row appended, picked by i32[...] (N picks the zero row)."""
  padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[-1]), rows.dtype)], axis=0)
  return jnp.take(padded, index, axis=0)


def indices_dispatch(x, out, experts, constrain, *, deterministic):
  """Scatter token ids into ``[G, E*C]`` slot tables, then gather.

  Empty slots and dropped choices point at a zero row appended after the S tokens (for
  dispatch) or after the E*C slots (for combine), so both gathers are dense. The
  per-group work is written for one group and vmapped over G, so that the gathers and
  the scatter carry G as a batch dimension and stay local to the device that holds the
  group (explicit group indices would make the partitioner all-gather the tokens).
  """
  num_groups, group_size, d_model = x.shape
  num_experts, capacity = out.num_experts, out.capacity
  num_slots = num_experts * capacity
  # Flat slot of each kept choice; dropped choices get num_slots (out of range).
  slot = jnp.where(out.kept, out.expert_index * capacity + out.position, num_slots)
  table = jax.vmap(_slot_table, in_axes=(0, None, None))(
      slot, group_size, num_slots)  # i32[G, E*C]
  buffers = jax.vmap(_gather_rows)(x, table)  # [G, E*C, M]
  buffers = buffers.reshape(num_groups, num_experts, capacity, d_model)
  buffers = constrain(buffers.transpose(1, 0, 2, 3), "group_buffers")  # [E, G, C, M]
  y = experts(constrain(buffers, "expert_buffers"), deterministic=deterministic)
  y = constrain(constrain(y, "expert_buffers"), "group_buffers")
  y = y.transpose(1, 0, 2, 3).reshape(num_groups, num_slots, d_model)
  picked = jax.vmap(_gather_rows)(y, slot)  # [G, S, K, M]
  return jnp.einsum("GSKM,GSK->GSM", picked, out.gates.astype(y.dtype))


def dropless_dispatch(x, out, experts, constrain, *, deterministic):
  """Sorts every kept choice by expert and runs the experts as grouped matmuls.

  ``out`` must come from routing with ``C = S`` (:meth:`MoeLayer.capacity` does this
  for ``dispatch="dropless"``), so that only padding and the second-expert policy
  leave a choice unrouted. The ``N = G*S*K`` choices are stably sorted by expert
  (unrouted ones last, past ``sum(group_sizes)``, where ``ragged_dot`` outputs 0), the
  rows are gathered in that order, and the outputs are gathered back per choice.

  The sort runs over all groups at once. On a mesh the partitioner would gather every
  device's tokens (and the experts' weights) to sort them, so that each device did
  the whole batch's work; data and expert parallelism need a per-device sort and a
  ragged all-to-all, which are not built. So this path runs on one device only:
  :class:`MoeLayer` and the config check refuse it on a mesh of more than one device.
  """
  del constrain
  num_groups, group_size, d_model = x.shape
  top_k = out.expert_index.shape[-1]
  num_experts = out.num_experts
  expert = jnp.where(out.kept, out.expert_index, num_experts).reshape(-1)  # i32[N]
  order = jnp.argsort(expert, stable=True)  # choices grouped by expert, token order
  group_sizes = jnp.bincount(expert, length=num_experts + 1)[:num_experts]
  tokens = x.reshape(num_groups * group_size, d_model)
  rows = jnp.take(tokens, order // top_k, axis=0)  # [N, M]
  y = experts.ragged(rows, group_sizes.astype(jnp.int32), deterministic=deterministic)
  inverse = jnp.argsort(order)  # the sorted row of each choice
  picked = jnp.take(y, inverse, axis=0).reshape(num_groups, group_size, top_k, d_model)
  return jnp.einsum("GSKM,GSK->GSM", picked, out.gates.astype(y.dtype))


def gather_dispatch(x, out, experts, constrain, *, deterministic):
  """Runs each token through its own chosen experts, gathering their weights.

  Same numbers as the other paths for the same routing (dropped choices add 0), but it
  reads T*K experts' weights rather than all E, so it suits decode steps of a few
  tokens on one device (:meth:`MoeLayer.decode`). Not a config choice: the gathered
  weights grow with the tokens.
  """
  del constrain
  num_groups, group_size, d_model = x.shape
  top_k = out.expert_index.shape[-1]
  tokens = num_groups * group_size
  y = experts.gathered(x.reshape(tokens, d_model),
                       out.expert_index.reshape(tokens, top_k),
                       deterministic=deterministic)  # [T, K, M]
  gates = jnp.where(out.kept, out.gates, 0.0).reshape(tokens, top_k).astype(y.dtype)
  return jnp.einsum("TKM,TK->TM", y, gates).reshape(num_groups, group_size, d_model)


DISPATCHERS: dict[str, Dispatcher] = {
    "einsum": einsum_dispatch,
    "indices": indices_dispatch,
    "dropless": dropless_dispatch,
}


def resolve_dispatch(name: str, backend: str | None = None) -> str:
  """The dispatch path ``name`` stands for on ``backend`` (default: jax's)."""
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  return "einsum" if backend == "tpu" else "indices"


def group_tokens(num_tokens: int, group_size: int) -> tuple[int, int]:
  """(G, S) for ``num_tokens`` tokens: S = min(group_size, tokens), G = ceil(T / S)."""
  size = min(group_size, num_tokens)
  return -(-num_tokens // size), size


class Layout:
  """Where MoeLayer's activations live; this default is one device and does nothing.

  :class:`moe_jax.sharding.MeshLayout` subclasses it. ``constrain`` pins the layouts
  between which the tokens move: ``"groups"`` ``[G, S, M]`` and ``"group_buffers"``
  ``[E, G, C, M]`` with G over the data-parallel devices (each device dispatches its own
  groups locally), and ``"expert_buffers"`` ``[E, G, C, M]`` with E over the expert axis.
  Pinning the buffers on both sides of the expert computation makes XLA emit one
  all-to-all at dispatch and one at combine (without the ``"group_buffers"`` step it
  may all-gather the tokens instead).
  A layout is static module data, so it must be hashable.

  Attributes:
    group_shards: D, the number of devices the G axis is split over.
    num_devices: devices of the layout's mesh.
  """

  group_shards: int = 1
  num_devices: int = 1

  def constrain(self, x: jax.Array, name: str) -> jax.Array:
    del name
    return x


SINGLE_DEVICE = Layout()


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
        f"multiple of the {group_shards} data-parallel devices (data*expert). Set "
        f"moe.group_size to a divisor of the {per_device:g} tokens per device.")


class MoeLayer(nnx.Module):
  """Sparse MoE FFN: ``y, aux = layer(x)`` with ``x, y: [B, L, M]``.

  ``layer.eval()`` / ``layer.train()`` (or ``deterministic=``) switch between training
  (jitter, expert dropout, ``capacity_factor``) and evaluation (none of these,
  ``eval_capacity_factor``).
  """

  def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.router = Router(cfg.d_model, cfg.num_experts, jitter_noise=cfg.jitter_noise,
                         init_scale=cfg.init_scale, rngs=rngs)
    self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff,
                           activation=cfg.activation, dropout_rate=cfg.expert_dropout,
                           init_scale=cfg.init_scale, dtype=cfg.compute_dtype,
                           rngs=rngs)
    self.rngs = rngs
    self.deterministic = False
    # moe_jax.sharding.shard_model swaps in a MeshLayout for the model's mesh.
    self.layout: Layout = SINGLE_DEVICE

  def constrain(self, x: jax.Array, name: str) -> jax.Array:
    """Sharding hook: ``"groups"`` for ``[G, S, M]``, ``"expert_buffers"`` for
    ``[E, G, C, M]``."""
    return self.layout.constrain(x, name)

  @property
  def is_causal(self) -> bool:
    """Whether no token's routing depends on a later token, so that it can decode one
    token at a time. Batch Prioritized Routing fills capacity by confidence over the
    whole group, later tokens included."""
    return not self.cfg.batch_priority

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """C for groups of ``group_size`` tokens; S for ``dispatch="dropless"``."""
    if self.cfg.dispatch == "dropless":
      return group_size
    cf = self.cfg.eval_capacity_factor if deterministic else self.cfg.capacity_factor
    return routing.expert_capacity(group_size, self.cfg.num_experts, cf,
                                   self.cfg.min_capacity)

  def route(self, logits: jax.Array, num_tokens: int, *, deterministic: bool,
            rng: jax.Array | None = None, token_mask: jax.Array | None = None,
            capacity: int | None = None) -> routing.RoutingOutput:
    """Routes f32[G, S, E] router logits with this layer's settings.

    ``num_tokens`` is B*L: when it is less than G*S, the trailing tokens of the last
    group are padding and are masked out, as are the tokens where the optional
    ``token_mask`` bool[G, S] is False. ``rng`` is needed only for
    ``second_policy="random"``. ``capacity`` overrides :meth:`capacity`.
    """
    cfg = self.cfg
    num_groups, group_size, _ = logits.shape
    if num_groups * group_size != num_tokens:
      padding = (jnp.arange(num_groups * group_size) < num_tokens).reshape(
          num_groups, group_size)
      token_mask = padding if token_mask is None else token_mask & padding
    if capacity is None or cfg.dispatch == "dropless":
      capacity = self.capacity(group_size, deterministic)
    return routing.route(
        logits, top_k=cfg.top_k, capacity=capacity,
        second_policy=cfg.second_policy, second_threshold=cfg.second_threshold,
        normalize_gates=cfg.normalize_gates, batch_priority=cfg.batch_priority,
        rng=rng if cfg.top_k > 1 and cfg.second_policy == "random" else None,
        token_mask=token_mask)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               token_mask: jax.Array | None = None, group_size: int | None = None,
               capacity: int | None = None,
               dispatcher: Dispatcher | None = None) -> tuple[jax.Array, MoeAux]:
    """x: [B, L, M] -> (y: [B, L, M] in the compute dtype, MoeAux).

    The optional arguments serve decoding (:meth:`decode`): ``token_mask`` bool[B, L]
    (False: padding, never routed, output 0), ``group_size`` and ``capacity``
    overriding the config's S and C, and ``dispatcher`` the config's dispatch path.
    """
    if deterministic is None:
      deterministic = self.deterministic
    cfg = self.cfg
    batch, length, d_model = x.shape
    num_tokens = batch * length
    group_size = group_size or cfg.group_size
    num_groups, group_size = group_tokens(num_tokens, group_size)
    check_groups(num_tokens, group_size, self.layout.group_shards)
    if cfg.dispatch == "dropless" and self.layout.num_devices > 1:
      raise ValueError(
          f"dispatch='dropless' runs on one device, but this layer is laid out over "
          f"{self.layout.num_devices}; use dispatch='indices' or 'einsum' on a mesh.")
    pad = num_groups * group_size - num_tokens
    tokens = x.reshape(num_tokens, d_model)
    if pad:
      tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    grouped = self.constrain(tokens.reshape(num_groups, group_size, d_model), "groups")

    logits = self.router(grouped, deterministic=deterministic)  # f32[G, S, E]
    policy_rng = None
    if cfg.top_k > 1 and cfg.second_policy == "random":
      policy_rng = self.rngs.routing()
    if token_mask is not None:
      token_mask = jnp.pad(token_mask.reshape(num_tokens), (0, pad)).reshape(
          num_groups, group_size)
    out = self.route(logits, num_tokens, deterministic=deterministic, rng=policy_rng,
                     token_mask=token_mask, capacity=capacity)
    dispatch = dispatcher or DISPATCHERS[resolve_dispatch(cfg.dispatch)]
    y = dispatch(grouped.astype(cfg.compute_dtype), out, self.experts, self.constrain,
                 deterministic=deterministic)
    y = self.constrain(y, "groups")
    y = y.reshape(num_groups * group_size, d_model)[:num_tokens]
    aux = MoeAux(aux_loss=out.aux_loss, z_loss=out.z_loss, metrics=out.metrics)
    return y.reshape(batch, length, d_model), aux

  def decode(self, x: jax.Array, token_mask: jax.Array, *, prefill: bool) -> jax.Array:
    """The layer at decode time (evaluation mode): x: [B, L, M] -> [B, L, M].

    Padding (``token_mask`` False) takes no capacity. Prefill routes like evaluation
    (``eval_capacity_factor``). A step routes the B new tokens in groups of the
    tokens of one data-parallel device with ``C = S``, so no token is dropped for
    capacity: each token picks K distinct experts, so at most S choices reach one. On
    one device, a step whose B*K choices are fewer than E gathers just the chosen
    experts' weights (:func:`gather_dispatch`) instead of running all E.
    """
    if prefill:
      return self(x, deterministic=True, token_mask=token_mask)[0]
    num_tokens = x.shape[0] * x.shape[1]
    shards = self.layout.group_shards
    if num_tokens % shards:
      raise ValueError(f"a decode step of {num_tokens} rows cannot be split over the "
                       f"{shards} data-parallel devices; use a batch size that is a "
                       f"multiple of {shards}.")
    size = num_tokens // shards
    few = self.layout.num_devices == 1 and num_tokens * self.cfg.top_k < self.cfg.num_experts
    return self(x, deterministic=True, token_mask=token_mask, group_size=size,
                capacity=size, dispatcher=gather_dispatch if few else None)[0]
