"""The configuration of a sparse MoE layer (:class:`MoeConfig`) and its checks.

:class:`MoeConfig` owns the MoE keys and their defaults: the LM config's ``moe``
section is built from its fields (:func:`moe_jax.training.config.default_config`), and
the MoeConfig of a run is derived back from that section
(:func:`moe_jax.training.sections.derive`), so a new field here is a new LM key with no
other edit.

``validate_moe_config(cfg)`` returns every problem as a one-line message naming the
value and the fix; :class:`~moe_jax.layers.moe_layer.MoeLayer` raises them before
anything is traced.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp

from moe_jax import routing
from moe_jax.layers.dispatch import DISPATCHERS
from moe_jax.layers.dropless import BUFFER_FACTOR, EXCHANGES
from moe_jax.layers.experts import ACTIVATIONS
from moe_jax.layers.grouped_matmul import CHOICES as GROUPED_MATMUL_CHOICES
from moe_jax.layers.router_families import ROUTER_OPTIONS, ROUTERS, routed_experts

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
      and never enter a loss or a metric. On a mesh (see
      :mod:`moe_jax.parallel.sharding`) each group must come from one device's slice of
      the batch: B*L must be a multiple of S and G = B*L / S a multiple of the
      data-parallel device count D = data*expert, i.e. S must divide the B*L / D tokens
      of a device. The grouping never depends on the mesh, so a sharded run routes
      exactly like a single-device one.
    min_capacity: lower bound on C.
    second_policy, second_threshold, normalize_gates, batch_priority: see
      :func:`moe_jax.routing.route`.
    queue_order: how the choices of token-choice routers queue for the capacity,
      ``"choice_major"`` (every first choice of a group before any second one;
      GShard) or ``"token_major"`` (each token's choices together, in position order;
      MaxText). With ``top_k > 1`` and a capacity that can drop, only
      ``"token_major"`` is causal (:func:`moe_jax.layers.router_families.causality`);
      the LM config's ``moe.queue_order="auto"`` picks it for causal LMs. Expert choice
      has no such queue and ignores it.
    jitter_noise: eps of the multiplicative U[1-eps, 1+eps] jitter on router inputs,
      training only (Switch uses 0.01 in some setups; default off).
    expert_dropout: dropout rate on the experts' hidden layer, training only.
    activation: "relu" | "gelu" | "swiglu".
    model_init_scale: the model-wide variance scale s of every weight's
      truncated-normal fan-in init (variance ``s / fan_in``; the LM's
      ``model.init_scale``; the Switch recipe is 0.1).
    init_scale: the experts' scale as a factor on ``model_init_scale`` (the LM's
      ``moe.init_scale``): their variance is ``model_init_scale * init_scale /
      fan_in``; 1.0 gives them a dense FFN's init.
    router_init_scale: the same factor for the router's kernel (the LM's
      ``moe.router_init_scale``). It sets the spread of the router logits, and so
      the router's confidence, at init.
    dtype: compute dtype of dispatch and experts; the router is always float32.
    dispatch: "einsum" | "indices" | "dropless" | "auto". "auto" picks, per backend,
      the capacity-based path that measured faster (docs/benchmarks.md): "indices" on
      CPU and GPU, "einsum" on TPU, where the one-hot matmuls run on the MXU.
      "dropless" ignores ``capacity_factor``, ``eval_capacity_factor`` and
      ``min_capacity`` (no token is dropped for capacity; the second-expert policy
      still applies), and its ``expert_fill`` metric counts kept choices per ``S``
      tokens of a group. It runs on one device and on any mesh (per-device sort and
      all-to-all of the routed rows, :mod:`moe_jax.layers.dropless`).
    ragged_exchange: dropless on a mesh: how rows move between the expert shards.
      "ragged" (``jax.lax.ragged_all_to_all``, only the routed rows; GPU and TPU),
      "padded" (``all_to_all`` of the static buffers; every backend) or "auto"
      ("ragged" on GPU and TPU, "padded" elsewhere). Both give the same numbers.
    ragged_buffer_factor: dropless on a mesh: the static rows a device may send to
      each expert shard, f > 0 times the balanced share ``T*K/X`` (MaxText's
      convention; default 2, :data:`moe_jax.layers.dropless.BUFFER_FACTOR`); rows past
      it are dropped and counted in ``dropped_fraction``. -1 is the worst case
      ``T*min(K, E_l)`` (nothing is dropped, ``X*min(K, E_l)/K`` times the balanced
      buffer). No effect on one device or when the experts are not split.
    grouped_matmul: dropless: how the experts multiply their sorted rows
      (:mod:`moe_jax.layers.grouped_matmul`): "megablox" (the Pallas TPU grouped
      kernels; interpret mode elsewhere), "tiled" (each expert's rows padded to whole
      tiles, one batched matmul), "ragged_dot" (``jax.lax.ragged_dot``; a dense masked
      matmul over all E experts on GPU and CPU and in its weight gradient on TPU) or
      "auto" ("megablox" on TPU, "tiled" on GPU and CPU, from compiled costs). The
      same products up to float rounding (expert dropout draws its masks in each
      one's layout).
    router: the router family, a key of :data:`moe_jax.layers.router_families.ROUTERS`:
      "topk" (Switch, GShard, Mixtral, DeepSeek), "noisy_topk" (Shazeer et al. 2017) or
      "expert_choice" (Zhou et al. 2022; each expert takes ``C = ceil(cf * S / E)``
      tokens, so a token visits ``capacity_factor`` experts on average; not causal).
    score_fn, expert_groups, top_groups, gate_scale, balance_choices: "topk" only; see
      :func:`moe_jax.routing.route` ("sigmoid" scores, DeepSeek-V2/V3 group-limited
      routing, DeepSeek's ``routed_scaling_factor``, and which choices the balance loss
      counts: "first" is Switch, "all" Mixtral and DeepSeek).
    bias_update_rate: "topk" only. When > 0 the layer holds a float32 selection bias
      ``[E]`` (:class:`~moe_jax.layers.router_families.SelectionBias`, not a parameter)
      that routing adds to the scores for the choice of experts, and that the training
      step moves by this rate towards balance (DeepSeek-V3's auxiliary-loss-free
      balancing, :func:`moe_jax.routing.update_selection_bias`). 0 is off.
    num_shared_experts: DeepSeek-MoE shared experts: a dense FFN of width
      ``num_shared_experts * d_ff`` with the experts' activation that every token
      passes; its output is added to the routed output. 0 is none.
    shared_expert_gate: the shared experts' output is scaled per token by
      ``sigmoid(x . w)`` with a learned ``w [M]`` before it is added (Qwen2-MoE's
      ``shared_expert_gate``); needs ``num_shared_experts > 0``.
    noise_anneal_steps: "noisy_topk" only: the gating noise is scaled by
      ``max(0, 1 - step / noise_anneal_steps)``, with ``step`` the training step the
      layer's :class:`~moe_jax.layers.router_families.TrainingStep` holds. 0 is off
      (constant noise).
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
    balance_scope: where the balance loss counts its statistics: "group" (per routing
      group of ``group_size`` tokens, then averaged over groups) or "batch" (once over
      every valid token of the global batch, all groups and all data-parallel
      devices: ``f_e`` and ``P_e`` of "topk", importance and load of "noisy_topk";
      :func:`moe_jax.routing.pool_groups`). The value is the same on every mesh. None
      takes the family's default
      (:attr:`moe_jax.layers.router_families.RouterFamily.balance_scope`): "group" for
      "topk", "batch" for "noisy_topk" (Shazeer et al. 2017). Token-choice routers only.
  """

  d_model: int
  d_ff: int
  num_experts: int
  top_k: int = 1
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  group_size: int = 0
  min_capacity: int = 4
  second_policy: str = "all"
  second_threshold: float = 0.2
  normalize_gates: bool = True
  batch_priority: bool = False
  queue_order: str = "choice_major"
  jitter_noise: float = 0.0
  expert_dropout: float = 0.0
  activation: str = "relu"
  model_init_scale: float = 1.0
  init_scale: float = 1.0
  router_init_scale: float = 1.0
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
  shared_expert_gate: bool = False
  noise_anneal_steps: int = 0
  ragged_exchange: str = "auto"
  ragged_buffer_factor: float = BUFFER_FACTOR
  grouped_matmul: str = "auto"
  noop_experts: int = 0
  noop_capacity_factor: float | None = None
  balance_scope: str | None = None

  def __post_init__(self):
    for msg in validate_moe_config(self):
      raise ValueError(msg)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def routed_experts(self) -> int:
    """E + N: the experts the router chooses among (no-op experts included)."""
    return routed_experts(self)


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
  for name in ("model_init_scale", "init_scale", "router_init_scale"):
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
  """The keys of the dropless path across devices (:mod:`moe_jax.layers.dropless`)."""
  errors = []
  exchange = getattr(cfg, "ragged_exchange", "auto")
  factor = getattr(cfg, "ragged_buffer_factor", BUFFER_FACTOR)
  matmul = getattr(cfg, "grouped_matmul", "auto")
  if exchange not in EXCHANGES:
    errors.append(f"ragged_exchange={exchange!r} is unknown; use one of "
                  f"{', '.join(EXCHANGES)}.")
  if matmul not in GROUPED_MATMUL_CHOICES:
    errors.append(f"grouped_matmul={matmul!r} is unknown; use one of "
                  f"{', '.join(GROUPED_MATMUL_CHOICES)}.")
  if not (_is_real(factor) and (factor == -1 or factor > 0)):
    errors.append(f"ragged_buffer_factor={factor!r} must be -1 (worst-case buffers, "
                  "nothing dropped) or a finite number > 0 (times the balanced share).")
  if cfg.dispatch in DISPATCHERS and cfg.dispatch != "dropless":
    for name, value, default in (("ragged_exchange", exchange, "auto"),
                                 ("ragged_buffer_factor", factor, BUFFER_FACTOR),
                                 ("grouped_matmul", matmul, "auto")):
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
  queue_order = getattr(cfg, "queue_order", "choice_major")
  if queue_order not in routing.QUEUE_ORDERS:
    errors.append(f"queue_order={queue_order!r} is unknown; use one of "
                  f"{', '.join(routing.QUEUE_ORDERS)}.")
  if cfg.balance_choices not in routing.BALANCE_CHOICES:
    errors.append(f"balance_choices={cfg.balance_choices!r} is unknown; use 'first' "
                  "(Switch) or 'all' (Mixtral, DeepSeek).")
  scope = getattr(cfg, "balance_scope", None)
  if scope is not None and scope not in routing.BALANCE_SCOPES:
    errors.append(f"balance_scope={scope!r} is unknown; use 'group' (per routing "
                  "group), 'batch' (over the whole global batch) or None (the router's "
                  "default).")
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
  gate = getattr(cfg, "shared_expert_gate", False)
  if gate is not True and gate is not False:
    errors.append(f"shared_expert_gate={gate!r} must be True or False.")
  elif gate and not (_is_int(cfg.num_shared_experts) and cfg.num_shared_experts > 0):
    errors.append(f"shared_expert_gate=True gates the shared experts, but "
                  f"num_shared_experts={cfg.num_shared_experts!r}; set "
                  "num_shared_experts >= 1 or shared_expert_gate=False.")
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
  if not family.router_kernel and cfg.jitter_noise:
    errors.append(f"jitter_noise={cfg.jitter_noise!r} has no effect with "
                  f"router={cfg.router!r}, which has no router to jitter; leave it at "
                  "0.0.")
  if cfg.dispatch == "dropless" and not family.dropless:
    errors.append(f"dispatch='dropless' needs a capacity-free router, but "
                  f"router={cfg.router!r} picks a fixed number of tokens per expert; use "
                  "dispatch='indices' or 'einsum'.")
  return errors
