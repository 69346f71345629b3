"""MoeLayer against a slow loop reference, plus training/eval behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeConfig, MoeLayer, routing
from moe_jax.layers import moe_layer
from moe_jax.layers.moe_config import validate_moe_config
from tests.reference import moe_layer_loop


@nnx.jit
def _apply(layer, x):
  return layer(x)


# Dispatch paths; "dropless" runs its "auto" grouped matmul ("tiled" on CPU), and
# "dropless:ragged_dot" forces jax.lax.ragged_dot.
DISPATCHES = ["einsum", "indices", "dropless", "dropless:ragged_dot"]


def _layer(**kw):
  base = dict(d_model=8, d_ff=16, num_experts=4, top_k=1, capacity_factor=1.0,
              eval_capacity_factor=2.0, group_size=8, min_capacity=1, init_scale=0.1,
              router_init_scale=0.1)
  base.update(kw)
  if ":" in base.get("dispatch", ""):
    base["dispatch"], base["grouped_matmul"] = base["dispatch"].split(":")
  return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(0))


def _x(shape=(2, 8, 8), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _reference(layer, x, capacity, group_size=8):
  experts = layer.experts
  return moe_layer_loop(
      x.reshape(-1, x.shape[-1]), layer.router.kernel[...], experts.wi[...],
      experts.wo[...], top_k=layer.cfg.top_k, capacity=capacity, group_size=group_size,
      activation=layer.cfg.activation,
      wi_gate=None if experts.wi_gate is None else experts.wi_gate[...])


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("top_k, capacity_factor", [(1, 0.5), (1, 1.0), (1, 4.0),
                                                    (2, 0.5), (2, 1.0), (2, 2.0)])
def test_layer_matches_per_token_loop(dispatch, top_k, capacity_factor):
  layer = _layer(top_k=top_k, capacity_factor=capacity_factor, dispatch=dispatch)
  # Scale up the router so that the experts' choices are well separated.
  layer.router.kernel[...] = layer.router.kernel[...] * 20
  x = _x()
  y, _ = _apply(layer, x)
  capacity = layer.capacity(8, deterministic=False)  # dropless: C = S = 8
  assert (capacity == 8) == (dispatch.startswith("dropless") or capacity_factor == 4.0)
  ref = _reference(layer, x, capacity)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), ref, rtol=1e-4, atol=1e-5)


def test_dropped_token_output_is_exactly_zero():
  # Every token prefers expert 0 (router kernel column 0 large): with capacity 1 only
  # the first token of each group is processed; the others must be exactly 0.
  layer = _layer(capacity_factor=0.25)  # C = max(1, ceil(.25*8/4)) = 1
  kernel = np.zeros((8, 4), np.float32)
  kernel[:, 0] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)
  x = jnp.abs(_x()) + 0.1  # positive inputs -> logit of e0 is the largest
  y, aux = _apply(layer, x)
  y = np.asarray(y).reshape(2, 8, 8)  # groups of 8 == one batch row each
  assert np.all(y[:, 1:] == 0.0)
  assert np.any(y[:, 0] != 0.0)
  assert float(aux.metrics["dropped_fraction"]) == pytest.approx(14 / 16)


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "dropless"])
def test_gradients_reach_router_and_experts(dispatch):
  layer = _layer(top_k=2, capacity_factor=1.0, dispatch=dispatch)
  x = _x()

  def loss_fn(model):
    y, aux = model(x)
    return jnp.mean(y ** 2) + 0.01 * aux.aux_loss + 0.001 * aux.z_loss

  grads = nnx.grad(loss_fn)(layer)
  for name, g in [("router", grads.router.kernel[...]), ("wi", grads.experts.wi[...]),
                  ("wo", grads.experts.wo[...])]:
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert float(jnp.abs(g).sum()) > 0, name


def test_einsum_and_indices_agree_in_value_and_gradient():
  x = _x((2, 12, 8))
  results = {}
  for dispatch in ("einsum", "indices"):
    layer = _layer(top_k=2, capacity_factor=0.75, group_size=6, dispatch=dispatch)

    def loss_fn(model, x):
      y, aux = model(x)
      return jnp.sum(jnp.sin(y)) + aux.aux_loss, y

    (loss, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer, x)
    results[dispatch] = (loss, y, jax.tree.leaves(nnx.state(grads, nnx.Param)))
  (l1, y1, g1), (l2, y2, g2) = results["einsum"], results["indices"]
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_k, policy, length", [(1, "all", 12), (2, "all", 12),
                                                    (2, "threshold", 12),
                                                    (2, "threshold", 11)])
def test_dropless_equals_capacity_paths_with_capacity_s(top_k, policy, length):
  # With C = S nothing is dropped for capacity, so "indices" at capacity_factor = E is
  # the same function as "dropless": values and gradients of every parameter and of
  # the input. The threshold policy leaves some second choices unrouted, and length 11
  # pads the last group of 6 with masked tokens.
  x = _x((2, length, 8))
  results = {}
  for dispatch, cf in (("indices", 4.0), ("dropless", 0.25)):
    layer = _layer(top_k=top_k, capacity_factor=cf, group_size=6, dispatch=dispatch,
                   second_policy=policy, second_threshold=0.3)
    layer.router.kernel[...] = layer.router.kernel[...] * 10
    assert layer.capacity(6, deterministic=False) == 6

    def loss_fn(model, x):
      y, aux = model(x)
      return jnp.sum(jnp.sin(y)) + aux.aux_loss + aux.z_loss, (y, aux)

    (loss, (y, aux)), (grads, gx) = nnx.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(layer, x)
    results[dispatch] = (loss, y, aux, gx,
                         jax.tree.leaves(nnx.state(grads, nnx.Param)))
  (l1, y1, a1, gx1, g1), (l2, y2, a2, gx2, g2) = results["indices"], results["dropless"]
  if policy == "threshold":
    assert 0 < float(a2.metrics["second_kept_fraction"]) < 1
  assert float(a2.metrics["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropless_keeps_every_token_when_all_pick_one_expert():
  # All 16 tokens choose expert 0: capacity paths at cf 1.0 (C = 16 / 4 = 4) drop 12
  # of the 16, dropless runs all of them through expert 0 and scales by the gate.
  kernel = np.zeros((8, 4), np.float32)
  kernel[:, 0] = 1.0
  x = jnp.abs(_x((1, 16, 8))) + 0.1
  outs = {}
  for dispatch in ("indices", "dropless"):
    layer = _layer(group_size=16, min_capacity=1, dispatch=dispatch)
    layer.router.kernel[...] = jnp.asarray(kernel)
    outs[dispatch] = _apply(layer, x)
  assert float(outs["indices"][1].metrics["dropped_fraction"]) == pytest.approx(12 / 16)
  y, aux = outs["dropless"]
  assert float(aux.metrics["dropped_fraction"]) == 0.0
  wi, wo = layer.experts.wi[...][0], layer.experts.wo[...][0]
  gate = jax.nn.softmax(x[0] @ jnp.asarray(kernel), axis=-1)[:, 0]
  expected = (jax.nn.relu(x[0] @ wi) @ wo) * gate[:, None]
  np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-6)


def test_dropless_bfloat16_runs_in_bfloat16():
  layer = _layer(top_k=2, dispatch="dropless", dtype="bfloat16")
  ref = _layer(top_k=2, dispatch="dropless")
  y16, aux16 = _apply(layer, _x())
  y32, _ = _apply(ref, _x())
  assert y16.dtype == jnp.bfloat16 and aux16.aux_loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


def test_jitter_only_in_training():
  layer = _layer(jitter_noise=0.5)
  ref = _layer(jitter_noise=0.0)  # same seed -> same weights
  x = _x()
  layer.eval()
  ref.eval()
  y1, _ = _apply(layer, x)
  y2, _ = _apply(layer, x)
  y_ref, _ = _apply(ref, x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(y1, y_ref)
  layer.train()
  ref.train()
  y_train, _ = _apply(layer, x)
  y_ref_train, _ = _apply(ref, x)
  assert not np.allclose(y_train, y_ref_train)


def test_eval_uses_eval_capacity_factor():
  layer = _layer(capacity_factor=0.5, eval_capacity_factor=4.0)
  assert layer.capacity(8, deterministic=False) == 1  # ceil(.5 * 8 / 4) = 1
  assert layer.capacity(8, deterministic=True) == 8  # ceil(4 * 8 / 4) = 8 = S
  layer.router.kernel[...] = layer.router.kernel[...] * 20
  x = _x()
  _, aux_train = _apply(layer, x)
  layer.eval()
  _, aux_eval = _apply(layer, x)
  assert float(aux_train.metrics["dropped_fraction"]) > 0
  assert float(aux_eval.metrics["dropped_fraction"]) == 0.0  # C = S never drops


def test_padding_when_tokens_do_not_fill_groups():
  # B*L = 10 tokens, group_size 4 -> G = 3 groups, the last padded with 2 masked
  # tokens. Capacity = S (min_capacity 4) so nothing is dropped and each group's
  # output equals the layer run on that group's real tokens alone.
  layer = _layer(group_size=4, min_capacity=4, top_k=2)
  x = _x((2, 5, 8))
  y, aux = _apply(layer, x)
  assert y.shape == (2, 5, 8)
  flat = x.reshape(10, 8)
  parts = [_apply(layer, flat[i:i + 4][None])[0][0] for i in (0, 4)]
  parts.append(_apply(layer, flat[8:][None])[0][0])
  np.testing.assert_allclose(y.reshape(10, 8), jnp.concatenate(parts), rtol=1e-5,
                             atol=1e-6)
  # Losses see only the 10 real tokens.
  logits = jnp.einsum("TM,ME->TE", flat, layer.router.kernel[...])
  expected_z = float(jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2))
  assert float(aux.z_loss) == pytest.approx(expected_z, rel=1e-5)
  assert float(aux.metrics["dropped_fraction"]) == 0.0


def test_single_small_batch_uses_one_group():
  # Fewer tokens than group_size: one group of the B*L = 3 tokens, no padding. All three
  # prefer expert 0, and C = max(1, ceil(1.0 * 3 / 4)) = 1 for S = 3, so only token 0
  # is kept. Padded to a group of 1024, C would be 256 and nothing would drop.
  assert moe_layer.group_tokens(3, 1024) == (1, 3)
  layer = _layer(group_size=1024)
  assert layer.capacity(3, deterministic=False) == 1
  kernel = np.zeros((8, 4), np.float32)
  kernel[:, 0] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)
  x = jnp.abs(_x((1, 3, 8))) + 0.1  # positive inputs -> logit of e0 is the largest
  y, aux = _apply(layer, x)
  assert y.shape == (1, 3, 8)
  assert np.all(np.asarray(y)[0, 1:] == 0.0) and np.any(np.asarray(y)[0, 0] != 0.0)
  assert float(aux.metrics["dropped_fraction"]) == pytest.approx(2 / 3)
  np.testing.assert_allclose(np.asarray(y).reshape(3, 8),
                             _reference(layer, x, capacity=1, group_size=3),
                             rtol=1e-4, atol=1e-6)


def test_group_size_zero_is_one_group_per_sequence():
  # group_size=0 routes each row of [B, L] as its own group: the same as group_size=L,
  # and each row routes as it would alone (capacity ceil(1.0 * 6 / 4) = 2 per row).
  x = _x((3, 6, 8))
  per_seq, explicit = _layer(group_size=0), _layer(group_size=6)
  y0, aux0 = _apply(per_seq, x)
  y6, aux6 = _apply(explicit, x)
  np.testing.assert_array_equal(y0, y6)
  np.testing.assert_array_equal(aux0.aux_loss, aux6.aux_loss)
  alone, _ = _apply(per_seq, x[1:2])
  np.testing.assert_allclose(y0[1:2], alone, rtol=1e-6, atol=1e-7)
  # A group of the whole batch (18 tokens, C = 5) routes differently.
  whole, _ = _apply(_layer(group_size=18), x)
  assert not np.allclose(whole, y0)


def test_bfloat16_compute_keeps_router_in_float32():
  layer32 = _layer(top_k=2)
  layer16 = _layer(top_k=2, dtype="bfloat16")
  x = _x()
  assert layer16.router.kernel[...].dtype == jnp.float32
  logits = layer16.router(x.astype(jnp.bfloat16).reshape(2, 8, 8), deterministic=True)
  assert logits.dtype == jnp.float32
  y32, aux32 = _apply(layer32, x)
  y16, aux16 = _apply(layer16, x)
  assert y16.dtype == jnp.bfloat16
  assert aux16.aux_loss.dtype == jnp.float32
  # The router sees the same f32 tokens in both layers, so every routing decision (and
  # with it every loss and metric) is identical; only the experts run in bfloat16.
  grouped = x.reshape(2, 8, 8)
  out32, out16 = (layer.route(layer.router(grouped, deterministic=False), 16,
                              deterministic=False) for layer in (layer32, layer16))
  for name in ("expert_index", "position", "kept", "gates"):
    np.testing.assert_array_equal(getattr(out16, name), getattr(out32, name), name)
  assert float(aux16.aux_loss) == float(aux32.aux_loss)
  assert float(aux16.z_loss) == float(aux32.z_loss)
  np.testing.assert_array_equal(aux16.metrics["expert_load"], aux32.metrics["expert_load"])
  # Values: tokens dropped in f32 are exactly 0 in bf16 too; the rest agree to a few
  # bf16 roundings (eps 2**-8) of the output's scale. An all-zero output is off by
  # 256 eps.
  y16 = np.asarray(y16, np.float32).reshape(16, 8)
  y32 = np.asarray(y32).reshape(16, 8)
  np.testing.assert_array_equal(np.all(y16 == 0, -1), np.all(y32 == 0, -1))
  scale = np.abs(y32).max()
  assert scale > 0.01  # the layer is not silent
  # Measured on CPU: max error 2.0 eps*scale, relative norm error 1.3 eps.
  np.testing.assert_allclose(y16, y32, rtol=0, atol=6 * 2**-8 * scale)
  assert np.linalg.norm(y16 - y32) <= 3 * 2**-8 * np.linalg.norm(y32)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_every_activation_matches_per_token_loop(activation, dispatch):
  layer = _layer(activation=activation, top_k=2, dispatch=dispatch)
  layer.router.kernel[...] = layer.router.kernel[...] * 20
  x = _x()
  y, _ = _apply(layer, x)
  assert (layer.experts.wi_gate is not None) == (activation == "swiglu")
  ref = _reference(layer, x, layer.capacity(8, deterministic=False))
  assert np.abs(ref).max() > 0.01
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), ref, rtol=1e-4, atol=1e-5)


def test_expert_dropout_only_in_training():
  layer = _layer(expert_dropout=0.5)
  x = _x()
  layer.eval()
  y1, _ = _apply(layer, x)
  y2, _ = _apply(layer, x)
  np.testing.assert_array_equal(y1, y2)
  layer.train()
  y3, _ = _apply(layer, x)
  assert not np.allclose(y1, y3)


def test_init_scale_follows_switch():
  # Truncated normal with variance 0.1 / fan_in: std of wi ~ sqrt(.1 / M).
  layer = MoeLayer(MoeConfig(d_model=256, d_ff=512, num_experts=4, init_scale=0.1),
                   rngs=nnx.Rngs(0))
  std = float(jnp.std(layer.experts.wi[...]))
  assert std == pytest.approx((0.1 / 256) ** 0.5, rel=0.05)
  std = float(jnp.std(layer.experts.wo[...]))
  assert std == pytest.approx((0.1 / 512) ** 0.5, rel=0.05)


def test_aux_matches_routing_of_the_same_logits():
  layer = _layer(top_k=2)
  x = _x()
  _, aux = _apply(layer, x)
  logits = jnp.einsum("GSM,ME->GSE", x.reshape(2, 8, 8), layer.router.kernel[...])
  out = routing.route(logits, top_k=2, capacity=layer.capacity(8, False))
  assert float(aux.aux_loss) == pytest.approx(float(out.aux_loss), rel=1e-6)
  assert float(aux.z_loss) == pytest.approx(float(out.z_loss), rel=1e-6)
  for key in ("dropped_fraction", "router_confidence"):
    assert float(aux.metrics[key]) == pytest.approx(float(out.metrics[key]), rel=1e-6)
  assert aux.metrics["expert_load"].shape == (4,)


_GOOD = dict(d_model=8, d_ff=16, num_experts=4)


@pytest.mark.parametrize("override, key", [
    (dict(top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(second_policy="maybe"), "second_policy"),
    (dict(second_policy="random", second_threshold=0.0), "second_threshold"),
    (dict(group_size=-1), "group_size"),
    (dict(router_init_scale=0.0), "router_init_scale"),
    (dict(d_model=0), "d_model"),
    (dict(activation="tanh"), "activation"),
    (dict(dtype="int8"), "dtype"),
    (dict(dispatch="magic"), "dispatch"),
    (dict(jitter_noise=1.5), "jitter_noise"),
    (dict(expert_dropout=1.0), "expert_dropout"),
    (dict(router="switch"), "router"),
    (dict(score_fn="relu"), "score_fn"),
    (dict(expert_groups=3, top_groups=1), "expert_groups"),
    (dict(expert_groups=2), "top_groups"),
    (dict(expert_groups=2, top_groups=0), "top_groups"),
    (dict(expert_groups=4, top_groups=1, top_k=2), "top_k"),
    (dict(gate_scale=-1.0), "gate_scale"),
    (dict(balance_choices="second"), "balance_choices"),
    (dict(bias_update_rate=float("nan")), "bias_update_rate"),
    (dict(num_shared_experts=-2), "num_shared_experts"),
    (dict(noise_anneal_steps=-1), "noise_anneal_steps"),
    (dict(router="noisy_topk", score_fn="sigmoid"), "score_fn"),
    (dict(router="noisy_topk", second_policy="threshold"), "second_policy"),
    (dict(router="expert_choice", top_k=2), "top_k"),
    (dict(router="expert_choice", bias_update_rate=1e-3), "bias_update_rate"),
    (dict(router="expert_choice", dispatch="dropless"), "dropless"),
    (dict(dispatch="dropless", grouped_matmul="megablocks"), "grouped_matmul"),
    (dict(dispatch="indices", grouped_matmul="tiled"), "grouped_matmul"),
    (dict(noise_anneal_steps=10), "noise_anneal_steps"),
])
def test_moe_config_validation(override, key):
  with pytest.raises(ValueError, match=key):
    MoeConfig(**{**_GOOD, **override})


def test_validate_moe_config_lists_every_problem():
  good = MoeConfig(**_GOOD)
  assert validate_moe_config(good) == []
  # MoeConfig is frozen and validates itself; a duck-typed object stands in for an
  # ml_collections.ConfigDict.
  class Duck:
    pass

  duck = Duck()
  for f in dataclasses.fields(good):
    setattr(duck, f.name, getattr(good, f.name))
  duck.top_k, duck.capacity_factor = 9, 0
  errors = validate_moe_config(duck)
  assert len(errors) == 2
  assert any("top_k=9" in e for e in errors)
  assert any("capacity_factor=0" in e for e in errors)


def test_auto_dispatch_resolves_per_backend():
  from moe_jax.layers.dispatch import resolve_dispatch
  assert resolve_dispatch("auto", "tpu") == "einsum"
  assert resolve_dispatch("auto", "cpu") == "indices"
  assert resolve_dispatch("auto", "gpu") == "indices"
  assert resolve_dispatch("einsum", "cpu") == "einsum"
  assert resolve_dispatch("dropless", "tpu") == "dropless"
  assert MoeConfig(**_GOOD).dispatch == "auto"


# ---------------------------------------------------------------------------------
# Router zoo: every family through every dispatch path, against the per-token loop.
# ---------------------------------------------------------------------------------

from moe_jax.layers.router_families import ROUTERS, SelectionBias  # noqa: E402

# name -> MoeConfig overrides. E = 4, S = 8, capacity_factor 1.0 -> C = 2, so the
# capacity paths drop tokens and dropless does not.
ROUTER_CASES = {
    "switch": dict(top_k=1),
    "mixtral": dict(top_k=2, activation="swiglu", balance_choices="all"),
    # Sigmoid scores, selection bias, two groups of two experts (one kept), gate
    # scale, one shared expert: every DeepSeek knob at once.
    "deepseek": dict(top_k=2, score_fn="sigmoid", bias_update_rate=1e-3,
                     expert_groups=2, top_groups=1, gate_scale=2.5, num_shared_experts=1,
                     activation="gelu", balance_choices="all"),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "expert_choice": dict(router="expert_choice"),
}
BIAS = np.array([0.3, -0.2, 0.0, 0.25], np.float32)


def _zoo_layer(case, dispatch="einsum", **kw):
  layer = _layer(**{**ROUTER_CASES[case], **kw}, dispatch=dispatch)
  scale = 3.0 if case == "deepseek" else 10.0  # sigmoid saturates (ties) beyond ~10
  layer.router.kernel[...] = layer.router.kernel[...] * scale
  if layer.selection_bias is not None:
    layer.selection_bias[...] = jnp.asarray(BIAS)
  if layer.router.noise_kernel is not None:
    layer.router.noise_kernel[...] = 0.5 * jax.random.normal(jax.random.key(7), (8, 4))
  return layer


def _zoo_reference(layer, x, deterministic=False, noise=None, noise_scale=1.0):
  cfg = layer.cfg
  e = layer.experts
  gate = lambda m: None if m.wi_gate is None else m.wi_gate[...]  # noqa: E731
  kwargs = {}
  if cfg.router == "topk":
    kwargs = dict(score_fn=cfg.score_fn, gate_scale=cfg.gate_scale,
                  expert_groups=cfg.expert_groups, top_groups=cfg.top_groups,
                  selection_bias=(None if layer.selection_bias is None
                                  else layer.selection_bias[...]))
  elif cfg.router == "noisy_topk":
    kwargs = dict(noise_kernel=layer.router.noise_kernel[...], noise=noise,
                  noise_scale=noise_scale)
  shared = None
  if layer.shared_experts is not None:
    m = layer.shared_experts
    shared = (m.wi[...], m.wo[...], gate(m))
  return moe_layer_loop(
      x.reshape(-1, 8), layer.router.kernel[...], e.wi[...], e.wo[...],
      wi_gate=gate(e), top_k=cfg.top_k, capacity=layer.capacity(8, deterministic),
      group_size=8, activation=cfg.activation, router=cfg.router, shared=shared,
      **kwargs)


def _routing_key(layer):
  """The key the layer's next routing draw uses (nnx.Rngs(0): the default stream)."""
  return nnx.clone(layer.rngs).routing()


