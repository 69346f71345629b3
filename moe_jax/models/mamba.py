"""Mamba-1 mixer (Gu & Dao 2023) with Jamba's RMSNorms on dt, B and C (Lieber et al. 2024).

``y = MambaMixer(cfg, rngs=rngs)(x)`` maps ``[B, L, M] -> [B, L, M]``. Shapes use the
project legend plus:

| letter | meaning |
|---|---|
| D_in | ``d_inner = expand * M``, the mixer's channel width (``D`` in einsum strings) |
| N | ``d_state``, SSM state size per channel |
| R | ``dt_rank``, width of the low-rank dt projection |
| K | ``d_conv``, causal depthwise convolution width |
| T | ``chunk_size``, tokens per chunk of the training scan |

Per token, in the order computed (docs/mamba.md has the equations)::

    x, z   = split(in_proj(u))                      # [B, L, D_in] each
    x      = silu(causal_depthwise_conv(x) + bias)  # K taps per channel
    dt, b, c = split(x_proj(x))                     # R, N, N
    dt, b, c = rms(dt), rms(b), rms(c)              # Jamba only (cfg.inner_norms)
    dt     = softplus(dt_proj(dt) + dt_bias)        # [B, L, D_in]
    h_t    = exp(dt*A) h_{t-1} + dt*b*x             # [B, D_in, N], A = -exp(A_log)
    y      = c . h_t + D*x
    out    = out_proj(y * silu(z))

The scans give the same numbers (tested):

* :func:`selective_scan` (training, prefill): chunks of T tokens go one after another
  through ``lax.scan``, which carries the state; inside a chunk the recurrence is
  solved by ``mamba.scan``: ``"associative"`` runs ``jax.lax.associative_scan`` in
  parallel over the chunk's ``[B, T, D_in, N]`` tensors (the accelerator default),
  ``"sequential"`` runs :func:`selective_step` token by token (the CPU default: 7x
  faster there at T=16, docs/mamba.md). The chunk body is rematerialised in the
  backward pass, so memory is ``O(B*T*D_in*N)`` plus the ``[B, D_in, N]`` carries,
  not ``O(B*L*D_in*N)``.
* :func:`selective_step` (decoding): one token against a :class:`MambaState` holding
  the last ``K-1`` conv inputs ``[B, K-1, D_in]`` and the SSM state ``f32[B, D_in, N]``.

Parameters are float32 (``param_dtype``); projections and the conv run in the compute
``dtype``; dt, ``exp(dt*A)``, the scan and its state stay in float32 (float64 if the
compute dtype is float64), as Mamba's reference scan keeps its state in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.parallel.backend import is_accelerator
from moe_jax.layers.experts import scaled_init
from moe_jax.layers.protocols import Flops

# Logical axis names (sharding.py's rules). The mixer's weights are replicated, or
# data-parallel with the batch: only M is named; D_in, N, R and K are left unsharded.
MAMBA_AXES = {
    "in_proj": ("embed", None), "conv_kernel": (None, None), "conv_bias": (None,),
    "x_proj": (None, None), "dt_proj": (None, None), "dt_bias": (None,),
    "A_log": (None, None), "D": (None,), "out_proj": (None, "embed"),
    "dt_norm": ("norm",), "b_norm": ("norm",), "c_norm": ("norm",),
}
# Mamba excludes these from weight decay (its `_no_weight_decay` attribute).
NO_WEIGHT_DECAY = ("A_log", "D")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Hyper-parameters of one Mamba mixer (defaults: Mamba-1 and Jamba).

  Its fields are the LM config's ``mamba`` keys and their defaults (``d_model`` and
  ``init_scale`` are the model's; :func:`moe_jax.training.config.default_config`).

  Attributes:
    d_model: M.
    d_state: N (16).
    d_conv: K, causal conv width (4).
    expand: ``d_inner = expand * d_model`` (2).
    dt_rank: R; None means ``ceil(d_model / 16)`` (Mamba's "auto"). Read the value
      in use from :attr:`rank` (left unresolved here, so ``dataclasses.replace`` with
      a new ``d_model`` still gets the automatic rank).
    dt_min, dt_max: range of the log-uniform dt drawn at init (1e-3, 1e-1).
    dt_init_floor: lower clip of that dt (1e-4; inert while ``dt_min`` is above it).
    inner_norms: Jamba's RMSNorm on dt, B and C after ``x_proj`` (default on; off is
      plain Mamba-1).
    norm_eps: epsilon of those RMSNorms (Jamba: 1e-6).
    chunk_size: T, tokens per chunk of the training scan. A sequence that is not a
      multiple of T is padded with identity steps (dt = 0) and cut back.
    scan: how a chunk is solved: ``"associative"``, ``"sequential"`` or ``"auto"``
      (:func:`resolve_scan`: associative on GPU and TPU, sequential on CPU). The
      numbers agree up to float rounding.
    init_scale: fan-in variance scale of ``in_proj``, ``x_proj`` and ``out_proj``
      (the project's truncated-normal init).
  """

  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  inner_norms: bool = True
  norm_eps: float = 1e-6
  chunk_size: int = 16
  scan: str = "auto"
  init_scale: float = 1.0

  def __post_init__(self):
    for msg in validate_mamba_config(self):
      raise ValueError(msg)

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    """R, the dt rank in use: ``dt_rank``, or ``ceil(d_model / 16)`` when None."""
    return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank


