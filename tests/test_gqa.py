"""Grouped-query attention (``model.num_kv_heads``) and the head width (``model.head_dim``).

A GQA model equals the multi-head model whose key and value kernels are the GQA ones
repeated per group (query head ``n`` reads KV head ``n // (N / N_kv)``, Llama's
``repeat_kv``); ``num_kv_heads = num_heads`` is the default model bit for bit; cached
decoding equals the full forward pass; the KV cache, parameter and FLOP counts follow
the KV heads; a mesh with a ``model`` axis equals one device.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.inference import decode
from moe_jax.layers import lora_adapters as lora
from moe_jax.models import param_sharding
from moe_jax.parallel import sharding
from moe_jax.training import build, train
from moe_jax.peft import lora as peft_lora
from moe_jax.models.block import Attention
from moe_jax.training.config import default_config, set_keys, validate_config
from moe_jax.models.sizes import count_params, flops_per_token
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.transformer import Transformer
from tests.sharding_demo import to_host
from tests.reference import routed_block_loop
from tests.test_decode import (FORCED, MAX_LEN, PREFILL_LEN, PROMPTS, full_logits,
                               make_model, teacher_forced)
from tests.test_mod import _block_params, _run_block
from tests.test_mod import config as mod_config

# d_model 32, 4 query heads of width 8.
GQA = {"model.num_heads": 4, "model.num_kv_heads": 2}
MODELS = {
    "dense": {**GQA, "model.moe_every": 0},
    # Multi-query attention (one KV head) with an explicit head width: N * D = 48 != M.
    "dense_mqa_head_dim": {"model.num_heads": 4, "model.num_kv_heads": 1,
                           "model.head_dim": 12, "model.moe_every": 0},
    "mixtral": {**GQA, "model.moe_every": 1, "moe.top_k": 2,
                "model.activation": "swiglu", "moe.num_experts": 8,
                "moe.dispatch": "dropless"},
    # Jamba (as in test_decode): Mamba, Mamba + MoE, attention, Mamba + MoE.
    "jamba": {**GQA, "model.num_layers": 4, "model.attn_layer_period": 4,
              "model.attn_layer_offset": 2, "model.moe_every": 2, "model.moe_offset": 1,
              "moe.top_k": 2, "model.position": "none", "mamba.chunk_size": 4},
    # Mixture-of-Depths: block 1 routed (8 of 16 tokens) with its predictor.
    "mod": {**GQA, "model.moe_every": 0, "model.mod_every": 2,
            "model.mod_capacity": 0.5, "data.seq_len": 16},
}


def _repeated_kv_twin(model):
  """The multi-head model (``num_kv_heads = num_heads``) whose every weight is
  ``model``'s, with each KV head's key and value kernels repeated for its group."""
  cfg = model.cfg
  twin = Transformer(TransformerConfig(**{**vars(cfg), "num_kv_heads": 0}),
                     rngs=nnx.Rngs(1))
  state = nnx.state(nnx.clone(model), nnx.Param)  # its Variables are the clone's
  for path, var in nnx.to_flat_state(state):
    if path[-1] in ("key", "value"):
      var.set_value(jnp.repeat(var.get_value(), cfg.kv_groups, axis=1))
  nnx.update(twin, state)
  return twin


def _forward(model, tokens):
  """f32[B, L, V] logits of one jitted, deterministic forward pass."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t, deterministic=True)[0])
  return np.asarray(fn(state, tokens))


def _tokens(length=16, batch=3, seed=0):
  return np.random.default_rng(seed).integers(0, 64, (batch, length), dtype=np.int32)


