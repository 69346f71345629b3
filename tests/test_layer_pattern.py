"""The layer pattern (moe_jax.models.layer_pattern) and the hybrid models built from
it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers.experts import DenseFfn
from moe_jax.models.layer_pattern import layer_pattern, pattern_errors
from moe_jax.models.mamba import MambaConfig, MambaMixer, mixer_cost
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.models.block import MIXERS, Attention
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.transformer import Transformer
from moe_jax.models.sizes import count_params, flops_per_token

A, M = "attention", "mamba"
d, e = "dense", "moe"

# (num_layers, attn_layer_period, attn_layer_offset, moe_every, moe_offset) -> blocks.
HAND = [
    # Defaults: a plain Transformer.
    ((4, 1, 0, 0, None), [(A, d), (A, d), (A, d), (A, d)]),
    # Switch: moe_every 2, offset None = 1 -> blocks 1, 3.
    ((4, 1, 0, 2, None), [(A, d), (A, e), (A, d), (A, e)]),
    # Jamba (Lieber et al. 2024): attention at i % 8 == 4, MoE at i % 2 == 1.
    ((8, 8, 4, 2, 1), [(M, d), (M, e), (M, d), (M, e), (A, d), (M, e), (M, d), (M, e)]),
    # Two Jamba blocks: attention at 4 and 12 (12 % 8 = 4).
    ((16, 8, 4, 2, 1), [(M, d), (M, e), (M, d), (M, e), (A, d), (M, e), (M, d), (M, e)] * 2),
    # Attention at 0, 2, 4 (i % 2 == 0); MoE at 2, 5 (i % 3 == None -> 3 - 1 = 2).
    ((6, 2, 0, 3, None), [(A, d), (M, d), (A, e), (M, d), (A, d), (M, e)]),
    # Attention at 1, 4 (i % 3 == 1); MoE in every block (offset None -> 0).
    ((6, 3, 1, 1, None), [(M, e), (A, e), (M, e), (M, e), (A, e), (M, e)]),
    # MoE at 0, 3 (i % 3 == 0); attention nowhere (period 5, offset 4 > last index 3).
    ((4, 5, 4, 3, 0), [(M, e), (M, d), (M, d), (M, e)]),
]


@pytest.mark.parametrize("keys,expected", HAND, ids=[str(k) for k, _ in HAND])
def test_pattern_against_a_hand_list(keys, expected):
  num_layers, period, offset, every, moe_offset = keys
  got = layer_pattern(num_layers, attn_layer_period=period, attn_layer_offset=offset,
                      moe_every=every, moe_offset=moe_offset)
  assert list(got) == expected
  assert pattern_errors(*keys) == []


def test_moe_offset_none_keeps_the_rule_from_before_the_offset():
  for every in range(0, 7):
    got = [k.ffn == e for k in layer_pattern(6, moe_every=every)]
    assert got == [every > 0 and (i + 1) % every == 0 for i in range(6)], every


def test_first_dense_layers_keep_the_first_blocks_dense():
  # DeepSeekMoE 16B: block 0 dense, every later block MoE (first_k_dense_replace=1).
  assert [k.ffn for k in layer_pattern(4, moe_every=1, moe_offset=0,
                                       first_dense_layers=1)] == [d, e, e, e]
  # With moe_every=2 the rule still picks the blocks: 1 falls in the prefix.
  assert [k.ffn for k in layer_pattern(6, moe_every=2, first_dense_layers=2)] == [
      d, d, d, e, d, e]
  assert pattern_errors(4, 1, 0, 1, 0, first_dense_layers=1) == []
  errors = pattern_errors(4, 1, 0, 1, 0, first_dense_layers=4, prefix="model.")
  assert len(errors) == 1 and "model.first_dense_layers=4" in errors[0], errors
  errors = pattern_errors(4, 1, 0, 1, 0, first_dense_layers=-1, prefix="model.")
  assert len(errors) == 1 and "model.first_dense_layers=-1 must be" in errors[0], errors
  # The model builds a dense FFN of width d_ff in the prefix, experts of moe.d_ff after.
  cfg = TransformerConfig(vocab_size=V, num_layers=3, d_model=DM, num_heads=2, d_ff=48,
                          moe_every=1, moe_offset=0, first_dense_layers=1,
                          moe=MoeConfig(d_model=DM, d_ff=8, num_experts=4))
  assert cfg.moe_blocks == (1, 2)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assert isinstance(model.blocks[0].ffn, DenseFfn) and model.blocks[0].ffn.wi.shape == (DM, 48)
  assert all(isinstance(model.blocks[i].ffn, MoeLayer) for i in (1, 2))


@pytest.mark.parametrize("keys,words", [
    ((8, 0, 0, 0, None), ["attn_layer_period=0", "positive"]),
    ((8, 8, 8, 0, None), ["attn_layer_offset=8", "[0, 7]"]),
    ((8, 8, -1, 0, None), ["attn_layer_offset=-1", ">= 0"]),
    ((8, 1, 0, 2, 2), ["moe_offset=2", "[0, 1]"]),
    ((8, 1, 0, 2, "1"), ["moe_offset='1'", "integer >= 0"]),
    ((3, 1, 0, 4, 3), ["moe_every=4", "places no MoE block", "num_layers=3"]),
])
def test_bad_keys_give_one_sentence_naming_value_and_fix(keys, words):
  errors = pattern_errors(*keys, prefix="model.")
  assert len(errors) == 1, errors
  for w in words:
    assert w in errors[0], errors[0]
  with pytest.raises(ValueError):
    TransformerConfig(vocab_size=8, num_layers=keys[0], d_model=16, num_heads=2,
                      d_ff=32, attn_layer_period=keys[1], attn_layer_offset=keys[2],
                      moe_every=keys[3], moe_offset=keys[4], mamba=MambaConfig(16),
                      moe=MoeConfig(d_model=16, d_ff=32, num_experts=2))


# A tiny hybrid: Mamba + dense, attention + MoE, Mamba + MoE, Mamba + dense.
DM, V, L = 16, 32, 12


def hybrid_config(**kw):
  moe = MoeConfig(d_model=DM, d_ff=32, num_experts=4, top_k=2, capacity_factor=4.0,
                  eval_capacity_factor=4.0, group_size=L,
                  init_scale=0.1, router_init_scale=0.1)
  base = dict(vocab_size=V, num_layers=4, d_model=DM, num_heads=2, d_ff=32, max_len=L,
              attn_layer_period=4, attn_layer_offset=1, moe_every=2, moe_offset=1,
              moe=moe, mamba=MambaConfig(d_model=DM, chunk_size=4), position="none")
  return TransformerConfig(**{**base, **kw})


def test_blocks_follow_the_pattern_through_the_mixer_registry():
  model = nnx.eval_shape(lambda: Transformer(hybrid_config(), rngs=nnx.Rngs(0)))
  assert model.cfg.mamba_blocks == (0, 2, 3) and model.cfg.moe_blocks == (1, 3)
  for block, (mixer, ffn) in zip(model.blocks, model.cfg.layers):
    assert isinstance(block.mixer, Attention if mixer == A else MambaMixer)
    assert block.mixer is getattr(block, MIXERS[mixer].attr)
    assert isinstance(block.ffn, MoeLayer if ffn == e else DenseFfn)
  # Attention blocks keep the all-attention model's parameter paths.
  paths = {"/".join(map(str, p)) for p, _ in nnx.state(model, nnx.Param).flat_state()}
  assert "blocks/1/attn/query" in paths and "blocks/1/attn_norm/scale" in paths
  assert "blocks/0/mamba/A_log" in paths and "blocks/0/mamba_norm/scale" in paths
  assert model.positions is None  # position="none": no table


def test_mamba_blocks_need_a_mamba_config():
  with pytest.raises(ValueError, match=r"blocks \(0, 2, 3\) are Mamba blocks"):
    hybrid_config(mamba=None)
  with pytest.raises(ValueError, match="mamba.d_model=32 must equal d_model=16"):
    hybrid_config(mamba=MambaConfig(d_model=32))


@pytest.mark.slow
def test_hybrid_is_causal():
  # Initialised in one compiled function (eager init runs op by op).
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(hybrid_config(),
                                                              rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(Transformer(hybrid_config(), rngs=nnx.Rngs(0))))()
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, deterministic=True)[0])
  tokens = jax.random.randint(jax.random.key(0), (2, L), 0, V)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % V)
  a, b = np.asarray(forward(state, tokens)), np.asarray(forward(state, changed))
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-4


def test_sizes_count_the_mamba_mixers():
  hybrid = nnx.eval_shape(lambda: Transformer(hybrid_config(), rngs=nnx.Rngs(0)))
  plain = nnx.eval_shape(lambda: Transformer(
      hybrid_config(attn_layer_period=1, attn_layer_offset=0, mamba=None),
      rngs=nnx.Rngs(0)))
  cost = mixer_cost(hybrid_config().mamba)
  mixer = hybrid.blocks[0].mixer
  assert cost["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(mixer)))
  attn_params = sum(x.size for x in jax.tree.leaves(nnx.state(plain.blocks[0].attn)))
  assert attn_params == 4 * DM * DM
  # Three blocks trade attention (4 M^2 weights; 2 x weights + 4 L M FLOPs per token)
  # for a Mamba mixer; everything else is the same network.
  n = 3
  p_h, p_p = count_params(hybrid), count_params(plain)
  assert p_h["total"] - p_p["total"] == n * (cost["params"] - attn_params)
  assert p_h["active"] - p_p["active"] == n * (cost["params"] - attn_params)
  assert p_h["experts"] == p_p["experts"]
  f_h, f_p = flops_per_token(hybrid, L), flops_per_token(plain, L)
  attn_flops = 2 * attn_params + 4 * L * DM
  for key in ("active", "total"):
    assert f_h[key] - f_p[key] == n * (cost["flops"] - attn_flops)
  assert f_h["router"] == f_p["router"]
