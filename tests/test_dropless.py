"""dispatch="dropless" across devices (moe_jax/layers/dropless.py) on 8 fake CPU devices.

The CPU backend compiles only the padded exchange, so every run here uses it
("auto" resolves to it on CPU); the ragged exchange is checked as far as CPU allows:
it lowers, with its gradient, to ``ragged_all_to_all`` and nothing that gathers.
"""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeConfig, MoeLayer
from moe_jax.layers import dropless
from moe_jax.parallel import sharding
from moe_jax.models import param_sharding
from tests.sharding_demo import train_demo
from tests.test_sharding import assert_same_run

MESHES = [(8, 1), (2, 4), (4, 2), (1, 8)]  # (data, expert)
# E = 8: one expert per device on 1x8, 2 on 2x4, 4 on 4x2, all 8 (no exchange) on 8x1.
# One MoE block keeps each compile small; the model-axis test adds E < expert axis.
NUM_EXPERTS = (8,)
_refs = {}


def _demo(data, expert, model=1, num_experts=NUM_EXPERTS, **moe):
  # Worst-case buffers: the mesh must drop nothing to equal one device.
  moe = {"ragged_buffer_factor": -1.0, **moe}
  return train_demo(data, expert, model, num_experts=num_experts, steps=2,
                             dispatch="dropless", moe=moe)


def _reference(num_experts=NUM_EXPERTS, **moe):
  key = (num_experts, tuple(sorted(moe.items())))
  if key not in _refs:
    _refs[key] = _demo(1, 1, num_experts=num_experts, **moe)
  return _refs[key]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("data,expert", MESHES)
def test_sharded_dropless_equals_single_device(data, expert, top_k):
  # Forward (logits), loss and gradients of the first step and the loss after an Adam
  # step, against the single-device dropless path.
  assert_same_run(_demo(data, expert, top_k=top_k), _reference(top_k=top_k))


def test_sharded_dropless_with_model_axis_and_swiglu():
  # 1x4x2: H split over `model`, so each device computes its half of the hidden units
  # and the partial outputs are summed over `model` before they travel back. E = 2 is
  # replicated over the expert axis of 4 (no exchange), E = 8 has 2 per device.
  moe = dict(top_k=2, activation="swiglu")
  assert_same_run(_demo(1, 4, 2, num_experts=(2, 8), **moe),
                  _reference(num_experts=(2, 8), **moe))


# ----------------------------------------------------------------------------------
# Skewed routing, hand-made: 2x4 mesh, E = 8 (experts 2x, 2x+1 on expert shard x),
# B = L = S = M = 8, so device i holds batch row i, which is one group of 8 tokens.
# The router kernel is 10 * I, so token x = onehot(a) + 0.5 onehot(b) (+ noise of
# 0.01) has logits 10 at a and 5 at b: first choice a, second b. In every group
# tokens 0-5 pick (0, 1) and tokens 6-7 pick (5, 4): shard 0 gets 6 of the 8 first
# choices (75% of the tokens on one expert), shard 2 the other 2.
# ----------------------------------------------------------------------------------

SKEW_FIRST = np.array([0] * 6 + [5] * 2)
SKEW_SECOND = np.array([1] * 6 + [4] * 2)


def _skewed_layers(top_k, factor=-1.0, first=SKEW_FIRST, second=SKEW_SECOND):
  """The one-device and 2x4 layers and x [8, 8, 8]; ``factor=None``: the default."""
  buffer = {} if factor is None else {"ragged_buffer_factor": factor}
  cfg = MoeConfig(d_model=8, d_ff=16, num_experts=8, group_size=8, top_k=top_k,
                  dispatch="dropless", capacity_factor=1.0, init_scale=0.1,
                  router_init_scale=0.1, **buffer)
  layers = []
  for mesh in (None, sharding.make_mesh(2, 4)):
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    layer.router.kernel[...] = 10.0 * np.eye(8, dtype=np.float32)
    layers.append(layer if mesh is None else param_sharding.shard_model(layer, mesh))
  eye = np.eye(8, dtype=np.float32)
  x = eye[first] + 0.5 * eye[second]  # [S, M]
  x = x[None] + 0.01 * np.random.default_rng(0).normal(size=(8, 8, 8))
  return layers, x.astype(np.float32)


