"""The grouped matmuls of the dropless path (expert tiles, ragged_dot, megablox) against
a loop, and what "auto" picks per backend."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import grouped_matmul as gm
from moe_jax.parallel.backend import compile_target


def _loop(x, w, group_sizes):
  """Row by row: row r of expert e times w[e]; rows past the groups are 0."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[-1]))
  row = 0
  for e, size in enumerate(np.asarray(group_sizes)):
    for _ in range(size):
      out[row] = x[row] @ w[e]
      row += 1
  return out


def test_tile_layout_by_hand():
  # N = 10 sorted rows, group sizes (3, 0, 5): rows 8 and 9 are unrouted.
  # b = 4 (ceil(10 / 3) = 4, a power of two); tiles = ceil(10 / 4) + 3 = 6.
  # Expert 0 fills tile 0 (3 of 4 slots), expert 1 has no tile, expert 2 tiles 1 and 2
  # (5 of 8 slots); tiles 3-5 hold nothing and point at the last expert.
  layout = gm.tile_layout(jnp.array([3, 0, 5]), 10)
  assert layout.tile == 4
  np.testing.assert_array_equal(layout.tile_expert, [0, 2, 2, 2, 2, 2])
  valid = np.zeros(24, bool)
  valid[[0, 1, 2, 4, 5, 6, 7, 8]] = True
  np.testing.assert_array_equal(layout.slot_valid, valid)
  np.testing.assert_array_equal(np.asarray(layout.slot_row)[valid], [0, 1, 2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(layout.row_slot[:8], [0, 1, 2, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(layout.row_valid, [True] * 8 + [False] * 2)


@pytest.mark.parametrize("num_rows, num_experts, want", [
    (10, 3, 4), (6144, 32, 128), (16, 8, 2), (1, 4, 1), (100, 1, 128), (24, 3, 8)])
def test_tile_rows_is_a_power_of_two_near_the_share(num_rows, num_experts, want):
  assert gm.tile_rows(num_rows, num_experts) == want


@pytest.mark.parametrize("num_rows, num_experts", [(37, 5), (300, 16), (16, 8), (3, 4)])
def test_tiled_equals_ragged_dot_and_the_loop(num_rows, num_experts):
  rng = np.random.default_rng(num_rows)
  m, h = 6, 5
  x = jnp.asarray(rng.normal(size=(num_rows, m)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_experts, m, h)), jnp.float32)
  for routed in (num_rows, num_rows // 2):  # every row routed, then half of them
    # Skewed sizes with empty experts (a Dirichlet with small concentration).
    sizes = rng.multinomial(routed, rng.dirichlet(np.full(num_experts, 0.3)))
    sizes = jnp.asarray(sizes, jnp.int32)
    tiled = gm.grouped_matmul(x, w, sizes, how="tiled")
    ragged = gm.grouped_matmul(x, w, sizes, how="ragged_dot")
    scanned = gm.grouped_matmul(x, w, sizes, how="tile_scan")
    np.testing.assert_allclose(tiled, _loop(x, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tiled, ragged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scanned, tiled, rtol=1e-6, atol=1e-6)
    assert not np.asarray(tiled[routed:]).any()

    def loss(x, w, how):
      return (gm.grouped_matmul(x, w, sizes, how=how) ** 2).sum()

    g_tiled = jax.grad(loss, argnums=(0, 1))(x, w, "tiled")
    g_ragged = jax.grad(loss, argnums=(0, 1))(x, w, "ragged_dot")
    g_scanned = jax.grad(loss, argnums=(0, 1))(x, w, "tile_scan")
    for a, b, c in zip(g_tiled, g_ragged, g_scanned):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)


def test_tiled_work_is_bounded_by_rows_plus_a_tile_per_expert():
  # The batched matmul runs (ceil(N / b) + E) * b rows, at most N + E * b (+ b - 1).
  num_rows, num_experts = 6144, 32
  x = jnp.zeros((num_rows, 8))
  w = jnp.zeros((num_experts, 8, 4))
  sizes = jnp.full((num_experts,), num_rows // num_experts, jnp.int32)
  jaxpr = jax.make_jaxpr(lambda x, w: gm.grouped_matmul(x, w, sizes, how="tiled"))(x, w)
  (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  tiles, b, _ = dot.invars[0].aval.shape
  assert b == gm.tile_rows(num_rows, num_experts) == 128
  assert tiles == math.ceil(num_rows / b) + num_experts
  assert tiles * b <= num_rows + num_experts * b + b - 1


def test_auto_resolves_per_backend():
  assert gm.resolve_grouped_matmul("auto", "cpu") == "tiled"
  for backend in ("gpu", "cuda", "rocm"):
    assert gm.resolve_grouped_matmul("auto", backend) == "tile_scan"
  assert gm.resolve_grouped_matmul("auto", "tpu") == "megablox"
  assert gm.resolve_grouped_matmul("ragged_dot", "cpu") == "ragged_dot"
  assert set(gm.CHOICES) == {"auto", "ragged_dot", "tiled", "tile_scan", "megablox"}
  assert gm.resolve_grouped_matmul("auto") == "tiled"  # the host (conftest: CPU)
  with compile_target("tpu"):
    assert gm.resolve_grouped_matmul("auto") == "megablox"


def test_megablox_equals_the_loop_and_tiled_with_gradients():
  # Pallas interpret mode on CPU (slow: one small case). N = 37 rows is not a multiple
  # of the row tile (it pads to 48), 30 are routed (7 unrouted must come out 0, with 0
  # input gradient), expert 1 is empty; M = 6 and H = 5 are narrower than a tile.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(37, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
  sizes = jnp.array([9, 0, 15, 6], jnp.int32)
  y = gm.grouped_matmul(x, w, sizes, how="megablox")
  np.testing.assert_allclose(y, _loop(x, w, sizes), rtol=1e-5, atol=1e-5)
  assert y.shape == (37, 5) and not np.asarray(y[30:]).any()

  def loss(x, w, how):
    return (gm.grouped_matmul(x, w, sizes, how=how) * jnp.cos(jnp.arange(5.0))).sum()

  dx, dw = jax.grad(loss, argnums=(0, 1))(x, w, "megablox")
  want_dx, want_dw = jax.grad(loss, argnums=(0, 1))(x, w, "tiled")
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
  assert not np.asarray(dx[30:]).any() and not np.asarray(dw[1]).any()
  # bfloat16 stays bfloat16 (the kernel's operand dtype); int64-like sizes are cast.
  yb = gm.grouped_matmul(x.astype(jnp.bfloat16), w, sizes.astype(jnp.int16), how="megablox")
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(yb, np.float32), y, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("num_rows, want", [(8192, 128), (128, 128), (37, 48), (1, 16)])
def test_megablox_row_tile(num_rows, want):
  assert gm.megablox_tiling(num_rows, 1024, 100) == (want, 512, 100)


def test_megablox_compiles_to_three_grouped_kernels_on_tpu():
  # Compile-only for one TPU v5p chip (libtpu, no TPU needed): forward, input gradient
  # and weight gradient are Mosaic kernels (gmm, gmm, tgmm), with no dense XLA dot or
  # convolution left, and the compiled FLOPs are the routed ones, 3 * 2 * N * M * H.
  from moe_jax.planner.targets import make_target  # pylint: disable=import-outside-toplevel
  devices = make_target("v5p:2x2x1").devices  # the test extra installs libtpu
  # M = 200 is below a 512-wide tile and not a multiple of 128, so its tile must be the
  # whole width wherever M is a tiled dimension (the input gradient produces M).
  n, m, h, e = 256, 200, 640, 8
  sharding = jax.sharding.SingleDeviceSharding(devices[0])

  def fwd_bwd(x, w, sizes, dy):
    y, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, sizes, how="auto"), x, w)
    return (y,) + vjp(dy)

  args = (jax.ShapeDtypeStruct((n, m), jnp.bfloat16),
          jax.ShapeDtypeStruct((e, m, h), jnp.bfloat16),
          jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((n, h), jnp.bfloat16))
  with compile_target("tpu"):
    compiled = jax.jit(fwd_bwd, in_shardings=(sharding,) * 4,
                       out_shardings=(sharding,) * 3).lower(*args).compile()
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 3
  assert " dot(" not in hlo and " convolution(" not in hlo
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] == pytest.approx(3 * 2 * n * m * h, rel=0.01)


def test_tile_scan_reads_one_weight_at_a_time():
  # The tiled path's one batched matmul reads a gathered [tiles, M, H] weight copy;
  # tile_scan's matmul is a [b, M] x [M, H] product inside a scan over the tiles.
  num_rows, num_experts = 512, 8
  x = jnp.zeros((num_rows, 8))
  w = jnp.zeros((num_experts, 8, 4))
  sizes = jnp.full((num_experts,), num_rows // num_experts, jnp.int32)
  jaxpr = jax.make_jaxpr(lambda x, w: gm.grouped_matmul(x, w, sizes, how="tile_scan"))(x, w)
  assert not [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  tiles = math.ceil(num_rows / gm.tile_rows(num_rows, num_experts)) + num_experts
  assert scan.params["length"] == tiles

  def dots(jaxpr):  # the body's dots, inside the rematerialised step too
    for e in jaxpr.eqns:
      if e.primitive.name == "dot_general":
        yield e
      for sub in e.params.values():
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from dots(sub)

  (dot,) = list(dots(scan.params["jaxpr"].jaxpr))
  assert [v.aval.shape for v in dot.invars] == [(64, 8), (8, 4)]


def test_bfloat16_rows_stay_bfloat16():
  x = jnp.ones((12, 4), jnp.bfloat16)
  w = jnp.ones((3, 4, 2), jnp.float32)
  y = gm.grouped_matmul(x, w, jnp.array([4, 4, 4]), how="tiled")
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), 4.0)