@pytest.mark.parametrize("name", list(MODELS))
def test_gqa_equals_multi_head_with_repeated_kv_kernels(name):
  model = make_model(MODELS[name])
  cfg = model.cfg
  assert cfg.num_kv_heads < cfg.num_heads
  attn = [b for b in model.blocks if hasattr(b, "attn")][0].attn
  assert attn.query.shape == (32, cfg.num_heads, cfg.head_dim)
  assert attn.key.shape == attn.value.shape == (32, cfg.num_kv_heads, cfg.head_dim)
  assert attn.out.shape == (cfg.num_heads, cfg.head_dim, 32)
  twin = _repeated_kv_twin(model)
  assert twin.cfg.num_kv_heads == cfg.num_heads
  tokens = _tokens()
  got, want = _forward(model, tokens), _forward(twin, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Tiling instead of repeating (head n reading KV head n % N_kv) is another model.
  if cfg.kv_groups > 1 and cfg.num_kv_heads > 1 and name == "dense":
    state = nnx.state(nnx.clone(model), nnx.Param)
    for path, var in nnx.to_flat_state(state):
      if path[-1] in ("key", "value"):
        var.set_value(jnp.tile(var.get_value(), (1, cfg.kv_groups, 1)))
    nnx.update(twin, state)
    assert np.abs(_forward(twin, tokens) - got).max() > 1e-3


def test_grouped_attention_by_hand_in_numpy():
  # One attention layer, no positions: 4 query heads of width 6 over 2 KV heads.
  cfg = TransformerConfig(vocab_size=8, num_layers=1, d_model=16, num_heads=4, d_ff=8,
                          num_kv_heads=2, head_dim=6, position="none")
  attn = Attention(cfg, rngs=nnx.Rngs(3))
  x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
  got = np.asarray(attn(jnp.asarray(x), jnp.arange(5)))
  wq, wk, wv, wo = (np.asarray(getattr(attn, n)[...], np.float64)
                    for n in ("query", "key", "value", "out"))
  want = np.zeros((2, 5, 16))
  for b in range(2):
    for n in range(4):
      q = x[b] @ wq[:, n]  # [L, D]
      k, v = x[b] @ wk[:, n // 2], x[b] @ wv[:, n // 2]  # KV head n // (N / N_kv)
      s = q @ k.T / np.sqrt(6) + np.triu(np.full((5, 5), -np.inf), 1)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      want[b] += (p @ v) @ wo[n]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_mod_routed_block_with_gqa_matches_the_loop_reference():
  # d_model 16, 4 query heads of width 4 over 2 KV heads; k = ceil(0.25 * 12) = 3.
  # head_dim=0 re-derives the resolved width for the new head count.
  cfg = dataclasses.replace(mod_config(), num_heads=4, num_kv_heads=2, head_dim=0)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  block = model.blocks[1]
  assert block.attn.key.shape == (16, 2, 4)
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  out, _ = _run_block(block, x)
  want, _ = routed_block_loop(x, capacity=0.25, **_block_params(block))
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)


def test_num_kv_heads_equal_to_num_heads_is_the_default_model_bit_for_bit():
  tokens = _tokens()
  default = make_model({"model.num_heads": 4})
  for extra in ({"model.num_kv_heads": 4}, {"model.num_kv_heads": 4, "model.head_dim": 8}):
    same = make_model({"model.num_heads": 4, **extra})
    assert same.cfg == default.cfg
    params = jax.tree.leaves(nnx.state(same, nnx.Param))
    assert len(params) == len(jax.tree.leaves(nnx.state(default, nnx.Param)))
    for a, b in zip(params, jax.tree.leaves(nnx.state(default, nnx.Param))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(_forward(same, tokens), _forward(default, tokens))
  # The default model's attention is the multi-head einsums it always ran.
  attn = default.blocks[0].attn
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 32)), jnp.float32)
  pos = jnp.arange(6)
  q, k, v = attn._qkv(x, pos)  # pylint: disable=protected-access
  scores = jnp.einsum("BQND,BKND->BNQK", q, k,
                      preferred_element_type=jnp.float32) / jnp.sqrt(8)
  scores = jnp.where((pos[None, :] <= pos[:, None])[None, None], scores,
                     jnp.finfo(jnp.float32).min)
  h = jnp.einsum("BNQK,BKND->BQND", jax.nn.softmax(scores, axis=-1), v)
  want = jnp.einsum("BLND,NDM->BLM", h, attn.out[...])
  np.testing.assert_array_equal(np.asarray(attn(x, pos)), np.asarray(want))


@pytest.mark.parametrize("name", ["dense_mqa_head_dim", "mixtral", "jamba"])
def test_cached_decoding_equals_the_full_forward(name):
  model = make_model(MODELS[name])
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  expected = full_logits(model, [p + f for p, f in zip(PROMPTS, FORCED)])
  cached = teacher_forced(decoder, "left")
  for b in range(len(PROMPTS)):
    np.testing.assert_allclose(cached[b], expected[b], atol=1e-5, rtol=0,
                               err_msg=f"row {b}")