def _run(layer, x, token_mask=None):
  if layer.layout.mesh is not None:
    batch = {"x": x} if token_mask is None else {"x": x, "mask": token_mask}
    batch = sharding.shard_batch(batch, layer.layout.mesh)
    x, token_mask = batch["x"], batch.get("mask")
  y, aux = nnx.jit(lambda layer, x, m: layer(x, deterministic=True, token_mask=m))(
      layer, x, token_mask)
  return np.asarray(y), jax.tree.map(np.asarray, aux.metrics)


@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_router_drops_nothing_at_the_worst_case_buffer(top_k):
  # Worst-case buffers (f = -1): P = T * min(K, E_l) = 8 * min(K, 2) rows per shard; shard 0
  # receives 6 (top-1) or 12 (top-2) rows from each device, all of which fit.
  (single, meshed), x = _skewed_layers(top_k)
  y1, m1 = _run(single, x)
  y2, m2 = _run(meshed, x)
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(y2).sum(-1) > 0)  # every token got an expert output
  assert m1["dropped_fraction"] == m2["dropped_fraction"] == 0.0
  np.testing.assert_allclose(m2["expert_fill"], m1["expert_fill"], atol=1e-7)
  # 6 of 8 tokens per group chose expert 0 first: fill 6/8 of C = S = 8 slots.
  assert m2["expert_fill"][0] == pytest.approx(0.75)


def test_default_buffer_counts_overflow_in_dropped_fraction():
  # Every token of every group picks expert 0 (shard 0). The default f = 2 gives
  # P = ceil(2 * T*K/X) = ceil(2 * 8 / 4) = 4 rows per shard, of the 8 each device
  # sends to shard 0: tokens 4-7 of every group are dropped, 32 of 64 -> 0.5, and their
  # output is 0. The same layer on one device sends nothing and drops nothing.
  assert MoeConfig(8, 16, 8).ragged_buffer_factor == dropless.BUFFER_FACTOR == 2.0
  (single, meshed), x = _skewed_layers(1, None, first=np.zeros(8, int),
                                       second=np.ones(8, int))
  y1, m1 = _run(single, x)
  y, m = _run(meshed, x)
  assert m1["dropped_fraction"] == 0.0 and np.all(np.abs(y1).sum(-1) > 0)
  assert m["dropped_fraction"] == pytest.approx(0.5, abs=1e-7)
  np.testing.assert_array_equal(y[:, 4:], 0.0)
  np.testing.assert_allclose(y[:, :4], y1[:, :4], rtol=1e-5, atol=1e-6)
  assert m["expert_fill"][0] == pytest.approx(0.5)  # 4 of C = S = 8 slots