# Every (router case, dispatch) pair the layer accepts: expert choice has a capacity by
# construction, so it has no dropless pair (the layer refuses it, tested elsewhere).
@pytest.mark.parametrize("case,dispatch", [
    (case, dispatch) for case, kw in ROUTER_CASES.items()
    for dispatch in ("einsum", "indices", "dropless")
    if dispatch != "dropless" or ROUTERS[kw.get("router", "topk")].dropless])
def test_every_router_matches_per_token_loop(case, dispatch):
  layer = _zoo_layer(case, dispatch)
  x = _x()
  noise = None
  if layer.cfg.router == "noisy_topk":
    noise = jax.random.normal(_routing_key(layer), (2, 8, 4), jnp.float32)
  y, aux = _apply(layer, x)
  ref = _zoo_reference(layer, x, noise=noise)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), ref, rtol=1e-4, atol=1e-5)
  if dispatch != "dropless":  # the capacity of 2 of 8 tokens drops some
    assert float(aux.metrics["dropped_fraction"]) > 0
  assert aux.metrics["choice_counts"].shape == (4,)


def test_selection_bias_changes_choices_and_the_reference_sees_it():
  # Guards the test above: with the bias zeroed the deepseek case routes differently.
  x = _x()
  with_bias = _apply(_zoo_layer("deepseek"), x)[0]
  layer = _zoo_layer("deepseek")
  layer.selection_bias[...] = jnp.zeros(4)
  without = _apply(layer, x)[0]
  assert not np.allclose(with_bias, without, atol=1e-3)