def test_kv_cache_holds_only_the_kv_heads():
  batch, max_len = 3, 24
  sizes = {}
  for kv in (4, 2, 1):
    model = make_model({"model.num_heads": 4, "model.num_kv_heads": kv})
    decode.init_cache(model, batch, max_len, jnp.float32)
    for block in model.blocks:
      assert block.attn.cached_key.shape == (batch, max_len, kv, 8)
      assert block.attn.cached_value.shape == (batch, max_len, kv, 8)
    sizes[kv] = sum(b.attn.cached_key.get_value().nbytes
                    + b.attn.cached_value.get_value().nbytes for b in model.blocks)
  assert sizes[4] == 2 * 2 * batch * max_len * 4 * 8 * 4  # K and V, 2 blocks, float32
  assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]  # N / N_kv times smaller
  decoder = decode.Decoder(make_model(MODELS["dense"]), batch_size=batch,
                           max_len=max_len, prefill_len=8)
  # K and V of 2 KV heads, plus the positions, in both blocks.
  assert decoder.cache_bytes() == sizes[2] + 2 * batch * max_len * 4


def test_parameter_and_flop_counts_by_hand():
  # V 64, M 32, H 64, 2 dense blocks; N 4 query heads and N_kv 1 KV head of width 12.
  model = make_model(MODELS["dense_mqa_head_dim"], **{"model.tie_embeddings": False})
  v, m, h, n, n_kv, d, layers, seq = 64, 32, 64, 4, 1, 12, 2, 32
  attention = m * n * d + 2 * m * n_kv * d + n * d * m  # q, k, v, out
  ffn = 2 * m * h
  block = attention + ffn + 2 * m  # + two RMSNorm scales
  total = v * m + layers * block + m + m * v  # embedding, blocks, final norm, head
  params = count_params(model)
  assert params["total"] == params["active"] == total
  # Per token: 2 per weight of the matmuls, plus 4 * L * N * D for scores and mixing.
  flops = layers * (2 * (attention + ffn) + 4 * seq * n * d) + 2 * m * v
  got = flops_per_token(model, seq)
  assert got["total"] == got["active"] == flops
  info = build.model_info(model, seq)
  assert (info["params_total"], info["flops_per_token_total"]) == (total, flops)


