"""Mamba mixer: both chunked scans == lax.scan loop == step decoding, causality,
gradients, init, prefill states of padded rows, and the parameter/FLOP count."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.models import mamba
from moe_jax.models.mamba import MambaConfig, MambaMixer, MambaState
from tests.reference import mamba_loop

# Tiny: M=8 -> D_in=16, N=4, R=ceil(8/16)=1, K=4.
TINY = dict(d_model=8, d_state=4, d_conv=4, expand=2)
PARAM_NAMES = ("in_proj", "conv_kernel", "conv_bias", "x_proj", "dt_norm", "b_norm",
               "c_norm", "dt_proj", "dt_bias", "A_log", "D", "out_proj")


def make(seed=0, *, perturb=False, dtype=jnp.float32, param_dtype=jnp.float32, **kw):
  cfg = MambaConfig(**{**TINY, **kw})
  mixer = MambaMixer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
  if perturb:
    # Move every parameter off its init (norm scales != 1, larger dt so that exp(dt*A)
    # decays fast, D != 1), so the comparisons exercise every term.
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(PARAM_NAMES)))
    for name in PARAM_NAMES:
      var = getattr(mixer, name)
      if var is None:
        continue
      noise = 0.3 * jax.random.normal(next(keys), var[...].shape, var[...].dtype)
      var[...] = var[...] + noise + (1.5 if name == "dt_bias" else 0.0)
  return mixer


def params_of(mixer):
  return {n: getattr(mixer, n)[...] for n in PARAM_NAMES if getattr(mixer, n) is not None}


def reference(mixer, x):
  cfg = mixer.cfg
  return mamba_loop(params_of(mixer), x, d_state=cfg.d_state, dt_rank=cfg.rank,
                    d_conv=cfg.d_conv, inner_norms=cfg.inner_norms, eps=cfg.norm_eps)


def decode(mixer, x, state=None):
  """Step by step over x [B, L, M] -> (y [B, L, M], final state)."""
  state = mixer.init_state(x.shape[0]) if state is None else state
  ys = []
  for t in range(x.shape[1]):
    y, state = mixer.step(x[:, t], state)
    ys.append(y)
  return jnp.stack(ys, axis=1), state


def inputs(seed, batch=2, length=12, d_model=8, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (batch, length, d_model), dtype)


# ---------------------------------------------------------------------------------
# Init.
# ---------------------------------------------------------------------------------


def test_init_values():
  cfg = MambaConfig(d_model=40, d_state=16, expand=4)  # D_in = 160
  assert cfg.rank == 3 and cfg.dt_rank is None  # ceil(40 / 16)
  m = MambaMixer(cfg, rngs=nnx.Rngs(0))
  a_log = np.asarray(m.A_log[...])
  assert a_log.shape == (160, 16)
  np.testing.assert_allclose(a_log, np.log(np.tile(np.arange(1, 17), (160, 1))),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(m.D[...]), np.ones(160))
  dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
  # softplus(bias) is dt itself: within [1e-3, 1e-1] and spread over it log-uniformly
  # (160 draws: P(none below 2e-3) = (1 - log 2 / log 100)^160 < 1e-11).
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
  assert dt.min() < 2e-3 and dt.max() > 5e-2
  # Mamba's dt_proj weight U(+-R^-0.5) and PyTorch's conv default U(+-1/sqrt(K)).
  assert np.abs(np.asarray(m.dt_proj[...])).max() <= 3 ** -0.5
  assert np.abs(np.asarray(m.conv_kernel[...])).max() <= 0.5
  for name in ("dt_norm", "b_norm", "c_norm"):
    np.testing.assert_array_equal(np.asarray(getattr(m, name)[...]), 1.0)
  plain = MambaMixer(MambaConfig(d_model=40, inner_norms=False), rngs=nnx.Rngs(0))
  assert plain.dt_norm is None and plain.b_norm is None and plain.c_norm is None
  assert MambaConfig(d_model=40, dt_rank=5).rank == 5
  assert dataclasses.replace(cfg, d_model=64).rank == 4  # re-derived: ceil(64 / 16)


def test_dt_bias_is_inverse_softplus():
  cfg = MambaConfig(d_model=64, dt_min=1e-2, dt_max=1e-2)  # every dt = 1e-2
  bias = mamba.dt_bias_init(jax.random.key(0), cfg)
  # softplus^-1(0.01) = log(exp(0.01) - 1) = log(0.0100502) = -4.59515
  np.testing.assert_allclose(np.asarray(bias), math.log(math.expm1(0.01)), rtol=1e-5)


@pytest.mark.parametrize("kw, fragment", [
    (dict(d_state=0), "d_state=0"),
    (dict(chunk_size=-1), "chunk_size=-1"),
    (dict(dt_rank=0), "dt_rank=0"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min=0.2"),
    (dict(norm_eps=0.0), "norm_eps=0.0"),
    (dict(scan="parallel"), "scan='parallel' is not one of auto, associative, sequential"),
])
def test_config_errors(kw, fragment):
  with pytest.raises(ValueError, match=fragment):
    MambaConfig(d_model=8, **kw)


# ---------------------------------------------------------------------------------
# The training scans, the step and the loop reference agree.
# ---------------------------------------------------------------------------------

SCANS = ("associative", "sequential")


def test_resolve_scan():
  assert mamba.resolve_scan("auto", "cpu") == "sequential"
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    assert mamba.resolve_scan("auto", backend) == "associative"
  for name in SCANS:
    assert mamba.resolve_scan(name, "cpu") == mamba.resolve_scan(name, "tpu") == name
  assert set(mamba.SCANS) == set(SCANS)


# T=5 and T=64 do not divide L=12 (padded with identity steps; T=64 runs as T=12).
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("chunk_size, perturb", [(1, True), (4, False), (5, True),
                                                 (64, True)])
def test_chunked_scan_equals_loop_and_steps(chunk_size, perturb, scan):
  mixer = make(perturb=perturb, chunk_size=chunk_size, scan=scan)
  x = inputs(1)
  y = mixer(x)
  y_ref, h_ref = reference(mixer, x)
  y_step, state = decode(mixer, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert float(jnp.abs(y_ref).max()) > 1e-2  # not a trivially small output
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(y_step, y_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(state.ssm, h_ref, atol=1e-5, rtol=0)
  _, prefilled = mixer.prefill(x)
  np.testing.assert_allclose(prefilled.ssm, h_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(prefilled.conv, state.conv, atol=1e-6, rtol=0)


def test_without_inner_norms_equals_loop():
  mixer = make(perturb=True, inner_norms=False, chunk_size=5)
  x = inputs(2)
  np.testing.assert_allclose(mixer(x), reference(mixer, x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("chunk_size", [1, 3, 100])  # L=7
def test_selective_scan_equals_steps(chunk_size, scan):
  # The pure functions alone, with a fast-decaying A: dt in (0, 2], A in [-4, -1].
  k = jax.random.split(jax.random.key(3), 6)
  batch, length, d_inner, n = 2, 7, 3, 4
  dt = 2.0 * jax.random.uniform(k[0], (batch, length, d_inner))
  a = -jax.random.uniform(k[1], (d_inner, n), minval=1.0, maxval=4.0)
  b = jax.random.normal(k[2], (batch, length, n))
  c = jax.random.normal(k[3], (batch, length, n))
  x = jax.random.normal(k[4], (batch, length, d_inner))
  h0 = jax.random.normal(k[5], (batch, d_inner, n))
  y, h_last = mamba.selective_scan(dt, a, b, c, x, chunk_size=chunk_size, h0=h0,
                                   scan=scan)
  h, ys = h0, []
  for t in range(length):
    y_t, h = mamba.selective_step(dt[:, t], a, b[:, t], c[:, t], x[:, t], h)
    ys.append(y_t)
  np.testing.assert_allclose(y, jnp.stack(ys, 1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(h_last, h, atol=1e-5, rtol=0)


def test_selective_step_by_hand():
  # One channel, N=2: dt=ln 2, A=(-1,-2) -> exp(dt*A) = (1/2, 1/4); h=(4, 8), x=3,
  # b=(1, -1): h' = (0.5*4 + ln2*3*1, 0.25*8 - ln2*3) = (2 + 3 ln2, 2 - 3 ln2);
  # c=(1, 2): y = 2 + 3 ln2 + 4 - 6 ln2 = 6 - 3 ln2.
  ln2 = math.log(2.0)
  y, h = mamba.selective_step(
      jnp.array([[ln2]]), jnp.array([[-1.0, -2.0]]), jnp.array([[1.0, -1.0]]),
      jnp.array([[1.0, 2.0]]), jnp.array([[3.0]]), jnp.array([[[4.0, 8.0]]]))
  np.testing.assert_allclose(h, [[[2 + 3 * ln2, 2 - 3 * ln2]]], rtol=1e-6)
  np.testing.assert_allclose(y, [[6 - 3 * ln2]], rtol=1e-6)


@pytest.mark.parametrize("scan", SCANS)
def test_chunk_memory_is_bounded(scan):
  # With the chunk body rematerialised, no array in the gradient's program holds the
  # state of more than one chunk: nothing of num_chunks*B*T*D_in*N elements or more.
  mixer = make(chunk_size=4, scan=scan)
  batch, length = 2, 32
  x = inputs(4, batch=batch, length=length)
  graphdef, state = nnx.split(mixer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(state, x)
  full = batch * length * mixer.cfg.d_inner * mixer.cfg.d_state
  chunk = batch * 4 * mixer.cfg.d_inner * mixer.cfg.d_state

  def sizes(jx):  # every array in jx and its sub-programs (scan, checkpoint bodies)
    for eqn in jx.eqns:
      for v in eqn.outvars:
        yield int(np.prod(getattr(v.aval, "shape", ())))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(sub, "eqns"):
            yield from sizes(sub)

  biggest = max(sizes(jaxpr.jaxpr))
  assert chunk <= biggest < full, (biggest, chunk, full)


# ---------------------------------------------------------------------------------
# Causality and gradients.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", SCANS)
def test_causal(scan):
  mixer = make(perturb=True, chunk_size=5, scan=scan)
  x = inputs(5)
  t = 6  # the second token of chunk 1 (tokens 5..9)
  x2 = x.at[:, t].add(1.0)
  y, y2 = mixer(x), mixer(x2)
  np.testing.assert_array_equal(y[:, :t], y2[:, :t])
  assert float(jnp.abs(y[:, t:] - y2[:, t:]).min(axis=-1).max()) > 0
  assert float(jnp.abs(y[:, -1] - y2[:, -1]).max()) > 1e-6  # the change propagates


@pytest.mark.parametrize("scan", SCANS)
def test_gradients_match_finite_differences(scan):
  # float64 central differences along random directions of (params, x): the error of
  # (f(p + eps v) - f(p - eps v)) / 2eps is O(eps^2 f''') ~ 1e-10 at eps = 1e-5, far
  # below the 1e-6 tolerance, while a wrong gradient term is off by O(1).
  with jax.enable_x64(True):
    mixer = make(perturb=True, dtype=jnp.float64, param_dtype=jnp.float64,
                 chunk_size=3, scan=scan)
    graphdef, state = nnx.split(mixer)
    x = inputs(6, length=7, dtype=jnp.float64)
    w = jax.random.normal(jax.random.key(7), x.shape, jnp.float64)

    @jax.jit
    def loss(state, x):
      return jnp.sum(w * nnx.merge(graphdef, state)(x))

    grads = jax.grad(loss, argnums=(0, 1))(state, x)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(g.dtype == jnp.float64 for g in leaves)
    eps = 1e-5
    for seed in range(3):
      keys = iter(jax.random.split(jax.random.key(10 + seed), 64))
      v = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype),
                       (state, x))
      plus = jax.tree.map(lambda p, d: p + eps * d, (state, x), v)
      minus = jax.tree.map(lambda p, d: p - eps * d, (state, x), v)
      numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in
                     zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_gradients_finite_float32():
  mixer = make(perturb=True, chunk_size=5)
  graphdef, state = nnx.split(mixer)
  grads = jax.jit(jax.grad(
      lambda s: jnp.sum(nnx.merge(graphdef, s)(inputs(8)) ** 2)))(state)
  for path, g in jax.tree.leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), path
    assert float(jnp.abs(g).max()) > 0, path  # every parameter gets a gradient


# ---------------------------------------------------------------------------------
# Prefill of padded rows, continuation, step masks, dtypes.
# ---------------------------------------------------------------------------------


def test_prefill_padded_rows():
  mixer = make(perturb=True, chunk_size=4)
  x = inputs(9, batch=3, length=10)
  lengths = jnp.array([10, 5, 1])
  y, state = mixer.prefill(x, lengths=lengths)
  for b, n in enumerate([10, 5, 1]):
    y_row, s_row = decode(mixer, x[b:b + 1, :n])  # the row alone, unpadded
    np.testing.assert_allclose(y[b:b + 1, :n], y_row, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(y[b, n:], 0.0)
    np.testing.assert_allclose(state.ssm[b:b + 1], s_row.ssm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(state.conv[b:b + 1], s_row.conv, atol=1e-6, rtol=0)
  # Row 2 has 1 < K-1 tokens: its conv state is two zeros, then token 0's input.
  np.testing.assert_array_equal(state.conv[2, :2], 0.0)


def test_prefill_then_step_equals_full_forward():
  mixer = make(perturb=True, chunk_size=4)
  x = inputs(10, length=9)
  y_full = mixer(x)
  y, state = mixer.prefill(x[:, :6])
  np.testing.assert_allclose(y, y_full[:, :6], atol=1e-5, rtol=0)
  for t in range(6, 9):
    y_t, state = mixer.step(x[:, t], state)
    np.testing.assert_allclose(y_t, y_full[:, t], atol=1e-5, rtol=0)
  # Two prefills back to back (chunked prefill) give the same as one.
  y_a, s_a = mixer.prefill(x[:, :2])
  y_b, s_b = mixer.prefill(x[:, 2:], state=s_a)
  np.testing.assert_allclose(jnp.concatenate([y_a, y_b], 1), y_full, atol=1e-5, rtol=0)
  np.testing.assert_allclose(s_b.ssm, state.ssm, atol=1e-5, rtol=0)
  np.testing.assert_allclose(s_b.conv, state.conv, atol=1e-6, rtol=0)


def test_prefill_mask_left_padding_equals_right_padding():
  mixer = make(perturb=True, chunk_size=3)
  x = inputs(11, batch=2, length=8)
  lengths = np.array([8, 3])
  start = mixer.prefill(x[:, :2])[1]  # a non-empty state to continue from
  y_r, s_r = mixer.prefill(x, lengths=jnp.asarray(lengths), state=start)
  # The same rows left-padded: row 1's 3 tokens moved to the end.
  x_left = x.at[1].set(jnp.roll(x[1], 5, axis=0))
  mask = np.arange(8)[None, :] >= (8 - lengths)[:, None]
  y_l, s_l = mixer.prefill(x_left, mask=jnp.asarray(mask), state=start)
  np.testing.assert_allclose(s_l.ssm, s_r.ssm, atol=1e-6, rtol=0)
  np.testing.assert_allclose(s_l.conv, s_r.conv, atol=1e-6, rtol=0)
  np.testing.assert_allclose(y_l[0], y_r[0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(y_l[1, 5:], y_r[1, :3], atol=1e-6, rtol=0)
  np.testing.assert_array_equal(y_l[1, :5], 0.0)
  with pytest.raises(ValueError, match="not both"):
    mixer.prefill(x, lengths=jnp.asarray(lengths), mask=jnp.asarray(mask))


def test_step_mask_keeps_state():
  mixer = make(perturb=True)
  x = inputs(12, batch=2, length=3)
  _, state = mixer.prefill(x)
  y, new = mixer.step(x[:, 0], state, mask=jnp.array([True, False]))
  y_all, new_all = mixer.step(x[:, 0], state)
  np.testing.assert_array_equal(y[1], 0.0)
  np.testing.assert_array_equal(y[0], y_all[0])
  for a, b, c in zip(jax.tree.leaves(new), jax.tree.leaves(state),
                     jax.tree.leaves(new_all)):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], c[0])


def test_state_shapes_and_bfloat16():
  mixer = make(dtype=jnp.bfloat16)
  state = mixer.init_state(2)
  assert isinstance(state, MambaState)
  assert state.conv.shape == (2, 3, 16) and state.conv.dtype == jnp.bfloat16
  assert state.ssm.shape == (2, 16, 4) and state.ssm.dtype == jnp.float32
  x = inputs(13)
  y, after = mixer.prefill(x)
  assert y.dtype == jnp.bfloat16 and after.ssm.dtype == jnp.float32
  assert after.conv.dtype == jnp.bfloat16
  assert mixer.in_proj[...].dtype == jnp.float32
  # bf16 compute stays near the float32 model with the same parameters.
  ref = make()
  np.testing.assert_allclose(np.asarray(y, np.float32), ref(x), atol=0.05)
  y_t, s_t = mixer.step(x[:, 0], state)
  assert y_t.dtype == jnp.bfloat16 and s_t.ssm.dtype == jnp.float32


# ---------------------------------------------------------------------------------
# Size and cost.
# ---------------------------------------------------------------------------------


def test_mixer_cost_by_hand():
  # M=8, D_in=16, N=4, R=1, K=4:
  # params: in_proj 8*32=256, conv 4*16+16=80, x_proj 16*(1+8)=144,
  #   dt_proj 1*16+16=32, A_log 16*4=64, D 16, norms 1+4+4=9, out_proj 16*8=128 -> 729
  # matmul: 2*(256 + 64 + 144 + 16 + 128) = 2*608 = 1216; scan: 6*16*4 = 384.
  cost = mamba.mixer_cost(MambaConfig(**TINY))
  assert cost == {"params": 729, "flops": 1600, "matmul_flops": 1216,
                  "scan_flops": 384}
  assert mamba.mixer_cost(MambaConfig(**TINY, inner_norms=False))["params"] == 720


@pytest.mark.parametrize("kw", [TINY, dict(d_model=40, d_state=16, expand=3),
                                dict(d_model=24, d_conv=2, dt_rank=5,
                                     inner_norms=False)])
def test_mixer_cost_params_match_module(kw):
  cfg = MambaConfig(**kw)
  m = nnx.eval_shape(lambda: MambaMixer(cfg, rngs=nnx.Rngs(0)))
  size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert mamba.mixer_cost(cfg)["params"] == size