def test_dropped_token_gets_exactly_the_shared_experts_output():
  # capacity 1 of 8 tokens, every token prefers expert 0: tokens 1..7 of each group are
  # dropped, and their output is the shared experts' alone.
  layer = _layer(num_shared_experts=2, capacity_factor=0.25)
  kernel = np.zeros((8, 4), np.float32)
  kernel[:, 0] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)
  x = jnp.abs(_x()) + 0.1
  y, aux = _apply(layer, x)
  assert float(aux.metrics["dropped_fraction"]) == pytest.approx(14 / 16)
  assert layer.shared_experts.wi[...].shape == (8, 2 * 16)  # 2 x d_ff wide
  shared = layer.shared_experts(x)
  np.testing.assert_array_equal(np.asarray(y)[:, 1:], np.asarray(shared)[:, 1:])
  assert not np.allclose(y[:, 0], shared[:, 0])


def test_noisy_router_noise_is_learned_zero_init_and_training_only():
  layer = _layer(router="noisy_topk", top_k=2)
  assert layer.router.noise_kernel is not None
  np.testing.assert_array_equal(layer.router.noise_kernel[...], np.zeros((8, 4)))
  # softplus(0) + 1e-2 = log 2 + 0.01 everywhere.
  std = layer.router.noise_std(_x().reshape(2, 8, 8))
  np.testing.assert_allclose(std, np.full((2, 8, 4), np.log(2) + 0.01), rtol=1e-6)
  layer = _zoo_layer("noisy_topk")
  x = _x()
  layer.eval()  # no noise: the clean logits, eval capacity
  y, aux = _apply(layer, x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8),
                             _zoo_reference(layer, x, deterministic=True),
                             rtol=1e-4, atol=1e-5)
  layer.train()
  y1, _ = _apply(layer, x)
  y2, _ = _apply(layer, x)
  assert not np.allclose(y1, y2)  # a fresh draw each call


