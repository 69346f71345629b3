"""MoeLayer against a slow loop reference, plus training/eval behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeConfig, MoeLayer, routing
from moe_jax.moe_layer import validate_moe_config
from tests.reference import moe_layer_loop


@nnx.jit
def _apply(layer, x):
  return layer(x)


def _layer(**kw):
  base = dict(d_model=8, d_ff=16, num_experts=4, top_k=1, capacity_factor=1.0,
              eval_capacity_factor=2.0, group_size=8, min_capacity=1)
  base.update(kw)
  return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(0))


def _x(shape=(2, 8, 8), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "dropless"])
@pytest.mark.parametrize("top_k, capacity_factor", [(1, 0.5), (1, 1.0), (1, 4.0),
                                                    (2, 0.5), (2, 1.0), (2, 2.0)])
def test_layer_matches_per_token_loop(dispatch, top_k, capacity_factor):
  layer = _layer(top_k=top_k, capacity_factor=capacity_factor, dispatch=dispatch)
  # Scale up the router so that the experts' choices are well separated.
  layer.router.kernel[...] = layer.router.kernel[...] * 20
  x = _x()
  y, _ = _apply(layer, x)
  capacity = layer.capacity(8, deterministic=False)  # dropless: C = S = 8
  assert (capacity == 8) == (dispatch == "dropless" or capacity_factor == 4.0)
  ref = moe_layer_loop(x.reshape(-1, 8), layer.router.kernel[...],
                       layer.experts.wi[...], layer.experts.wo[...], top_k=top_k,
                       capacity=capacity, group_size=8)
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
  # Fewer tokens than group_size: one group of B*L tokens, no padding.
  layer = _layer(group_size=1024)
  y, _ = _apply(layer, _x((1, 3, 8)))
  assert y.shape == (1, 3, 8)


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
  # Same routing decisions (router in f32 on the same inputs up to bf16 input cast).
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_other_activations(activation):
  layer = _layer(activation=activation)
  y, _ = _apply(layer, _x())
  assert y.shape == (2, 8, 8) and bool(jnp.all(jnp.isfinite(y)))
  assert (layer.experts.wi_gate is not None) == (activation == "swiglu")


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
  layer = MoeLayer(MoeConfig(d_model=256, d_ff=512, num_experts=4), rngs=nnx.Rngs(0))
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
  from moe_jax.moe_layer import resolve_dispatch
  assert resolve_dispatch("auto", "tpu") == "einsum"
  assert resolve_dispatch("auto", "cpu") == "indices"
  assert resolve_dispatch("auto", "gpu") == "indices"
  assert resolve_dispatch("einsum", "cpu") == "einsum"
  assert resolve_dispatch("dropless", "tpu") == "dropless"
  assert MoeConfig(**_GOOD).dispatch == "auto"