@pytest.mark.parametrize("top_k,factor,lost_tokens,lost_rows,dropped,second_kept", [
    # top-1, f = 1: P = ceil(1 * T*K/X) = ceil(8*1/4) = 2 rows per shard. Shard 0 gets
    # the 6 expert-0 tokens of each group and keeps the first 2 (tokens 0, 1): tokens
    # 2-5 lose their only choice, 4 * 8 = 32 of 64 tokens -> dropped 0.5.
    (1, 1.0, range(2, 6), 32, 0.5, 0.0),
    # top-1, f = 2: P = 4; tokens 4, 5 lost in every group: 16 / 64 = 0.25.
    (1, 2.0, range(4, 6), 16, 0.25, 0.0),
    # top-2, f = 1: P = ceil(8*2/4) = 4. Shard 0 gets 12 rows sorted by expert: the 6
    # expert-0 rows (tokens 0-5), then the 6 expert-1 rows; it keeps tokens 0-3's
    # expert-0 rows. Tokens 4, 5 lose both choices (16 of 64 tokens: 0.25), and the
    # second choices of tokens 0-5 are lost: 48 of 64 -> second_kept 1 - 0.75 = 0.25.
    # Shard 2 gets tokens 6, 7's 4 rows: all fit.
    (2, 1.0, range(4, 6), 64, 0.25, 0.25),
])
def test_small_buffer_drops_and_reports_exactly(top_k, factor, lost_tokens, lost_rows,
                                                dropped, second_kept):
  (single, meshed), x = _skewed_layers(top_k, factor)
  _, m_ref = _run(single, x)
  y, m = _run(meshed, x)
  assert m["dropped_fraction"] == pytest.approx(dropped, abs=1e-7)
  lost = list(lost_tokens)
  np.testing.assert_array_equal(y[:, lost], 0.0)  # a lost token's output is exactly 0
  if top_k == 2:
    assert m["second_kept_fraction"] == pytest.approx(second_kept, abs=1e-7)
  # Choices lost per expert, from the fill: (reference - got) * G * C.
  lost_per_expert = (m_ref["expert_fill"] - m["expert_fill"]) * 8 * 8
  np.testing.assert_allclose(lost_per_expert.sum(), lost_rows, atol=1e-4)
  # The kept tokens' outputs equal the reference computed with only their kept
  # choices: with top-1 that is the single-device output itself.
  if top_k == 1:
    (single_full, _), _ = _skewed_layers(top_k)
    y_ref, _ = _run(single_full, x)
    kept = [s for s in range(8) if s not in lost]
    np.testing.assert_allclose(y[:, kept], y_ref[:, kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k,factor,lost_tokens,lost_seconds", [
    # Tokens 6, 7 of every group are padding (they went to shard 2), so 48 tokens are
    # valid and shard 0 gets what it got above. top-1, f = 1: tokens 2-5 lose their
    # only choice, 32 of the 48 valid tokens (not of all 64).
    (1, 1.0, 32, 0),
    # top-2, f = 1: tokens 4, 5 lose both choices (16 tokens), tokens 0-5 their second
    # (48 second choices, of 48 valid tokens * (K - 1)).
    (2, 1.0, 16, 48),
])
def test_small_buffer_metrics_count_valid_tokens_only(top_k, factor, lost_tokens,
                                                      lost_seconds):
  # The routers divide dropped_fraction and second_kept_fraction by the valid tokens;
  # the choices the buffers lose must be counted over the same tokens: the one-device
  # router's metrics (which lose nothing) plus what was lost, of 48 valid tokens.
  (single, meshed), x = _skewed_layers(top_k, factor)
  mask = np.ones((8, 8), bool)
  mask[:, 6:] = False
  valid = 48
  _, m_ref = _run(single, x, mask)
  y, m = _run(meshed, x, mask)
  assert m_ref["dropped_fraction"] == 0.0
  assert m["dropped_fraction"] == pytest.approx(
      m_ref["dropped_fraction"] + lost_tokens / valid, abs=1e-6)
  if top_k == 2:
    assert m_ref["second_kept_fraction"] == pytest.approx(1.0)
    assert m["second_kept_fraction"] == pytest.approx(
        m_ref["second_kept_fraction"] - lost_seconds / (valid * (top_k - 1)), abs=1e-6)
  np.testing.assert_array_equal(y[:, 6:], 0.0)  # padding is never routed


