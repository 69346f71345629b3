"""The model options of the Hugging Face families, each against a hand computation:
norm epsilon, q/k RMSNorm over the projection (OLMoE) or per head (Qwen3), q/k/v biases
(Qwen2), the sigmoid-gated shared expert (Qwen2-MoE) and the explicit dense blocks
(``mlp_only_layers``); with their config checks, FLOP counts and sharding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers.moe_config import MoeConfig
from moe_jax.layers.moe_layer import MoeLayer, SharedExpertGate
from moe_jax.models.block import Attention, Norm
from moe_jax.models.layer_pattern import layer_pattern, pattern_errors
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.scan import model_unit
from moe_jax.models.sizes import flops_per_token
from moe_jax.models.transformer import Transformer
from moe_jax.training.config import default_config, validate_config


def _cfg(**kw):
  base = dict(vocab_size=40, num_layers=2, d_model=16, num_heads=4, num_kv_heads=2,
              head_dim=6, d_ff=32, position="none")
  base.update(kw)
  return TransformerConfig(**base)


def _rms(a, axes, eps):
  return a / np.sqrt(np.mean(a * a, axis=axes, keepdims=True) + eps)


def _randomise(module, seed=0):
  """Every parameter of ``module`` drawn N(0, 1) (norm scales 1 + N(0, 0.3))."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    v = var.get_value()
    var.set_value(jnp.asarray(rng.normal(size=v.shape), jnp.float32))


@pytest.mark.parametrize("qk_norm", ["none", "projection", "head"])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_bias_and_qk_norm_by_hand(qk_norm, bias):
  cfg = _cfg(qk_norm=qk_norm, qkv_bias=bias, norm_eps=1e-3)
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  _randomise(attn)
  x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32)
  q, k, v = (np.asarray(a) for a in attn._qkv(jnp.asarray(x), jnp.arange(3)))
  proj = {n: np.einsum("blm,mnd->blnd", x, np.asarray(getattr(attn, n)[...]))
          for n in ("query", "key", "value")}
  if bias:
    for n in proj:
      proj[n] = proj[n] + np.asarray(getattr(attn, f"{n}_bias")[...]).reshape(
          proj[n].shape[2:])
  if qk_norm == "projection":  # over each token's whole projection, N * D values
    for n in ("query", "key"):
      scale = np.asarray(getattr(attn, f"{n}_norm")[...]).reshape(proj[n].shape[2:])
      proj[n] = _rms(proj[n], (2, 3), 1e-3) * scale
  elif qk_norm == "head":  # over each head's D values, one scale for every head
    for n in ("query", "key"):
      proj[n] = _rms(proj[n], (3,), 1e-3) * np.asarray(getattr(attn, f"{n}_norm")[...])
  for got, name in ((q, "query"), (k, "key"), (v, "value")):
    np.testing.assert_allclose(got, proj[name], rtol=2e-5, atol=2e-5, err_msg=name)


def test_vector_shapes_flops_and_sharding():
  plain = Attention(_cfg(), rngs=nnx.Rngs(0))
  full = Attention(_cfg(qk_norm="projection", qkv_bias=True), rngs=nnx.Rngs(0))
  assert full.query_norm.shape == (24,) and full.key_norm.shape == (12,)
  assert full.query_bias.shape == (24,) and full.value_bias.shape == (12,)
  assert Attention(_cfg(qk_norm="head"), rngs=nnx.Rngs(0)).key_norm.shape == (6,)
  # Vectors cost no FLOPs (as norms and biases elsewhere).
  assert full.flops_per_token(8) == plain.flops_per_token(8)
  # They are replicated vectors on a mesh.
  from moe_jax.models.param_sharding import describe_sharding, shard_model  # pylint: disable=import-outside-toplevel
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  specs = describe_sharding(shard_model(full, sharding.make_mesh(4, 1, 2)))
  assert specs["query_norm"] == jax.sharding.PartitionSpec()
  assert specs["query"][:2] == (None, "model")