def test_attention_lora_follows_the_kv_kernel_shapes():
  model = make_model(MODELS["dense"])
  tokens = _tokens()
  base = _forward(model, tokens)
  assert peft_lora.add_lora(model, ["attention"], rank=2, alpha=4.0) == 2 * 4
  attn = model.blocks[0].attn
  assert (attn.query_lora.lora_a.shape, attn.query_lora.lora_b.shape) == ((32, 2), (2, 32))
  for name in ("key", "value"):  # [M, N_kv, D] -> [M, r], [r, N_kv * D]
    adapter = lora.adapter(attn, name)
    assert (adapter.lora_a.shape, adapter.lora_b.shape) == ((32, 2), (2, 2 * 8))
  assert (attn.out_lora.lora_a.shape, attn.out_lora.lora_b.shape) == ((32, 2), (2, 32))
  assert peft_lora.lora_param_count(model) == 2 * (2 * 2 * (32 + 32) + 2 * 2 * (32 + 16))
  # B = 0: the adapted model is the base model; with B drawn it is not, and merging
  # the adapters into the kernels gives the adapted model.
  np.testing.assert_array_equal(_forward(model, tokens), base)
  rng = np.random.default_rng(0)
  for _, _, _, adapter in lora.adapters(model):
    adapter.lora_b.set_value(jnp.asarray(rng.normal(size=adapter.lora_b.shape) * 0.1,
                                         jnp.float32))
  adapted = _forward(model, tokens)
  assert np.abs(adapted - base).max() > 1e-3
  assert lora.merge(model) == 8
  assert model.blocks[0].attn.key.shape == (32, 2, 8)
  np.testing.assert_allclose(_forward(model, tokens), adapted, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------
# A (data, expert, model) mesh with model=2 equals one device.
# ----------------------------------------------------------------------------------

SHARDED = {**GQA, "model.num_layers": 2, "model.d_model": 32, "model.d_ff": 64,
           "model.moe_every": 2, "moe.num_experts": 4, "moe.group_size": 16,
           "data.seq_len": 16, "batch_size": 8, "steps": 10, "warmup_steps": 1}


def _train(data, expert, model_axis, steps=3):
  """Losses and final parameters of ``steps`` train steps of the SHARDED config on a
  data x expert x model mesh, and the parameters' PartitionSpecs."""
  config = default_config()
  set_keys(config, SHARDED)
  assert validate_config(config, num_devices=8) == []
  mesh = sharding.make_mesh(data, expert, model_axis)
  model = build.make_model(config, vocab_size=64, seed=0)
  param_sharding.shard_model(model, mesh)
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    tokens = rng.integers(0, 64, (8, 17), dtype=np.int32)
    batch = sharding.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                 mesh)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  params = {jax.tree_util.keystr(p): to_host(v)
            for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
  return losses, params, param_sharding.describe_sharding(model)


def test_gqa_on_a_model_axis_equals_one_device():
  want_losses, want_params, _ = _train(1, 1, 1)
  got_losses, got_params, specs = _train(2, 2, 2)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  assert got_params.keys() == want_params.keys()
  for path, p in want_params.items():
    np.testing.assert_allclose(got_params[path], p, atol=1e-5, rtol=1e-5, err_msg=path)
  # 4 query heads and 2 KV heads both split over model=2; out [N, D, M] by its heads.
  assert specs["blocks/0/attn/query"] == P(None, "model")
  assert specs["blocks/0/attn/key"] == specs["blocks/0/attn/value"] == P(None, "model")
  assert specs["blocks/0/attn/out"] == P("model")


def test_kv_heads_shard_only_when_the_model_axis_divides_them(caplog):
  mesh = sharding.make_mesh(2, 1, 4)
  axes = ("embed", "kv_heads", "kv")
  assert sharding.logical_to_spec(axes, (32, 8, 8), mesh) == P(None, "model")
  assert sharding.logical_to_spec(axes, (32, 4, 8), mesh) == P(None, "model")
  with caplog.at_level("WARNING"):
    # Fewer KV heads than the model axis: every device holds them all, silently.
    assert sharding.logical_to_spec(axes, (32, 2, 8), mesh) == P()
    assert sharding.logical_to_spec(axes, (32, 1, 8), mesh) == P()
    assert not caplog.records
    # A misfit either way is replicated with a warning, as for the other axes.
    assert sharding.logical_to_spec(axes, (32, 6, 8), mesh) == P()
    assert len(caplog.records) == 1


# ----------------------------------------------------------------------------------
# Config rules and configs saved before the keys existed.
# ----------------------------------------------------------------------------------


def test_configs_without_the_keys_load_as_multi_head_attention():
  config = default_config()
  del config.model["num_kv_heads"]
  del config.model["head_dim"]
  assert "num_kv_heads" not in config.model
  assert validate_config(config, num_devices=1) == []
  cfg = build.transformer_config(config, vocab_size=64)
  assert (cfg.num_kv_heads, cfg.head_dim) == (4, 64)  # num_heads, d_model / num_heads


def test_head_dim_frees_d_model_from_num_heads():
  config = default_config()
  config.model.d_model, config.model.num_heads, config.model.head_dim = 100, 3, 32
  config.model.num_kv_heads = 1
  assert validate_config(config, num_devices=1) == []
  cfg = build.transformer_config(config, vocab_size=64)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.kv_groups) == (3, 1, 32, 3)


@pytest.mark.parametrize("kw,match", [
    ({"num_kv_heads": 3}, "num_kv_heads=3 must divide num_heads=4"),
    ({"num_kv_heads": -1}, "num_kv_heads=-1 must be an integer >= 0"),
    ({"head_dim": -2}, "head_dim=-2 must be a positive integer"),
    ({"d_model": 30}, "d_model=30 must be divisible by num_heads=4"),
])
def test_transformer_config_refuses_bad_head_settings(kw, match):
  base = dict(vocab_size=8, num_layers=1, d_model=32, num_heads=4, d_ff=8)
  with pytest.raises(ValueError, match=match):
    TransformerConfig(**{**base, **kw})
  if "d_model" in kw:  # an explicit head width needs no divisibility
    assert TransformerConfig(**{**base, **kw, "head_dim": 8}).head_dim == 8