def validate_mamba_config(cfg) -> list[str]:
  """Every problem with ``cfg`` as one sentence naming the key and the fix.

  ``cfg`` may be a :class:`MambaConfig` or any object with the same attributes (an
  ``ml_collections.ConfigDict``), so experiment configs are checked before tracing.
  """
  errors = []
  for name in ("d_model", "d_state", "d_conv", "expand", "chunk_size"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      errors.append(f"{name}={v!r} must be a positive integer.")
  r = cfg.dt_rank
  if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
    errors.append(f"dt_rank={r!r} must be a positive integer, or None for "
                  "ceil(d_model / 16).")
  if not (_positive(cfg.dt_min) and _positive(cfg.dt_max) and cfg.dt_min <= cfg.dt_max):
    errors.append(f"dt_min={cfg.dt_min!r}, dt_max={cfg.dt_max!r} need "
                  "0 < dt_min <= dt_max (Mamba: 1e-3 and 1e-1).")
  if not _positive(cfg.dt_init_floor):
    errors.append(f"dt_init_floor={cfg.dt_init_floor!r} must be > 0 (Mamba: 1e-4).")
  if not _positive(cfg.norm_eps):
    errors.append(f"norm_eps={cfg.norm_eps!r} must be > 0 (Jamba: 1e-6).")
  if not _positive(cfg.init_scale):
    errors.append(f"init_scale={cfg.init_scale!r} must be > 0.")
  if cfg.scan not in SCAN_CHOICES:
    errors.append(f"scan={cfg.scan!r} is not one of {', '.join(SCAN_CHOICES)} "
                  "(auto: associative on GPU and TPU, sequential on CPU).")
  return errors


def _positive(v) -> bool:
  """A finite real number > 0 (not a bool, not a string)."""
  return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
          and v > 0)


@flax.struct.dataclass
class MambaState:
  """Decode state of one mixer.

  Attributes:
    conv: [B, K-1, D_in] the last K-1 conv inputs, oldest first (zeros at the start),
      in the compute dtype.
    ssm: f32[B, D_in, N] the SSM state h after the last token.
  """

  conv: jax.Array
  ssm: jax.Array


# ---------------------------------------------------------------------------------
# The two scans: pure functions of the discretisation inputs.
# ---------------------------------------------------------------------------------


# The scan's products and its contraction over N stay float32 on every backend (no
# bf16/TF32 passes), so the state accumulates in float32 as Mamba's reference does.
_EXACT = jax.lax.Precision.HIGHEST