def test_noisy_router_gets_gradient_through_the_noise():
  layer = _zoo_layer("noisy_topk")

  def loss_fn(model):
    y, aux = model(_x())
    return jnp.sum(y ** 2) + aux.aux_loss

  grads = nnx.jit(nnx.grad(loss_fn))(layer)
  assert float(jnp.abs(grads.router.noise_kernel[...]).sum()) > 0


@pytest.mark.parametrize("step, scale", [(0, 1.0), (5, 0.5), (10, 0.0), (25, 0.0)])
def test_noise_anneals_with_the_training_step(step, scale):
  # noise_anneal_steps = 10: noise x max(0, 1 - step / 10).
  layer = _zoo_layer("noisy_topk", noise_anneal_steps=10)
  layer.training_step[...] = jnp.asarray(step, jnp.int32)
  assert float(layer.noise_scale()) == scale
  x = _x()
  noise = jax.random.normal(_routing_key(layer), (2, 8, 4), jnp.float32)
  y, aux = _apply(layer, x)
  ref = _zoo_reference(layer, x, noise=noise if scale else None, noise_scale=scale)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), ref, rtol=1e-4, atol=1e-5)
  assert np.isfinite(float(aux.aux_loss))


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_every_router_runs_in_bfloat16(case):
  layer16 = _zoo_layer(case, dtype="bfloat16")
  layer32 = _zoo_layer(case)
  layer16.eval()
  layer32.eval()
  x = _x()
  y16, aux16 = _apply(layer16, x)
  y32, _ = _apply(layer32, x)
  assert y16.dtype == jnp.bfloat16 and aux16.aux_loss.dtype == jnp.float32
  assert layer16.router.kernel[...].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("case, causal, kw", [
    ("switch", True, {}), ("deepseek", True, {"queue_order": "token_major"}),
    ("noisy_topk", True, {"queue_order": "token_major"}), ("expert_choice", False, {})])