def test_norm_eps_reaches_every_norm():
  model = Transformer(_cfg(norm_eps=3e-5), rngs=nnx.Rngs(0))
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, Norm)]
  assert len(norms) == 5 and all(n.eps == 3e-5 for n in norms)
  x = jnp.full((1, 4), 0.01)
  norm = Norm(4, eps=3e-5)
  np.testing.assert_allclose(norm(x), 0.01 / np.sqrt(1e-4 + 3e-5), rtol=1e-6)


def test_shared_expert_gate_by_hand():
  moe = MoeConfig(num_experts=4, d_model=16, d_ff=8, top_k=2, num_shared_experts=2,
                  shared_expert_gate=True, activation="swiglu")
  layer = MoeLayer(moe, rngs=nnx.Rngs(0))
  _randomise(layer)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 16)), jnp.float32)
  y, _ = layer(x, deterministic=True)
  w = np.asarray(layer.shared_gate.kernel[...])
  gate = 1 / (1 + np.exp(-np.einsum("blm,m->bl", np.asarray(x), w)))[..., None]
  shared = np.asarray(layer.shared_experts(x, deterministic=True))
  ungated = dataclasses.replace(moe, shared_expert_gate=False)
  plain = MoeLayer(ungated, rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(layer, nnx.Not(nnx.PathContains("shared_gate"))))
  y_plain, _ = plain(x, deterministic=True)  # routed + shared
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_plain) - shared + gate * shared,
                             rtol=1e-5, atol=1e-5)
  assert SharedExpertGate(16, init_scale=1.0, rngs=nnx.Rngs(0)).flops_per_token(3).total == 32


def test_dense_layers_pattern():
  kinds = layer_pattern(5, moe_every=1, dense_layers=(1, 3))
  assert [k.ffn for k in kinds] == ["moe", "dense", "moe", "dense", "moe"]
  # Qwen2-MoE: decoder_sparse_step 2 is moe_every=2 with the default offset.
  assert [k.ffn for k in layer_pattern(4, moe_every=2, dense_layers=(3,))] == [
      "dense", "moe", "dense", "dense"]
  assert any("past model.num_layers=4" in e for e in pattern_errors(
      4, 1, 0, 1, None, dense_layers=(4,), prefix="model."))
  assert any("distinct" in e for e in pattern_errors(4, 1, 0, 1, None,
                                                     dense_layers=(1, 1)))
  assert any("places no MoE block" in e for e in pattern_errors(
      2, 1, 0, 1, None, dense_layers=(0, 1)))


def test_dense_layers_from_json_and_scanned():
  moe = MoeConfig(num_experts=4, d_model=16, d_ff=8)
  cfg = _cfg(num_layers=5, moe_every=1, moe=moe, dense_layers=[0])
  assert cfg.dense_layers == (0,) and cfg.moe_blocks == (1, 2, 3, 4)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  unit = model_unit(scanned)
  assert (unit.prefix, unit.period, unit.repeats) == (1, 1, 4)
  a = Transformer(cfg, rngs=nnx.Rngs(0))
  b = Transformer(scanned, rngs=nnx.Rngs(0))
  tokens = jnp.arange(12).reshape(2, 6) % 40
  np.testing.assert_allclose(a(tokens, deterministic=True)[0],
                             b(tokens, deterministic=True)[0], rtol=1e-5, atol=1e-5)
  assert flops_per_token(a, 6) == flops_per_token(b, 6)


@pytest.mark.parametrize("key,value,message", [
    ("model.norm_eps", 0.0, "model.norm_eps=0.0 must be a finite number > 0"),
    ("model.qk_norm", "layer", "model.qk_norm='layer' is unknown"),
    ("model.dense_layers", (7,), "model.dense_layers=(7,) names blocks past"),
    ("moe.shared_expert_gate", True, "shared_expert_gate=True gates the shared experts"),
])
def test_config_errors_are_one_line(key, value, message):
  config = default_config()
  section, name = key.split(".")
  config[section][name] = value
  errors = validate_config(config)
  assert any(message in e for e in errors), errors
  assert all("\n" not in e for e in errors)