def _combine(earlier, later):
  # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2.
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def _associative_chunk(h, a, dt, b, c, x):
  """One chunk in parallel: ``jax.lax.associative_scan`` over its T tokens.

  h: [B, D_in, N] state before the chunk; a: [D_in, N]; dt, x: [B, T, D_in];
  b, c: [B, T, N]. Returns (state after the chunk, y [B, T, D_in]).
  """
  da = jnp.exp(jnp.einsum("BTD,DN->BTDN", dt, a, precision=_EXACT))
  dbx = jnp.einsum("BTD,BTN->BTDN", dt * x, b, precision=_EXACT)
  # Every token's state as an affine map of the chunk's initial state h.
  a_cum, b_cum = jax.lax.associative_scan(_combine, (da, dbx), axis=1)
  hs = a_cum * h[:, None] + b_cum  # [B, T, D_in, N]
  return hs[:, -1], jnp.einsum("BTDN,BTN->BTD", hs, c, precision=_EXACT)


def _sequential_chunk(h, a, dt, b, c, x):
  """One chunk token by token: ``lax.scan`` of :func:`selective_step` over its T
  tokens. Same arguments and results as :func:`_associative_chunk`; no
  ``[B, T, D_in, N]`` tensor is formed in the forward pass."""
  def step(h, inputs):
    dt_t, b_t, c_t, x_t = inputs
    y, h = selective_step(dt_t, a, b_t, c_t, x_t, h)
    return h, y

  h, ys = jax.lax.scan(step, h, tuple(v.swapaxes(0, 1) for v in (dt, b, c, x)))
  return h, ys.swapaxes(0, 1)


# The training scans (``mamba.scan``): the same recurrence, the same chunks, the same
# numbers up to float rounding (tested). "associative" is the parallel form for
# accelerators; "sequential" does the sequential FLOP count and, measured on a 2-core
# CPU (docs/mamba.md), runs the forward and backward pass of jamba_small's scan 2.4x
# (T=4) to 15x (T=64) faster there, 7x at the default T=16.
SCANS = {"associative": _associative_chunk, "sequential": _sequential_chunk}
SCAN_CHOICES = ("auto", *SCANS)


def resolve_scan(name: str, backend: str | None = None) -> str:
  """The scan ``name`` stands for on ``backend`` (default: jax's): ``"auto"`` is
  ``"associative"`` on GPU and TPU and ``"sequential"`` elsewhere."""
  if name != "auto":
    return name
  return "associative" if is_accelerator(backend) else "sequential"


# Jitted so that eager callers (notebooks, op-by-op tests) compile the chunk loop once
# per shape instead of on every call; inside a jitted step it is inlined.
@functools.partial(jax.jit, static_argnames=("chunk_size", "scan"))
def selective_scan(dt: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array,
                   x: jax.Array, *, chunk_size: int, h0: jax.Array | None = None,
                   scan: str = "associative") -> tuple[jax.Array, jax.Array]:
  """``h_t = exp(dt_t*A) h_{t-1} + dt_t*b_t*x_t``, ``y_t = c_t . h_t`` over L tokens.

  Chunks of ``chunk_size`` tokens run in order under ``lax.scan`` (carrying h); inside
  a chunk the ``scan`` of :data:`SCANS` runs the recurrence: ``"associative"`` in
  parallel with ``jax.lax.associative_scan``, ``"sequential"`` token by token. The
  chunk body is rematerialised for the backward pass, so at most one chunk's
  f32[B, T, D_in, N] tensors are alive. A token with ``dt == 0`` is an identity step
  (``exp(0) = 1`` and no input), which is how L is padded to a multiple of T, and how
  callers mask tokens.

  Args:
    dt: [B, L, D_in] step sizes (after softplus).
    a: [D_in, N] the negative real A.
    b, c: [B, L, N] input and output matrices.
    x: [B, L, D_in] inputs.
    chunk_size: T; ``min(T, L)`` is used.
    h0: [B, D_in, N] initial state; zeros if None.
    scan: a key of :data:`SCANS` or ``"auto"`` (:func:`resolve_scan`).

  Returns:
    (y [B, L, D_in] without the D skip, h_L [B, D_in, N]), in the accumulation dtype
    ``promote_types(dt.dtype, float32)``.
  """
  chunk_fn = SCANS[resolve_scan(scan)]
  acc = jnp.promote_types(dt.dtype, jnp.float32)
  dt, a, b, c, x = (v.astype(acc) for v in (dt, a, b, c, x))
  batch, length, d_inner = x.shape
  n = a.shape[-1]
  h0 = jnp.zeros((batch, d_inner, n), acc) if h0 is None else h0.astype(acc)
  if length == 0:
    return jnp.zeros((batch, 0, d_inner), acc), h0
  t = min(chunk_size, length)
  num_chunks = -(-length // t)
  pad = num_chunks * t - length

  def chunks(v):  # [B, L, F] -> [num_chunks, B, T, F], padded with zeros
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0)))
    return v.reshape(batch, num_chunks, t, v.shape[-1]).swapaxes(0, 1)

  @jax.checkpoint
  def body(h, inputs):
    dt_c, b_c, c_c, x_c = inputs
    return chunk_fn(h, a, dt_c, b_c, c_c, x_c)

  h_last, ys = jax.lax.scan(body, h0, tuple(chunks(v) for v in (dt, b, c, x)))
  y = ys.swapaxes(0, 1).reshape(batch, num_chunks * t, d_inner)[:, :length]
  return y, h_last