def test_is_causal_says_whether_later_tokens_change_earlier_outputs(case, causal, kw):
  layer = _zoo_layer(case, **kw)
  layer.eval()
  assert layer.is_causal == causal
  # Top-2 queued choice-major (MoeConfig's default) with a capacity is not causal;
  # tests/test_queue_order.py shows the leak in a model.
  if kw:
    assert _zoo_layer(case).is_causal is False
  x = _x((1, 8, 8))
  later = x.at[0, 5:].set(-3.0 * x[0, 5:])
  y, _ = _apply(layer, x)
  y_later, _ = _apply(layer, later)
  assert np.allclose(y[0, :5], y_later[0, :5], atol=1e-6) == causal


def test_batch_priority_is_not_causal():
  assert _layer(batch_priority=True).is_causal is False


def test_selection_bias_is_state_not_a_parameter_and_gets_no_gradient():
  layer = _zoo_layer("deepseek")
  assert isinstance(layer.selection_bias, SelectionBias)
  assert not isinstance(layer.selection_bias, nnx.Param)
  assert layer.selection_bias[...].dtype == jnp.float32
  params = nnx.state(layer, nnx.Param)
  assert "selection_bias" not in params
  x = _x()

  def loss_fn(model):
    y, aux = model(x)
    return jnp.sum(jnp.sin(y)) + aux.aux_loss + aux.z_loss

  # Differentiating with respect to the bias on purpose: the bias only reorders the
  # choices, so the gradient is exactly zero (and it never enters nnx.grad by default).
  grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, SelectionBias)))(layer)
  np.testing.assert_array_equal(grads.selection_bias[...], np.zeros(4))
  default = nnx.jit(nnx.grad(loss_fn))(layer)
  assert "selection_bias" not in nnx.state(default)
  assert float(jnp.abs(default.router.kernel[...]).sum()) > 0


