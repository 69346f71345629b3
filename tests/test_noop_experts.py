"""MoDE's no-op experts (moe.noop_experts; moe_jax/routing/noop.py): routing by hand,
the layer against the loop reference, every dispatch path, capacities and counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeConfig, MoeLayer, routing
from moe_jax.layers.dispatch import gather_dispatch
from moe_jax.models.transformer import Transformer
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.sizes import count_params, flops_per_token
from tests.reference import moe_layer_loop

M, H = 8, 16


def test_no_op_choices_by_hand():
  # 4 tokens, E = 2 real experts + N = 1 no-op expert (index 2), top-1. The largest
  # logit picks: t0 -> e0, t1 -> no-op, t2 -> no-op, t3 -> e1.
  logits = jnp.log(jnp.array([[[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7],
                               [0.1, 0.6, 0.3]]]))
  out = routing.route(logits, top_k=1, capacity=2)
  cut = routing.split_noop_experts(out, num_experts=2, capacity=2, noop_capacity=1)
  assert cut.num_experts == 2 and cut.capacity == 2 and cut.noop_experts == 1
  # No-op choices are never kept for dispatch and have gate 0; real ones are kept.
  np.testing.assert_array_equal(cut.kept[0, :, 0], [True, False, False, True])
  np.testing.assert_allclose(cut.gates[0, :, 0], [0.8, 0.0, 0.0, 0.6], rtol=1e-6)
  assert cut.dispatch_mask.shape == (1, 4, 2, 2)  # [G, S, E, C]: no no-op buffers
  m = cut.metrics
  # Load counts all E + N: first choices e0, e1 and twice the no-op expert.
  np.testing.assert_allclose(m["expert_load"], [0.25, 0.25, 0.5])
  # The no-op expert holds 1 slot: t1 takes it (kept by choice, it skips the layer),
  # t2 arrives second and is dropped. Fill: e0 1/2, e1 1/2, no-op 1/1.
  assert float(m["noop_fraction"]) == pytest.approx(0.25)
  assert float(m["dropped_fraction"]) == pytest.approx(0.25)
  np.testing.assert_allclose(m["expert_fill"], [0.5, 0.5, 1.0])
  # With no no-op expert, nothing changes.
  plain = routing.route(logits[..., :2], top_k=1, capacity=2)
  assert routing.split_noop_experts(plain, num_experts=2, capacity=2,
                                    noop_capacity=7) is plain


def _layer(dispatch="einsum", **kw):
  kw = {"capacity_factor": 2.0, "init_scale": 0.1, **kw}
  cfg = MoeConfig(d_model=M, d_ff=H, num_experts=4, noop_experts=4, group_size=8,
                  min_capacity=1, router_init_scale=10.0, dispatch=dispatch, **kw)
  return MoeLayer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_the_loop_reference_with_zero_experts(top_k):
  # The loop reference routes over E + N experts whose last N have zero weights: a
  # no-op choice then adds 0, kept or not, which is the contract.
  layer = _layer(top_k=top_k)
  x = jax.random.normal(jax.random.key(0), (2, 8, M))
  y, aux = layer(x, deterministic=False)
  capacity = layer.capacity(8, deterministic=False)  # ceil(2.0 * 8 / 8) = 2
  assert capacity == 2
  zeros = np.zeros((4, M, H), np.float32)
  wi = np.concatenate([np.asarray(layer.experts.wi[...]), zeros])
  wo = np.concatenate([np.asarray(layer.experts.wo[...]), zeros.transpose(0, 2, 1)])
  want = moe_layer_loop(np.asarray(x).reshape(16, M),
                        np.asarray(layer.router.kernel[...]), wi, wo, top_k=top_k,
                        capacity=capacity, group_size=8)
  np.testing.assert_allclose(np.asarray(y).reshape(16, M), want, rtol=1e-4, atol=1e-5)
  assert aux.metrics["expert_load"].shape == (8,)
  assert 0 < float(aux.metrics["noop_fraction"]) < 1


def test_tokens_that_choose_a_no_op_expert_get_exactly_zero_on_every_path():
  x = jax.random.normal(jax.random.key(1), (2, 8, M))
  outs = {}
  for dispatch in ("einsum", "indices", "dropless"):
    layer = _layer(dispatch, eval_capacity_factor=8.0)  # C = S: no drop
    y, aux = layer(x, deterministic=True)
    outs[dispatch] = np.asarray(y)
  layer = _layer(eval_capacity_factor=8.0)
  # Few tokens at a decode step gather the chosen experts' weights; no-op indices
  # (>= E) must not read out of range (which would give NaN, and NaN * 0 = NaN).
  y, _ = layer(x, deterministic=True, group_size=8, capacity=8,
               dispatcher=gather_dispatch)
  outs["gather"] = np.asarray(y)
  logits = layer.router(x.reshape(2, 8, M), deterministic=True)
  noop = np.asarray(jnp.argmax(logits, -1) >= 4)  # top-1: the first choice
  assert noop.any() and not noop.all()
  for name, y in outs.items():
    assert np.all(y[noop] == 0.0), name
    assert np.all(np.abs(y[~noop]).sum(-1) > 0), name
    np.testing.assert_allclose(y, outs["einsum"], rtol=1e-5, atol=1e-6, err_msg=name)


def test_capacity_is_the_share_over_real_and_no_op_experts():
  layer = _layer()  # E = 4, N = 4, cf 2.0, eval cf 2.0, min_capacity 1
  assert layer.capacity(32, deterministic=False) == 8  # ceil(2 * 32 / 8)
  assert layer.noop_capacity(32) == 32  # None: no limit
  assert _layer(noop_capacity_factor=0.5).noop_capacity(32) == 2  # ceil(.5 * 32 / 8)
  assert layer.router.kernel.shape == (M, 8)
  biased = _layer(bias_update_rate=1e-3)
  assert biased.selection_bias.shape == (8,)  # DeepSeek-V3's bias over all E + N


def test_counts_with_no_op_experts_by_hand():
  moe = MoeConfig(d_model=M, d_ff=H, num_experts=4, noop_experts=4, group_size=0,
                  capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
  cfg = TransformerConfig(vocab_size=32, num_layers=2, d_model=M, num_heads=2, d_ff=H,
                          moe_every=2, moe=moe, max_len=16)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  counts = count_params(model)
  experts = 4 * 2 * M * H  # 1024
  assert counts["router"] == M * 8
  # top-1 of E + N = 8: a token uses 1/8 of the experts on a balanced router.
  assert counts["active"] == counts["total"] - experts + experts // 8
  f = flops_per_token(model, 16)
  assert f["total"] - f["active"] == 2 * (experts - experts // 8)
  assert f["router"] == 2 * M * 8