def selective_step(dt: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array,
                   x: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One token of the recurrence: ``h' = exp(dt*A) h + dt*b*x``, ``y = c . h'``.

  Args:
    dt, x: [B, D_in]; a: [D_in, N]; b, c: [B, N]; h: [B, D_in, N].

  Returns:
    (y [B, D_in] without the D skip, h' [B, D_in, N]) in the accumulation dtype.
  """
  acc = jnp.promote_types(h.dtype, jnp.float32)
  dt, a, b, c, x, h = (v.astype(acc) for v in (dt, a, b, c, x, h))
  h = jnp.exp(dt[:, :, None] * a) * h + (dt * x)[:, :, None] * b[:, None, :]
  return jnp.einsum("BDN,BN->BD", h, c, precision=_EXACT), h


# ---------------------------------------------------------------------------------
# The mixer.
# ---------------------------------------------------------------------------------


def _param(value: jax.Array, name: str) -> nnx.Param:
  return nnx.Param(value, logical_axes=MAMBA_AXES[name])


def dt_bias_init(key: jax.Array, cfg: MambaConfig, dtype=jnp.float32) -> jax.Array:
  """Mamba's dt bias: ``softplus(bias)`` is log-uniform in ``[dt_min, dt_max]``.

  dt is drawn log-uniformly, clipped below at ``dt_init_floor``, and inverted through
  softplus: ``bias = dt + log(-expm1(-dt))``, i.e. ``log(exp(dt) - 1)``.
  """
  u = jax.random.uniform(key, (cfg.d_inner,), jnp.float32)
  lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
  dt = jnp.maximum(jnp.exp(lo + u * (hi - lo)), cfg.dt_init_floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis in float32 (Jamba's), returned in x's dtype."""
  h = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return (h * scale.astype(h.dtype)).astype(x.dtype)


class MambaMixer(nnx.Module):
  """Mamba-1 selective SSM mixer, ``[B, L, M] -> [B, L, M]``.

  * ``mixer(x)``: training forward (the chunked scan of ``cfg.scan``).
  * ``mixer.prefill(x, lengths=, mask=, state=)``: the same outputs and the state after
    each row's last real token.
  * ``mixer.init_state(batch_size)`` and ``mixer.step(x_t, state)``: decoding, one token
    per row.
  * ``mixer.init_cache(batch, max_len, dtype)`` and ``mixer.decode(x, positions, mask)``:
    the same, with the state kept in the module as nnx ``Cache`` variables (the block
    decode interface of :mod:`moe_jax.inference.decode`).
  """

  def __init__(self, cfg: MambaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    m, d, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
    init = scaled_init(cfg.init_scale)
    self.in_proj = _param(init(rngs.params(), (m, 2 * d), param_dtype), "in_proj")
    # PyTorch's Conv1d default, which Mamba keeps: U(+-1/sqrt(fan_in)), fan_in = K.
    bound = 1.0 / math.sqrt(k)
    self.conv_kernel = _param(jax.random.uniform(
        rngs.params(), (k, d), param_dtype, -bound, bound), "conv_kernel")
    self.conv_bias = _param(jax.random.uniform(
        rngs.params(), (d,), param_dtype, -bound, bound), "conv_bias")
    self.x_proj = _param(init(rngs.params(), (d, r + 2 * n), param_dtype), "x_proj")
    if cfg.inner_norms:
      self.dt_norm = _param(jnp.ones((r,), param_dtype), "dt_norm")
      self.b_norm = _param(jnp.ones((n,), param_dtype), "b_norm")
      self.c_norm = _param(jnp.ones((n,), param_dtype), "c_norm")
    else:
      self.dt_norm = self.b_norm = self.c_norm = None
    # Mamba: dt_proj weight U(+-R^-0.5) keeps dt_proj(dt)'s variance near that of dt.
    std = r ** -0.5
    self.dt_proj = _param(jax.random.uniform(
        rngs.params(), (r, d), param_dtype, -std, std), "dt_proj")
    self.dt_bias = _param(dt_bias_init(rngs.params(), cfg, param_dtype), "dt_bias")
    # S4D-Real: A = -(1..N) for every channel.
    self.A_log = _param(jnp.log(jnp.broadcast_to(
        jnp.arange(1, n + 1, dtype=param_dtype), (d, n))), "A_log")
    self.D = _param(jnp.ones((d,), param_dtype), "D")
    self.out_proj = _param(init(rngs.params(), (d, m), param_dtype), "out_proj")

  # -- pieces shared by the sequence and the step paths --------------------------

  def _in(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """u: [..., M] -> (x, z), each [..., D_in] in the compute dtype."""
    xz = jnp.einsum("...M,MD->...D", u.astype(self.dtype),
                    self.in_proj[...].astype(self.dtype))
    return jnp.split(xz, 2, axis=-1)

  def _ssm_inputs(self, x: jax.Array):
    """x: [..., D_in] conv output -> (dt [..., D_in] acc dtype, b, c [..., N])."""
    cfg = self.cfg
    p = jnp.einsum("...D,DP->...P", x, self.x_proj[...].astype(self.dtype))
    dt, b, c = jnp.split(p, [cfg.rank, cfg.rank + cfg.d_state], axis=-1)
    if cfg.inner_norms:  # Jamba (Lieber et al. 2024, Sec. 2): stabilises training.
      dt = rms_norm(dt, self.dt_norm[...], cfg.norm_eps)
      b = rms_norm(b, self.b_norm[...], cfg.norm_eps)
      c = rms_norm(c, self.c_norm[...], cfg.norm_eps)
    acc = jnp.promote_types(self.dtype, jnp.float32)
    dt = jnp.einsum("...R,RD->...D", dt, self.dt_proj[...].astype(self.dtype))
    dt = jax.nn.softplus(dt.astype(acc) + self.dt_bias[...].astype(acc))
    return dt, b, c

  def _a(self) -> jax.Array:
    acc = jnp.promote_types(self.dtype, jnp.float32)
    return -jnp.exp(self.A_log[...].astype(acc))  # [D_in, N]

  def _out(self, y: jax.Array, x: jax.Array, z: jax.Array) -> jax.Array:
    """Adds the D skip, gates with silu(z), projects: [..., D_in] -> [..., M]."""
    y = y + self.D[...].astype(y.dtype) * x.astype(y.dtype)
    y = y.astype(self.dtype) * jax.nn.silu(z)
    return jnp.einsum("...D,DM->...M", y, self.out_proj[...].astype(self.dtype))

  def _conv(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """Causal depthwise conv + SiLU. x: [B, L, D_in]; context: [B, K-1, D_in] the
    inputs before x (zeros at the start) -> [B, L, D_in]."""
    k, length = self.cfg.d_conv, x.shape[1]
    xp = jnp.concatenate([context.astype(self.dtype), x], axis=1)  # [B, K-1+L, D_in]
    w = self.conv_kernel[...].astype(self.dtype)
    # Cross-correlation as PyTorch's Conv1d: tap K-1 multiplies the current token.
    out = sum(xp[:, i:i + length] * w[i] for i in range(k))
    return jax.nn.silu(out + self.conv_bias[...].astype(self.dtype))

  # -- public API ------------------------------------------------------------------

  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               token_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, M] -> [B, L, M] in the compute dtype (the chunked scan).

    ``positions`` and ``token_mask`` are accepted for the Transformer's mixer
    interface and unused: the scan's order is the only position information a Mamba
    layer has, and being causal it keeps trailing padding from real tokens.
    """
    del positions, token_mask
    return self.prefill(x)[0]

  def flops_per_token(self, tokens: int) -> Flops:
    """:func:`mixer_cost`'s ``flops``: nothing grows with the context."""
    del tokens
    return Flops.dense(mixer_cost(self.cfg)["flops"])

  def init_state(self, batch_size: int, dtype=None) -> MambaState:
    """The empty state: zero conv inputs (in ``dtype``, default the compute dtype) and
    a zero SSM state (float32)."""
    cfg = self.cfg
    acc = jnp.promote_types(self.dtype, jnp.float32)
    return MambaState(
        conv=jnp.zeros((batch_size, cfg.d_conv - 1, cfg.d_inner), dtype or self.dtype),
        ssm=jnp.zeros((batch_size, cfg.d_inner, cfg.d_state), acc))

  def prefill(self, x: jax.Array, *, lengths: jax.Array | None = None,
              mask: jax.Array | None = None, state: MambaState | None = None
              ) -> tuple[jax.Array, MambaState]:
    """Runs a (padded) batch from ``state`` and returns the state after it.

    Args:
      x: [B, L, M].
      lengths: i32[B], right padding: row b's real tokens are ``x[b, :lengths[b]]``.
      mask: bool[B, L], True on real tokens, anywhere in the row (left padding,
        right padding or gaps): the real tokens of a row are run in order as if the
        others were absent. At most one of ``lengths`` and ``mask``.
      state: the state before x (continuing a sequence); empty if None.

    Returns:
      (y [B, L, M], the state after each row's last real token). y is zero on
      padding; a row with no real token keeps its state.
    """
    if lengths is not None and mask is not None:
      raise ValueError("prefill takes lengths (right padding) or mask, not both.")
    if mask is not None:
      # Move each row's real tokens to the front, in order, run them right-padded,
      # and put the outputs back where they came from.
      order = jnp.argsort(~mask, axis=1, stable=True)  # [B, L]
      packed = jnp.take_along_axis(x, order[:, :, None], axis=1)
      y, state = self.prefill(packed, lengths=mask.sum(axis=1), state=state)
      inverse = jnp.argsort(order, axis=1)
      return jnp.take_along_axis(y, inverse[:, :, None], axis=1), state
    batch, length, _ = x.shape
    cfg = self.cfg
    if state is None:
      state = self.init_state(batch)
    if lengths is None:
      lengths = jnp.full((batch,), length, jnp.int32)
    valid = jnp.arange(length)[None, :] < lengths[:, None]  # [B, L]
    xs, z = self._in(x)
    xs = jnp.where(valid[:, :, None], xs, 0)
    xc = self._conv(xs, state.conv)
    dt, b, c = self._ssm_inputs(xc)
    dt = jnp.where(valid[:, :, None], dt, 0)  # padding: identity steps
    y, h = selective_scan(dt, self._a(), b, c, xc, chunk_size=cfg.chunk_size,
                          h0=state.ssm, scan=cfg.scan)
    out = self._out(y, xc, z) * valid[:, :, None]
    # The conv state is the K-1 inputs ending at the last real token.
    history = jnp.concatenate([state.conv.astype(xs.dtype), xs], axis=1)
    idx = lengths[:, None] + jnp.arange(cfg.d_conv - 1)[None, :]  # [B, K-1]
    conv = jnp.take_along_axis(history, idx[:, :, None], axis=1)
    return out, MambaState(conv=conv.astype(state.conv.dtype), ssm=h)

  # -- the decode interface of moe_jax.inference.decode (the state as nnx Cache variables)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    """The empty decode state of ``batch`` rows: ``conv_state`` [B, K-1, D_in] in
    ``dtype`` and ``ssm_state`` f32[B, D_in, N]. Fixed size: ``max_len`` is unused."""
    del max_len
    state = self.init_state(batch, dtype)
    self.conv_state = nnx.Cache(state.conv)
    self.ssm_state = nnx.Cache(state.ssm)

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Runs new tokens from the cached state and stores the state after them.

    x: [B, L, M] (L = the prefill length, or 1 at a step); positions i32[B, L] are
    unused; mask bool[B, L] is False on padding, which leaves the state as it was.
    One token goes through :meth:`step`, more through :meth:`prefill` (same numbers).
    Returns [B, L, M], zero on padding.
    """
    del positions
    if not hasattr(self, "conv_state"):
      raise ValueError("MambaMixer.decode needs init_cache(batch, max_len, dtype) first.")
    state = MambaState(conv=self.conv_state.get_value(), ssm=self.ssm_state.get_value())
    if x.shape[1] == 1:
      y, state = self.step(x[:, 0], state, mask=mask[:, 0])
      y = y[:, None]
    else:
      y, state = self.prefill(x, mask=mask, state=state)
    self.conv_state.set_value(state.conv)
    self.ssm_state.set_value(state.ssm)
    return y

  def step(self, x_t: jax.Array, state: MambaState, *,
           mask: jax.Array | None = None) -> tuple[jax.Array, MambaState]:
    """One token per row: x_t [B, M] -> (y_t [B, M], the state after it).

    ``mask`` bool[B]: rows with False keep their state (and get y_t = 0).
    """
    x, z = self._in(x_t)  # [B, D_in]
    window = jnp.concatenate([state.conv.astype(x.dtype), x[:, None]], axis=1)
    xc = self._conv(window[:, -1:], window[:, :-1])[:, 0]
    dt, b, c = self._ssm_inputs(xc)
    y, h = selective_step(dt, self._a(), b, c, xc, state.ssm)
    out = self._out(y, xc, z)
    new = MambaState(conv=window[:, 1:].astype(state.conv.dtype),
                     ssm=h.astype(state.ssm.dtype))
    if mask is not None:
      new = jax.tree.map(
          lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
          new, state)
      out = out * mask[:, None]
    return out, new


# ---------------------------------------------------------------------------------
# Size and cost.
# ---------------------------------------------------------------------------------


def mixer_cost(cfg: MambaConfig) -> dict[str, int]:
  """Parameters and forward FLOPs per token of one mixer (2 FLOPs per multiply-add).

  With M, D_in, N, R, K as in the module docstring and ``norms = R + 2N`` if
  ``inner_norms`` else 0::

      params = M*2D_in                 in_proj
             + K*D_in + D_in           conv kernel and bias
             + D_in*(R + 2N)           x_proj
             + R*D_in + D_in           dt_proj and dt_bias
             + D_in*N + D_in           A_log, D
             + norms                   Jamba's RMSNorm scales
             + D_in*M                  out_proj

      matmul_flops = 2 * (M*2D_in + K*D_in + D_in*(R + 2N) + R*D_in + D_in*M)
      scan_flops   = 6 * D_in * N

  ``matmul_flops`` is 2 x the weights that multiply activations (the projections and
  the conv taps), the convention of ``sizes.flops_per_token``. ``scan_flops``
  counts the recurrence per state element: ``dt*A`` (1), ``(dt*x)*b`` (1),
  ``dA*h + dBx`` (2) and ``c . h`` (2). Biases, norms, the D skip, exp/softplus/SiLU
  and the gate are not counted (O(D_in) per token). The associative scan does more
  work than this sequential count (about twice the ``dA*h + dBx`` combines); the count
  is the algorithm's, as for attention. There is no term in L: the cost per token does
  not grow with the context.

  Returns:
    ``{"params", "flops" (= matmul_flops + scan_flops), "matmul_flops", "scan_flops"}``.
  """
  m, d, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
  weights = m * 2 * d + k * d + d * (r + 2 * n) + r * d + d * m
  norms = (r + 2 * n) if cfg.inner_norms else 0
  params = weights + d + d + d * n + d + norms  # + conv_bias, dt_bias, A_log, D
  matmul = 2 * weights
  scan = 6 * d * n
  return {"params": params, "flops": matmul + scan, "matmul_flops": matmul,
          "scan_flops": scan}