def test_selection_bias_update_rule():
  layer = _layer(top_k=2, bias_update_rate=0.01)
  np.testing.assert_array_equal(layer.selection_bias[...], np.zeros(4))
  # counts 5, 1, 2, 0: mean 2 -> sign(2 - c) = -1, +1, 0, +1.
  layer.update_selection_bias(jnp.array([5.0, 1.0, 2.0, 0.0]))
  np.testing.assert_allclose(layer.selection_bias[...], [-0.01, 0.01, 0.0, 0.01])
  layer.update_selection_bias(jnp.array([2.0, 2.0, 2.0, 2.0]))  # balanced: unchanged
  np.testing.assert_allclose(layer.selection_bias[...], [-0.01, 0.01, 0.0, 0.01])
  plain = _layer()
  assert plain.selection_bias is None
  plain.update_selection_bias(jnp.ones(4))  # no bias: nothing to do


def _load_cv(counts):
  counts = np.asarray(counts, np.float64)
  return float(counts.std() / counts.mean())


def test_selection_bias_balances_a_skewed_router():
  # 8 experts, top-2 of sigmoid scores, 256 tokens. The router kernel adds 1.5 to the
  # logit of expert 0 and 1.0 to that of expert 1 for every token (a constant input
  # feature), so without a bias they take most of the choices. 100 steps of the
  # DeepSeek-V3 update at rate 0.02 (fixed tokens, fixed router) even the load out.
  layer = _layer(d_model=8, num_experts=8, top_k=2, score_fn="sigmoid",
                 bias_update_rate=0.02, group_size=256, capacity_factor=8.0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 256, 8)).astype(np.float32)
  x[..., 0] = 1.0
  kernel = rng.normal(size=(8, 8)).astype(np.float32) * 0.5
  kernel[0] = [1.5, 1.0, 0, 0, 0, 0, 0, 0]
  layer.router.kernel[...] = jnp.asarray(kernel)
  x = jnp.asarray(x)
  off = _apply(layer, x)[1].metrics["choice_counts"]
  for _ in range(100):
    counts = _apply(layer, x)[1].metrics["choice_counts"]
    layer.update_selection_bias(counts)
  on = _apply(layer, x)[1].metrics["choice_counts"]
  assert float(off.sum()) == float(on.sum()) == 512.0  # 256 tokens x 2 choices
  cv_off, cv_on = _load_cv(off), _load_cv(on)
  # Bias off: counts 161 117 51 35 52 38 48 10 (mean 64), CV 0.725.
  np.testing.assert_array_equal(off, [161, 117, 51, 35, 52, 38, 48, 10])
  # After 100 updates: 53 71 70 59 69 68 62 60, CV 0.094 (a 7.7x lower CV).
  np.testing.assert_array_equal(on, [53, 71, 70, 59, 69, 68, 62, 60])
  assert cv_off == pytest.approx(0.7249, abs=1e-4)
  assert cv_on == pytest.approx(0.0944, abs=1e-4)
