"""The decoder-only Transformer: shapes, causality, MoE placement, dtypes, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers.experts import DenseFfn
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.models.transformer import Transformer
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.sizes import count_params, flops_per_token

M, H, E, V = 16, 32, 4, 259


def config(moe_every=2, num_layers=4, top_k=1, dtype="float32", **kw):
  moe = MoeConfig(d_model=M, d_ff=H, num_experts=E, top_k=top_k, capacity_factor=2.0,
                  eval_capacity_factor=4.0, group_size=64, dtype=dtype,
                  activation="gelu", init_scale=0.1, router_init_scale=0.1)
  return TransformerConfig(vocab_size=V, num_layers=num_layers, d_model=M, num_heads=2,
                           d_ff=H, moe_every=moe_every, moe=moe, dtype=dtype,
                           max_len=32, **kw)


def make(**kw):
  return Transformer(config(**kw), rngs=nnx.Rngs(0))


def make_abstract(**kw):
  """Structure and shapes only; no arrays are computed."""
  return nnx.eval_shape(lambda: Transformer(config(**kw), rngs=nnx.Rngs(0)))


def forward(model, x):
  # Eager: the small ops compile once per shape and are shared by every test here.
  return model(x, deterministic=True)


def tokens(batch=2, length=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


@pytest.mark.parametrize("moe_every,blocks", [(0, ()), (1, (0, 1, 2, 3)), (2, (1, 3)),
                                              (3, (2,))])
def test_moe_blocks_every_moe_every(moe_every, blocks):
  model = make_abstract(moe_every=moe_every)
  assert model.cfg.moe_blocks == blocks
  for i, block in enumerate(model.blocks):
    assert isinstance(block.ffn, MoeLayer if i in blocks else DenseFfn)
  if moe_every in (1, 3):
    return  # placement only; the forward pass is covered by the other cases
  logits, aux = forward(make(moe_every=moe_every), tokens())
  assert logits.shape == (2, 16, V) and logits.dtype == jnp.float32
  assert tuple(sorted(aux)) == blocks
  for a in aux.values():
    assert a.metrics["expert_load"].shape == (E,)


@pytest.mark.parametrize("moe_every,position", [(2, "rotary"), (1, "learned")])
def test_future_tokens_do_not_change_past_logits(moe_every, position):
  # MoE queues are position-ordered and capacity here is ample, so routing is causal.
  model = make(moe_every=moe_every, position=position, num_layers=2)
  a = tokens(batch=1)
  b = a.at[0, 10:].set((a[0, 10:] + 7) % 256)
  la, _ = forward(model, a)
  lb, _ = forward(model, b)
  np.testing.assert_allclose(la[0, :10], lb[0, :10], atol=1e-5)
  assert not np.allclose(la[0, 10:], lb[0, 10:])


def test_bfloat16_compute_keeps_router_params_and_logits_float32():
  model = make(dtype="bfloat16", num_layers=2)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32  # parameters stay float32
  router = model.blocks[1].ffn.router  # block 1 is the MoE block
  x = jnp.ones((1, 8, M), jnp.bfloat16)
  assert router(x, deterministic=True).dtype == jnp.float32
  logits, aux = forward(model, tokens())
  assert logits.dtype == jnp.float32
  assert aux[1].aux_loss.dtype == jnp.float32
  ref, _ = forward(make(dtype="float32", num_layers=2), tokens())
  np.testing.assert_allclose(logits, ref, atol=0.15, rtol=0.05)


def test_params_carry_logical_axes():
  model = make_abstract()
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and "ffn" not in path:
      names = var.get_metadata("logical_axes", None)
      assert names is not None and len(names) == var.get_value().ndim, path


def test_param_counts_from_the_modules():
  model = make_abstract(moe_every=2, num_layers=2, tie_embeddings=True)
  counts = count_params(model)
  attn = 4 * M * M
  dense_ffn = 2 * M * H
  experts = E * 2 * M * H
  router = M * E
  norms = 2 * 2 * M + M  # two per block, one final
  assert counts["total"] == V * M + 2 * attn + dense_ffn + experts + router + norms
  assert counts["experts"] == experts
  assert counts["router"] == router
  assert counts["active"] == counts["total"] - experts + experts // E  # top-1
  top2 = count_params(make_abstract(moe_every=2, num_layers=2, top_k=2))  # untied: + V*M
  assert top2["total"] == counts["total"] + V * M
  assert top2["active"] == top2["total"] - experts + 2 * experts // E


def test_flops_per_token_switch_equals_dense():
  length = 16
  dense = flops_per_token(make_abstract(moe_every=0), length)
  switch = flops_per_token(make_abstract(moe_every=2), length)
  top2 = flops_per_token(make_abstract(moe_every=2, top_k=2), length)
  assert switch["active"] == dense["active"]
  # 2 FLOPs per multiply-add: per block 4 M^2 projections + 2 M H FFN + 4 L M attention.
  per_block = 2 * (4 * M * M + 2 * M * H) + 4 * length * M
  assert dense["active"] == 4 * per_block + 2 * M * V
  assert switch["total"] - dense["total"] == 2 * (E - 1) * 2 * 2 * M * H
  assert top2["active"] - switch["active"] == 2 * 2 * 2 * M * H
  assert switch["router"] == 2 * 2 * M * E and dense["router"] == 0


def _zoo_config(**moe_kw):
  moe_kw = {"init_scale": 0.1, "router_init_scale": 0.1, **moe_kw}
  moe = MoeConfig(d_model=M, d_ff=H // 4, num_experts=E, capacity_factor=2.0,
                  group_size=64, activation="gelu", **moe_kw)
  return TransformerConfig(vocab_size=V, num_layers=2, d_model=M, num_heads=2, d_ff=H,
                           moe_every=2, moe=moe, max_len=32, tie_embeddings=True)


def test_counts_include_shared_experts_and_fine_grained_widths():
  # Experts of width H / 4 = 8; top-3 plus one shared expert of width 8 use
  # 3 * 8 + 8 = 32 = H hidden units per token, the dense FFN's.
  model = nnx.eval_shape(lambda: Transformer(
      _zoo_config(top_k=3, num_shared_experts=1), rngs=nnx.Rngs(0)))
  dense = make_abstract(moe_every=0, num_layers=2, tie_embeddings=True)
  counts, dense_counts = count_params(model), count_params(dense)
  experts = E * 2 * M * (H // 4)  # 4 * 2 * 16 * 8 = 1024
  shared = 2 * M * (H // 4)  # 256
  router = M * E
  assert counts["experts"] == experts and counts["router"] == router
  assert counts["total"] == (dense_counts["total"] - 2 * M * H + experts + shared
                             + router)
  assert counts["active"] == counts["total"] - experts + 3 * experts // E
  f, dense_f = flops_per_token(model, 16), flops_per_token(dense, 16)
  assert f["active"] == dense_f["active"]  # 2 x (3/4 of 1024 + 256) = 2 x 2 M H
  assert f["total"] == dense_f["total"] - 2 * 2 * M * H + 2 * (experts + shared)
  assert f["router"] == 2 * router


def test_counts_of_noisy_and_expert_choice_routers():
  noisy = count_params(nnx.eval_shape(lambda: Transformer(
      _zoo_config(router="noisy_topk", top_k=2), rngs=nnx.Rngs(0))))
  assert noisy["router"] == 2 * M * E  # W_g and W_noise
  # Expert choice at capacity factor 2: a token visits 2 experts on average.
  ec_model = nnx.eval_shape(lambda: Transformer(_zoo_config(router="expert_choice"),
                                                rngs=nnx.Rngs(0)))
  ec = count_params(ec_model)
  assert ec_model.blocks[1].ffn.experts_per_token == 2.0
  assert ec["active"] == ec["total"] - ec["experts"] + 2 * ec["experts"] // E
