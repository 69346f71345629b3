"""The sparse MoE feed-forward layer: group, route, dispatch, run experts, combine.

``y, aux = MoeLayer(cfg, rngs=rngs)(x)`` maps ``[B, L, M] -> [B, L, M]`` and returns the
losses and metrics explicitly as a typed :class:`MoeAux` pytree (V-MoE style), so a test
or notebook reads them without digging through collections.

The router family (``MoeConfig.router``, see :data:`moe_jax.routers.ROUTERS`) and the
dispatch path (``MoeConfig.dispatch``, see :data:`moe_jax.dispatch.DISPATCHERS`) are
looked up by name; every family returns the same :class:`~moe_jax.routing.RoutingOutput`
and every dispatch path consumes it. Optional shared experts (DeepSeek-MoE) are a dense
FFN that every token passes, added to the routed output.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.dispatch import (DISPATCHERS, Dispatcher, dropless_dispatch,  # noqa: F401
                              einsum_dispatch, gather_dispatch, indices_dispatch,
                              resolve_dispatch)
from moe_jax.dropless import EXCHANGES, apply_lost
from moe_jax.experts import ACTIVATIONS, DenseFfn, Experts, scaled_init
from moe_jax.lora import weight
from moe_jax.projection import project
from moe_jax.routers import (ROUTER_OPTIONS, ROUTERS, RouterInputs, SelectionBias,
                             TrainingStep)

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
    group_size: S, tokens routed together; 0 means one group per sequence (S = L, as
      in MaxText's and DeepSeek's per-sequence balance), whatever B and the mesh. The
      B*L tokens are split into groups of S in
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
    init_scale: variance scale of the experts' truncated-normal fan-in init (Switch:
      0.1).
    router_init_scale: the same for the router's kernel (Switch: 0.1). It sets the
      spread of the router logits, and so the router's confidence, at init.
    dtype: compute dtype of dispatch and experts; the router is always float32.
    dispatch: "einsum" | "indices" | "dropless" | "auto". "auto" picks, per backend,
      the capacity-based path that measured faster (docs/benchmarks.md): "indices" on
      CPU and GPU, "einsum" on TPU, where the one-hot matmuls run on the MXU.
      "dropless" ignores ``capacity_factor``, ``eval_capacity_factor`` and
      ``min_capacity`` (no token is dropped for capacity; the second-expert policy
      still applies), and its ``expert_fill`` metric counts kept choices per ``S``
      tokens of a group. It runs on one device and on any mesh (per-device sort and
      all-to-all of the routed rows, :mod:`moe_jax.dropless`).
    ragged_exchange: dropless on a mesh: how rows move between the expert shards.
      "ragged" (``jax.lax.ragged_all_to_all``, only the routed rows; GPU and TPU),
      "padded" (``all_to_all`` of the static buffers; every backend) or "auto"
      ("ragged" on GPU and TPU, "padded" elsewhere). Both give the same numbers.
    ragged_buffer_factor: dropless on a mesh: the static rows a device may send to
      each expert shard. -1 is the worst case (nothing is dropped); f > 0 is f times
      the balanced share ``T*K/X`` (MaxText's convention), and rows past it are
      dropped and counted in ``dropped_fraction``.
    router: the router family, a key of :data:`moe_jax.routers.ROUTERS`: "topk"
      (Switch, GShard, Mixtral, DeepSeek), "noisy_topk" (Shazeer et al. 2017) or
      "expert_choice" (Zhou et al. 2022; each expert takes ``C = ceil(cf * S / E)``
      tokens, so a token visits ``capacity_factor`` experts on average; not causal).
    score_fn, expert_groups, top_groups, gate_scale, balance_choices: "topk" only; see
      :func:`moe_jax.routing.route` ("sigmoid" scores, DeepSeek-V2/V3 group-limited
      routing, DeepSeek's ``routed_scaling_factor``, and which choices the balance loss
      counts: "first" is Switch, "all" Mixtral and DeepSeek).
    bias_update_rate: "topk" only. When > 0 the layer holds a float32 selection bias
      ``[E]`` (:class:`~moe_jax.routers.SelectionBias`, not a parameter) that routing
      adds to the scores for the choice of experts, and that the training step moves
      by this rate towards balance (DeepSeek-V3's auxiliary-loss-free balancing,
      :func:`moe_jax.routing.update_selection_bias`). 0 is off.
    num_shared_experts: DeepSeek-MoE shared experts: a dense FFN of width
      ``num_shared_experts * d_ff`` with the experts' activation that every token
      passes; its output is added to the routed output. 0 is none.
    noise_anneal_steps: "noisy_topk" only: the gating noise is scaled by
      ``max(0, 1 - step / noise_anneal_steps)``, with ``step`` the training step the
      layer's :class:`~moe_jax.routers.TrainingStep` holds. 0 is off (constant noise).
    noop_experts: N, MoDE's no-op experts (Raposo et al. 2024, Sec. 3.5): the router
      chooses among ``E + N`` experts, and a choice of one of the last N computes
      nothing (its output is 0, the token rides the residual). They count in the
      balance loss and the load metrics (``expert_load`` etc. have ``E + N``
      entries). Capacity is the balanced share over all of them, ``C = ceil(cf * S /
      (E + N))``, so the real experts' buffers, and the compute, shrink by ``E / (E +
      N)``. Token-choice routers only. 0 is off.
    noop_capacity_factor: the no-op experts' own capacity factor, ``C_noop =
      ceil(f * S / (E + N))`` (train and eval); None: S, no limit. A no-op choice
      adds 0 whether kept or not, so it changes no output, only which no-op choices
      count as kept or dropped in the metrics.
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
  router_init_scale: float = 0.1
  dtype: str = "float32"
  dispatch: str = "auto"
  router: str = "topk"
  score_fn: str = "softmax"
  expert_groups: int = 1
  top_groups: int | None = None
  gate_scale: float = 1.0
  balance_choices: str = "first"
  bias_update_rate: float = 0.0
  num_shared_experts: int = 0
  noise_anneal_steps: int = 0
  ragged_exchange: str = "auto"
  ragged_buffer_factor: float = -1.0
  noop_experts: int = 0
  noop_capacity_factor: float | None = None

  def __post_init__(self):
    for msg in validate_moe_config(self):
      raise ValueError(msg)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def routed_experts(self) -> int:
    """E + N: the experts the router chooses among (no-op experts included)."""
    return self.num_experts + self.noop_experts


def routed_experts(cfg) -> int:
  """E + N of any object with MoeConfig's attributes (N: 0 when it has none)."""
  noop = getattr(cfg, "noop_experts", 0)
  return cfg.num_experts + (noop if _is_int(noop) and noop > 0 else 0)


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
            positive_int("num_experts"), positive_int("min_capacity")])
  group_size = cfg.group_size
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
    errors.append(f"group_size={group_size!r} must be an integer >= 0 (0: one group per "
                  "sequence).")
  top_k = cfg.top_k
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    errors.append(f"top_k={top_k!r} must be an integer >= 1 (1 Switch, 2 GShard).")
  elif ok and top_k > routed_experts(cfg):
    errors.append(f"top_k={top_k} must be <= num_experts={cfg.num_experts}"
                  + (f" + noop_experts={cfg.noop_experts}" if routed_experts(cfg)
                     > cfg.num_experts else "") + "; lower top_k or add experts.")
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
  for name in ("init_scale", "router_init_scale"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
      errors.append(f"{name}={v!r} must be a number > 0 (Switch: 0.1).")
  if cfg.dtype not in DTYPES:
    errors.append(f"dtype={cfg.dtype!r} is unknown; use one of {', '.join(DTYPES)}.")
  if cfg.dispatch not in DISPATCHERS and cfg.dispatch != "auto":
    errors.append(f"dispatch={cfg.dispatch!r} is unknown; use one of "
                  f"{', '.join(DISPATCHERS)} or auto.")
  errors.extend(_router_errors(cfg, ok))
  errors.extend(_dropless_errors(cfg))
  errors.extend(_noop_errors(cfg))
  return errors


def _noop_errors(cfg) -> list[str]:
  """The keys of MoDE's no-op experts (:func:`moe_jax.routing.split_noop_experts`)."""
  errors = []
  noop = getattr(cfg, "noop_experts", 0)
  factor = getattr(cfg, "noop_capacity_factor", None)
  if not (_is_int(noop) and noop >= 0):
    errors.append(f"noop_experts={noop!r} must be an integer >= 0 (0 is off; MoDE: "
                  "no-op experts beside the E real ones).")
    return errors
  family = ROUTERS.get(cfg.router)
  if noop and family is not None and not family.noop:
    users = [r for r, f in ROUTERS.items() if f.noop]
    errors.append(f"noop_experts={noop} needs a router where tokens choose experts, but "
                  f"router={cfg.router!r} lets experts choose tokens (a no-op expert "
                  "takes none from the others); use router="
                  f"{' or '.join(map(repr, users))}, or noop_experts=0.")
  if factor is not None:
    if not (_is_real(factor) and factor > 0):
      errors.append(f"noop_capacity_factor={factor!r} must be None (no limit) or a "
                    "finite number > 0.")
    elif not noop:
      errors.append(f"noop_capacity_factor={factor!r} has no effect with noop_experts=0; "
                    "leave it at None or add no-op experts.")
    elif cfg.dispatch == "dropless":
      errors.append(f"noop_capacity_factor={factor!r} has no effect with "
                    "dispatch='dropless' (no capacity); leave it at None.")
  return errors


def _dropless_errors(cfg) -> list[str]:
  """The keys of the dropless path across devices (:mod:`moe_jax.dropless`)."""
  errors = []
  exchange = getattr(cfg, "ragged_exchange", "auto")
  factor = getattr(cfg, "ragged_buffer_factor", -1.0)
  if exchange not in EXCHANGES:
    errors.append(f"ragged_exchange={exchange!r} is unknown; use one of "
                  f"{', '.join(EXCHANGES)}.")
  if not (_is_real(factor) and (factor == -1 or factor > 0)):
    errors.append(f"ragged_buffer_factor={factor!r} must be -1 (worst-case buffers, "
                  "nothing dropped) or a finite number > 0 (times the balanced share).")
  if cfg.dispatch in DISPATCHERS and cfg.dispatch != "dropless":
    for name, value, default in (("ragged_exchange", exchange, "auto"),
                                 ("ragged_buffer_factor", factor, -1.0)):
      if value != default and not any(e.startswith(f"{name}=") for e in errors):
        errors.append(f"{name}={value!r} has no effect with dispatch={cfg.dispatch!r}; "
                      f"leave it at {default!r} or use dispatch='dropless'.")
  return errors


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _router_errors(cfg, sizes_ok: bool) -> list[str]:
  """The rules of the router keys; ``sizes_ok``: d_model, num_experts, ... are valid."""
  errors = []
  family = ROUTERS.get(cfg.router)
  if family is None:
    errors.append(f"router={cfg.router!r} is unknown; use one of {', '.join(ROUTERS)}.")
  if cfg.score_fn not in routing.SCORE_FNS:
    errors.append(f"score_fn={cfg.score_fn!r} is unknown; use one of "
                  f"{', '.join(routing.SCORE_FNS)}.")
  if cfg.balance_choices not in routing.BALANCE_CHOICES:
    errors.append(f"balance_choices={cfg.balance_choices!r} is unknown; use 'first' "
                  "(Switch) or 'all' (Mixtral, DeepSeek).")
  if not (_is_real(cfg.gate_scale) and cfg.gate_scale > 0):
    errors.append(f"gate_scale={cfg.gate_scale!r} must be a finite number > 0 "
                  "(DeepSeek's routed_scaling_factor; 1.0 is off).")
  if not (_is_real(cfg.bias_update_rate) and cfg.bias_update_rate >= 0):
    errors.append(f"bias_update_rate={cfg.bias_update_rate!r} must be a finite number "
                  ">= 0 (0 is off; DeepSeek-V3 uses 1e-3).")
  for name, what in (("num_shared_experts", "0 is none"),
                     ("noise_anneal_steps", "0 is off")):
    v = getattr(cfg, name)
    if not (_is_int(v) and v >= 0):
      errors.append(f"{name}={v!r} must be an integer >= 0 ({what}).")
  groups, top_groups = cfg.expert_groups, cfg.top_groups
  groups_ok = _is_int(groups) and groups >= 1
  routed = routed_experts(cfg) if sizes_ok else 0
  what = (f"num_experts={cfg.num_experts}" if routed == cfg.num_experts or not sizes_ok
          else f"num_experts + noop_experts = {routed}")
  if not groups_ok:
    errors.append(f"expert_groups={groups!r} must be a positive integer (1 is off).")
  elif sizes_ok and routed % groups:
    errors.append(f"expert_groups={groups} must divide {what}; "
                  "experts are split into equal contiguous groups.")
  elif top_groups is None:
    if groups > 1:
      errors.append(f"top_groups=None must be set when expert_groups={groups} > 1: "
                    "the number of groups each token may use (DeepSeek-V3: 4 of 8).")
  elif not (_is_int(top_groups) and 1 <= top_groups <= groups):
    errors.append(f"top_groups={top_groups!r} must be an integer in [1, "
                  f"expert_groups={groups}].")
  elif sizes_ok and _is_int(cfg.top_k) and (
      cfg.top_k > top_groups * (routed // groups)):
    per_group = routed // groups
    errors.append(f"top_k={cfg.top_k} must be <= the {top_groups * per_group} experts "
                  f"of top_groups={top_groups} groups of {per_group}; raise top_groups "
                  "or lower top_k.")
  if family is None:
    return errors
  for name, default in ROUTER_OPTIONS.items():
    value = getattr(cfg, name, default)  # an LM config has no batch_priority
    reported = any(e.startswith(f"{name}=") for e in errors)
    if name not in family.options and value != default and not reported:
      users = [r for r, f in ROUTERS.items() if name in f.options]
      errors.append(f"{name}={value!r} has no effect with router={cfg.router!r}; leave "
                    f"it at {default!r} or use router={' or '.join(map(repr, users))}.")
  if cfg.dispatch == "dropless" and not family.dropless:
    errors.append(f"dispatch='dropless' needs a capacity-free router, but "
                  f"router={cfg.router!r} picks a fixed number of tokens per expert; use "
                  "dispatch='indices' or 'einsum'.")
  return errors


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
        scaled_init(init_scale)(rngs.params(), (d_model, num_experts), jnp.float32))
    self.noise_kernel = (nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32))
                         if learned_noise else None)
    self.jitter_noise = jitter_noise
    self.rngs = rngs

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
    mesh: the ``jax.sharding.Mesh`` (None on one device); ``dispatch="dropless"``
      runs its per-device work in a ``shard_map`` over it.
    experts_sharded: E is split over the mesh's ``expert`` axis.
  """

  group_shards: int = 1
  num_devices: int = 1
  mesh = None
  experts_sharded: bool = False

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
        f"moe.group_size to a divisor of the {per_device:g} tokens per device, or to 0 "
        "(one group per sequence).")


class MoeLayer(nnx.Module):
  """Sparse MoE FFN: ``y, aux = layer(x)`` with ``x, y: [B, L, M]``.

  ``layer.eval()`` / ``layer.train()`` (or ``deterministic=``) switch between training
  (jitter, gating noise, expert dropout, ``capacity_factor``) and evaluation (none of
  these, ``eval_capacity_factor``).

  Attributes:
    router: :class:`Router` (float32 logits; ``W_noise`` for "noisy_topk").
    experts: the E routed :class:`~moe_jax.experts.Experts`.
    shared_experts: :class:`~moe_jax.experts.DenseFfn` of width
      ``num_shared_experts * d_ff``, or None.
    selection_bias: :class:`~moe_jax.routers.SelectionBias` f32[E] when
      ``bias_update_rate > 0``, else None.
    training_step: :class:`~moe_jax.routers.TrainingStep` when
      ``noise_anneal_steps > 0``, else None.
  """

  def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    family = ROUTERS[cfg.router]
    self.router = Router(cfg.d_model, cfg.routed_experts, jitter_noise=cfg.jitter_noise,
                         init_scale=cfg.router_init_scale,
                         learned_noise=family.learned_noise, rngs=rngs)
    self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff,
                           activation=cfg.activation, dropout_rate=cfg.expert_dropout,
                           init_scale=cfg.init_scale, dtype=cfg.compute_dtype,
                           rngs=rngs)
    self.shared_experts = (DenseFfn(
        cfg.d_model, cfg.num_shared_experts * cfg.d_ff, activation=cfg.activation,
        dropout_rate=cfg.expert_dropout, init_scale=cfg.init_scale,
        dtype=cfg.compute_dtype, rngs=rngs) if cfg.num_shared_experts else None)
    self.selection_bias = (SelectionBias(jnp.zeros((cfg.routed_experts,), jnp.float32))
                           if cfg.bias_update_rate > 0 else None)
    self.training_step = (TrainingStep(jnp.zeros((), jnp.int32))
                          if cfg.noise_anneal_steps > 0 else None)
    self.rngs = rngs
    self.deterministic = False
    # moe_jax.sharding.shard_model swaps in a MeshLayout for the model's mesh.
    self.layout: Layout = SINGLE_DEVICE

  @property
  def is_causal(self) -> bool:
    """A token's routing never depends on later tokens (its group's queue is in
    position order), so the layer can run in a causal LM and decode token by token.
    False for expert choice and for Batch Prioritized Routing."""
    return ROUTERS[self.cfg.router].causal and not self.cfg.batch_priority

  @property
  def experts_per_token(self) -> float:
    """Routed experts a token visits on average when training (top_k for token
    choice, capacity_factor for expert choice)."""
    return ROUTERS[self.cfg.router].experts_per_token(self.cfg)

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

  def route(self, logits: jax.Array, num_tokens: int, *, deterministic: bool,
            rng: jax.Array | None = None,
            noise_std: jax.Array | None = None,
            token_mask: jax.Array | None = None,
            capacity: int | None = None) -> routing.RoutingOutput:
    """Routes f32[G, S, E] router logits with this layer's router family and settings.

    ``num_tokens`` is B*L: when it is less than G*S, the trailing tokens of the last
    group are padding and are masked out. ``token_mask`` (bool[G, S], False for
    padding) replaces that mask when given. ``rng`` is the key of the family's
    randomness (``second_policy="random"``, the noise of "noisy_topk"; unused
    otherwise). ``noise_std`` is :meth:`Router.noise_std` of the grouped inputs
    ("noisy_topk" when training; without it the routing has no noise). ``capacity``
    overrides :meth:`capacity` (decode steps; ignored by ``dispatch="dropless"``).
    """
    cfg = self.cfg
    num_groups, group_size, _ = logits.shape
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
        noise_scale=self.noise_scale(), selection_bias=bias)
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
               dispatcher: Dispatcher | None = None) -> tuple[jax.Array, MoeAux]:
    """x: [B, L, M] -> (y: [B, L, M] in the compute dtype, MoeAux).

    ``token_mask`` (bool[B, L], optional) marks padding with False: padded tokens are
    never routed (their routed output is 0), take no expert slot and enter no loss or
    metric. Shared experts, like a dense FFN, still run on every position.
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

    logits = self.router(grouped, deterministic=deterministic)  # f32[G, S, E]
    noise_std = None if deterministic else self.router.noise_std(grouped)
    rng = None
    if ROUTERS[cfg.router].uses_rng(cfg, deterministic):
      rng = self.rngs.routing()
    mask = None
    if token_mask is not None:
      mask = jnp.pad(token_mask.reshape(num_tokens).astype(jnp.bool_), (0, pad))
      mask = mask.reshape(num_groups, group_size)
    out = self.route(logits, num_tokens, deterministic=deterministic, rng=rng,
                     noise_std=noise_std, token_mask=mask, capacity=capacity)
    dispatch = dispatcher or DISPATCHERS[resolve_dispatch(cfg.dispatch)]
    y, lost = dispatch(grouped.astype(cfg.compute_dtype), out, self.experts,
                       self.layout, cfg=cfg, deterministic=deterministic)
    if lost is not None:
      out = apply_lost(out, lost, num_tokens)
    y = self.constrain(y, "groups")
    y = y.reshape(num_groups * group_size, d_model)[:num_tokens]
    y = y.reshape(batch, length, d_model)
    if self.shared_experts is not None:
      # DeepSeek-MoE: every token also passes the shared experts.
      y = y + self.shared_experts(x, deterministic=deterministic).astype(y.dtype)
    metrics = dict(out.metrics, gate_mass=routing.gate_mass(out))
    aux = MoeAux(aux_loss=out.aux_loss, z_loss=out.z_loss, metrics=metrics)
    return y, aux

  def decode(self, x: jax.Array, token_mask: jax.Array, *, prefill: bool) -> jax.Array:
    """The layer at decode time (evaluation mode): x: [B, L, M] -> [B, L, M].

    Padding (``token_mask`` False) takes no capacity. Prefill routes like evaluation
    (``eval_capacity_factor``). A step routes the B new tokens in groups of the
    tokens of one data-parallel device with ``C = S``, so no token is dropped for
    capacity: each token picks K distinct experts, so at most S choices reach one. On
    one device, a step whose B*K choices are fewer than E gathers just the chosen
    experts' weights (:func:`moe_jax.dispatch.gather_dispatch`) instead of running all E.
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
    few = (self.layout.num_devices == 1
           and num_tokens * self.cfg.top_k < self.cfg.num_experts)
    return self(x, deterministic=True, token_mask=token_mask, group_size=size,
                capacity=size, dispatcher=gather_dispatch if few else None)[0]