def test_megablox_on_a_mesh_equals_tiled_on_one_device_with_gradients():
  # The megablox kernels (Pallas interpret mode on CPU) inside the dropless shard_map
  # of a 2x4 mesh: each device's rows vary over every batch axis but its weight shard
  # only over `expert`, so the weight gradient must be summed over `data` as under the
  # other implementations. Loss and every parameter gradient equal one device's tiles.
  x = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
  results = []
  for how, mesh in (("tiled", None), ("megablox", sharding.make_mesh(2, 4))):
    cfg = MoeConfig(d_model=8, d_ff=16, num_experts=8, group_size=8, top_k=2,
                    dispatch="dropless", grouped_matmul=how, ragged_buffer_factor=-1.0,
                    capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    xs = x
    if mesh is not None:
      layer = param_sharding.shard_model(layer, mesh)
      xs = sharding.shard_batch({"x": x}, mesh)["x"]

    def loss(layer, x):
      y, aux = layer(x, deterministic=True)
      return (y ** 2).sum() + aux.aux_loss

    value, grads = nnx.jit(nnx.value_and_grad(loss))(layer, xs)
    results.append((float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]))
  (want, want_grads), (got, got_grads) = results
  assert got == pytest.approx(want, rel=1e-5)
  assert len(got_grads) == len(want_grads) >= 3
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_expert_dropout_on_a_mesh_masks_hidden_units():
  # Training draws a dropout key outside shard_map and folds in each device's mesh
  # position: outputs change against eval, stay finite, and two calls differ.
  cfg = MoeConfig(d_model=8, d_ff=16, num_experts=8, group_size=8, top_k=2,
                  dispatch="dropless", expert_dropout=0.5,
                  capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
  mesh = sharding.make_mesh(2, 4)
  layer = param_sharding.shard_model(MoeLayer(cfg, rngs=nnx.Rngs(0)), mesh)
  x = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
  x = sharding.shard_batch({"x": x}, mesh)["x"]
  step = nnx.jit(lambda layer, x, det: layer(x, deterministic=det)[0],
                 static_argnums=2)
  y_eval = np.asarray(step(layer, x, True))
  y1, y2 = np.asarray(step(layer, x, False)), np.asarray(step(layer, x, False))
  assert np.all(np.isfinite(y1)) and not np.allclose(y1, y_eval)
  assert not np.allclose(y1, y2)


def test_buffer_rows_formula():
  # T = 8 tokens, K = 2, E_l = 2 experts per shard, X = 4 shards.
  assert dropless.buffer_rows(8, 2, 2, 4, -1.0) == 16  # worst case: 8 * min(2, 2)
  assert dropless.buffer_rows(8, 2, 1, 4, -1.0) == 8  # one expert per shard: 8 * min(2, 1)
  assert dropless.buffer_rows(8, 2, 2, 4) == 8  # default f = 2: ceil(2 * 8 * 2 / 4)
  assert dropless.buffer_rows(8, 2, 2, 4, 1.0) == 4  # ceil(1.0 * 8 * 2 / 4)
  assert dropless.buffer_rows(8, 1, 2, 4, 1.5) == 3  # ceil(1.5 * 8 / 4)
  assert dropless.buffer_rows(8, 2, 2, 4, 100.0) == 16  # never above the worst case
  assert dropless.buffer_rows(8, 1, 2, 4, 0.01) == 1  # at least one row
  assert dropless.resolve_exchange("auto", "cpu") == "padded"
  assert dropless.resolve_exchange("auto", "gpu") == "ragged"
  assert dropless.resolve_exchange("auto", "tpu") == "ragged"
  assert dropless.resolve_exchange("padded", "tpu") == "padded"


# ----------------------------------------------------------------------------------
# What the compiled step communicates.
# ----------------------------------------------------------------------------------

_SHAPE = re.compile(r"\b(f32|bf16|s32)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4}


def _all_to_alls(hlo):
  """(dtype, total bytes of the result) of every all-to-all in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\sall-to-all(-start)?\(", line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    nbytes = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                 for t, dims in shapes)
    out.append((shapes[0][0], nbytes))
  return out


def _step_hlo(top_k, data, expert, exchange="auto", compile_=True):
  mesh = sharding.make_mesh(data, expert)
  cfg = MoeConfig(d_model=8, d_ff=16, num_experts=8, group_size=8, top_k=top_k,
                  dispatch="dropless", ragged_exchange=exchange,
                  capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
  layer = param_sharding.shard_model(MoeLayer(cfg, rngs=nnx.Rngs(0)), mesh)
  x = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
  x = sharding.shard_batch({"x": x}, mesh)["x"]
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return (y ** 2).sum() + aux.aux_loss + aux.z_loss

  lowered = jax.jit(jax.value_and_grad(loss)).lower(params, x)
  return lowered.compile().as_text() if compile_ else lowered.as_text()


@pytest.mark.parametrize("top_k,data,expert", [(2, 2, 4), (1, 1, 8)])
def test_train_step_moves_tokens_only_by_all_to_all_of_the_padded_buffer(
    top_k, data, expert):
  hlo = _step_hlo(top_k, data, expert)
  assert "all-gather" not in hlo  # neither tokens nor expert weights are gathered
  assert "collective-permute" not in hlo and "reduce-scatter" not in hlo
  # The only all-reduces are gradient and metric sums, never token-sized: the
  # weight gradients over `data` and the router's, and scalars.
  a2a = _all_to_alls(hlo)
  # 64 tokens on 8 devices: T = 8 per device; E_l = 8 / expert; at the default f = 2,
  # P = ceil(2 * T * K / X): 2x4: ceil(2 * 16 / 4) = 8 rows; 1x8: ceil(2 * 8 / 8) = 2
  # rows (the worst case T * min(K, E_l) would be 16 and 8). One padded buffer is
  # X * P * M * 4 bytes: 4 * 8 * 8 * 4 = 1024 and 8 * 2 * 8 * 4 = 512.
  rows = dropless.buffer_rows(8, top_k, 8 // expert, expert)
  buffer = expert * rows * 8 * 4
  assert buffer == {2: 1024, 1: 512}[top_k]
  rows_a2a = [b for t, b in a2a if t == "f32"]
  # Forward: rows out and back; backward: the outputs' cotangents back to the
  # experts (the dispatched rows need no cotangent: x is not differentiated here).
  assert rows_a2a == [buffer] * 3
  # Plus one exchange of the per-expert counts, i32[X, E_l].
  assert [b for t, b in a2a if t == "s32"] == [expert * (8 // expert) * 4]


def test_ragged_exchange_lowers_to_ragged_all_to_all():
  # XLA:CPU cannot compile ragged-all-to-all, but the program (with its gradient)
  # lowers, and it moves rows only by ragged all-to-all.
  text = _step_hlo(2, 2, 4, exchange="ragged", compile_=False)
  assert text.count("ragged_all_to_all") == 3
  assert "all_gather" not in text


def test_no_exchange_on_data_only_or_replicated_experts():
  # 8x1: one expert shard, so each device computes its own tokens; nothing travels.
  hlo = _step_hlo(1, 8, 1)
  assert _all_to_alls(hlo) == [] and "all-gather" not in hlo


# ----------------------------------------------------------------------------------
# The router-zoo configs that use dropless train on every mesh like on one device.
# ----------------------------------------------------------------------------------

_zoo_runs = {}


def _zoo_losses(name, data, expert, tmp_path_factory):
  from moe_jax.training import train  # pylint: disable=import-outside-toplevel
  from moe_jax.training.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  from tests.test_train import _zoo_config  # pylint: disable=import-outside-toplevel

  if (name, data, expert) not in _zoo_runs:
    # 8 x 16 tokens in groups of 16: G = 8, one group per device on 8 devices.
    config = _zoo_config(name, **{
        "steps": 2, "log_every": 1, "eval_every": 2, "eval_steps": 1,
        "checkpoint_every": 2, "warmup_steps": 1, "batch_size": 8,
        "data.seq_len": 16, "moe.group_size": 16, "mesh.data": data,
        "mesh.expert": expert, "moe.ragged_buffer_factor": -1.0})
    assert config.moe.dispatch == "dropless"
    workdir = tmp_path_factory.mktemp(f"{name}_{data}x{expert}")
    train.train_and_evaluate(config, str(workdir))
    _zoo_runs[(name, data, expert)] = [r.get("loss", r.get("eval_loss"))
                                       for r in read_metrics(str(workdir))]
  return _zoo_runs[(name, data, expert)]


# Each mesh once, each config on a data-only or expert-only mesh and a mixed one (the
# layer-level tests above cover every mesh with top-1 and top-2; these check the
# training loop, and each case compiles a whole train and eval step).
@pytest.mark.slow
@pytest.mark.parametrize("name,data,expert", [
    ("mixtral_small", 8, 1), ("mixtral_small", 2, 4),
    ("deepseek_small", 4, 2), ("deepseek_small", 1, 8)])
def test_dropless_zoo_configs_train_on_every_mesh(name, data, expert,
                                                  tmp_path_factory):
  want = _zoo_losses(name, 1, 1, tmp_path_factory)
  got = _zoo_losses(name, data, expert, tmp_path_factory)
  assert len(want) == 3 and np.all(np.isfinite(want))  # 2 train steps, 1 eval
  np.testing.assert_allclose(got, want, rtol=2e-4)


@pytest.mark.slow
def test_train_cli_runs_mixtral_dropless_on_a_mesh(tmp_path):
  # The command line, end to end: no refusal, and the run logs finite losses. The
  # subprocess sees 8 fake devices through XLA_FLAGS (conftest.py sets them).
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from moe_jax.training.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  from tests.test_train import (  # pylint: disable=import-outside-toplevel
      CONFIGS, HANG_GUARD_S, ROOT, cli_overrides)

  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       f"--config={os.path.join(CONFIGS, 'mixtral_small.py')}",
       f"--workdir={tmp_path}",
       *cli_overrides(**{"steps": 2, "log_every": 1, "eval_every": 2, "eval_steps": 1,
                         "checkpoint_every": 2, "warmup_steps": 1, "batch_size": 8,
                         "data.seq_len": 16, "moe.group_size": 16, "sample.length": 0,
                         "mesh.data": 2, "mesh.expert": 4,
                         "moe.dispatch": "dropless"})],
      capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
      env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-2000:]
  losses = [r["loss"] for r in read_metrics(str(tmp_path), "train")]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
