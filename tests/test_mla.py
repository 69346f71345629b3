"""Multi-head latent attention (``model.mixer="mla"``, ``mla.*``) and YaRN rotary scaling.

The mixer equals a per-head numpy loop written from the DeepSeek-V3 equations; cached
decoding, expanded and absorbed, equals the full forward pass; the cache holds
``kv_lora_rank + qk_rope_head_dim`` values per token and layer; a whole model trains,
decodes, counts, takes LoRA and shards; YaRN's frequencies and mscale equal a table
worked out by hand; bad keys give one line each.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.inference import decode
from moe_jax.layers import lora_adapters as lora
from moe_jax.models import param_sharding, rope
from moe_jax.models.block import Attention
from moe_jax.models.mla import MultiHeadLatentAttention
from moe_jax.models.mla_config import MlaConfig
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.sizes import count_params, flops_per_token
from moe_jax.parallel import sharding
from moe_jax.peft import lora as peft_lora
from moe_jax.training import build, train
from moe_jax.training.config import default_config, set_keys, validate_config
from tests.test_decode import (FORCED, MAX_LEN, PREFILL_LEN, PROMPTS, full_logits,
                               teacher_forced)

# d_model 32, 4 heads; Rq 12, R 8, Dn 6, Dr 4, Dv 5 (N * Dv = 20 != M).
MLA_KEYS = {"model.mixer": "mla", "model.num_heads": 4, "mla.q_lora_rank": 12,
            "mla.kv_lora_rank": 8, "mla.qk_nope_head_dim": 6, "mla.qk_rope_head_dim": 4,
            "mla.v_head_dim": 5}
# YaRN with a 16-token original context; mscale_all_dim 0.5 so that both the rotary
# factor and the softmax factor differ from 1.
YARN_KEYS = {"model.rope_scaling": "yarn", "model.rope_factor": 4.0,
             "model.rope_original_max_len": 16, "model.yarn_mscale": 1.0,
             "model.yarn_mscale_all_dim": 0.5}
TINY = {"model.num_layers": 2, "model.d_model": 32, "model.d_ff": 64,
        "model.moe_every": 0, "data.seq_len": 32, **MLA_KEYS}


def lm_config(**more):
  config = default_config()
  set_keys(config, {**TINY, **more})
  return config


def make_model(more=None, seed=0):
  return build.make_model(lm_config(**(more or {})), vocab_size=64, seed=seed)


def mixer_cfg(q_lora_rank=12, interleave=True, yarn=False, **more):
  extra = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16,
               yarn_mscale=1.0, yarn_mscale_all_dim=0.5) if yarn else {}
  return TransformerConfig(
      vocab_size=64, num_layers=1, d_model=32, num_heads=4, d_ff=64, mixer="mla",
      mla=MlaConfig(q_lora_rank=q_lora_rank, kv_lora_rank=8, qk_nope_head_dim=6,
                    qk_rope_head_dim=4, v_head_dim=5, rope_interleave=interleave,
                    **more), **extra, rope_base=100.0)


def _randomize_norms(mixer, rng):
  for name in ("q_a_layernorm", "kv_a_layernorm"):
    p = getattr(mixer, name)
    if p is not None:
      p.set_value(jnp.asarray(1 + 0.3 * rng.normal(size=p.shape), jnp.float32))


# ----------------------------------------------------------------------------------
# The slow reference: DeepSeek-V3's equations, one head and one query at a time.
# ----------------------------------------------------------------------------------


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x) + eps) * scale


def _np_rotate(x, pos, inv_freq, interleave):
  """Rotates pairs (x[2i], x[2i+1]) (interleave) or (x[i], x[i + D/2]) by pos * f_i."""
  half = len(x) // 2
  pairs = ([(2 * i, 2 * i + 1) for i in range(half)] if interleave
           else [(i, i + half) for i in range(half)])
  out = np.zeros_like(x)
  for i, (a, b) in enumerate(pairs):
    c, s = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
    out[a], out[b] = x[a] * c - x[b] * s, x[b] * c + x[a] * s
  return out


def reference_mla(mixer, x, inv_freq, rot_factor, softmax_scale, interleave):
  """f64[B, L, M] causal MLA output by loops over rows, heads and queries."""
  cfg, m = mixer.cfg, mixer.cfg.mla
  w = {k: np.asarray(getattr(mixer, k)[...], np.float64) for k in (
      "q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
      "kv_a_layernorm", "kv_b_proj", "o_proj") if getattr(mixer, k) is not None}
  x = np.asarray(x, np.float64)
  b_, l_, _ = x.shape
  n, dn, dv, r = cfg.num_heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
  out = np.zeros_like(x)
  for b in range(b_):
    q, k_nope, k_rope, v = {}, {}, {}, {}
    for t in range(l_):
      if m.q_lora_rank:
        cq = _np_rms(x[b, t] @ w["q_a_proj"], w["q_a_layernorm"], cfg.norm_eps)
        qt = np.einsum("r,rnd->nd", cq, w["q_b_proj"])
      else:
        qt = np.einsum("m,mnd->nd", x[b, t], w["q_proj"])
      kv_a = x[b, t] @ w["kv_a_proj_with_mqa"]
      c = _np_rms(kv_a[:r], w["kv_a_layernorm"], cfg.norm_eps)
      k_rope[t] = _np_rotate(kv_a[r:], t, inv_freq, interleave) * rot_factor
      kv = np.einsum("r,rnd->nd", c, w["kv_b_proj"])
      for h in range(n):
        q[t, h] = (qt[h, :dn], _np_rotate(qt[h, dn:], t, inv_freq, interleave)
                   * rot_factor)
        k_nope[t, h], v[t, h] = kv[h, :dn], kv[h, dn:]
    for t in range(l_):
      heads = np.zeros((n, dv))
      for h in range(n):
        s = np.array([(q[t, h][0] @ k_nope[u, h] + q[t, h][1] @ k_rope[u])
                      * softmax_scale for u in range(t + 1)])
        p = np.exp(s - s.max())
        p /= p.sum()
        heads[h] = sum(p[u] * v[u, h] for u in range(t + 1))
      out[b, t] = np.einsum("nd,ndm->m", heads, w["o_proj"])
  return out


@pytest.mark.parametrize("q_lora_rank,interleave,yarn", [
    (12, True, False), (0, True, True), (12, False, True)])
def test_forward_equals_a_per_head_loop(q_lora_rank, interleave, yarn):
  cfg = mixer_cfg(q_lora_rank, interleave, yarn)
  mixer = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  _randomize_norms(mixer, rng)
  x = rng.normal(size=(2, 6, 32)).astype(np.float32)
  got = np.asarray(mixer(jnp.asarray(x), jnp.arange(6)))
  if yarn:
    # 4 rotary dims, base 100, original context 16, factor 4: corr(32) < 0 -> low 0,
    # corr(1) = 4 ln(16 / 2pi) / (2 ln 100) = 0.406 -> high 1: f_0 kept, f_1 / 4.
    inv_freq = [1.0, 100 ** -0.5 / 4]
    ms = lambda m: 0.1 * m * math.log(4) + 1  # noqa: E731
    rot_factor, scale = ms(1.0) / ms(0.5), 10 ** -0.5 * ms(0.5) ** 2
  else:
    inv_freq, rot_factor, scale = [1.0, 100 ** -0.5], 1.0, 10 ** -0.5
  assert mixer.scale == pytest.approx(scale, rel=1e-12)
  want = reference_mla(mixer, x, inv_freq, rot_factor, scale, interleave)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_parameter_paths_and_shapes_follow_hugging_face():
  model = make_model()
  shapes = {k: v.shape for k, v in
            nnx.to_flat_state(nnx.state(model.blocks[0].attn, nnx.Param))}
  assert {"/".join(map(str, k)): s for k, s in shapes.items()} == {
      "q_a_proj": (32, 12), "q_a_layernorm": (12,), "q_b_proj": (12, 4, 10),
      "kv_a_proj_with_mqa": (32, 12), "kv_a_layernorm": (8,), "kv_b_proj": (8, 4, 11),
      "o_proj": (4, 5, 32)}
  assert hasattr(model.blocks[0], "attn_norm")
  no_q_lora = make_model({"mla.q_lora_rank": 0}).blocks[1].attn
  assert no_q_lora.q_proj.shape == (32, 4, 10) and no_q_lora.q_a_proj is None


# ----------------------------------------------------------------------------------
# Decoding: expanded and absorbed against the full forward pass; the cache's size.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decoding_equals_the_full_forward(absorb):
  model = make_model({"mla.absorb": absorb, **YARN_KEYS})
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  expected = full_logits(model, [p + f for p, f in zip(PROMPTS, FORCED)])
  for padding in decode.PADDINGS:
    cached = teacher_forced(decoder, padding)
    for b in range(len(PROMPTS)):
      np.testing.assert_allclose(cached[b], expected[b], atol=1e-5, rtol=0,
                                 err_msg=f"row {b}, {padding} padding")
  if not absorb:
    return
  greedy = decoder.generate(PROMPTS, 6, temperature=0.0, padding="left")
  for prompt, tokens in zip(PROMPTS, greedy):
    assert tokens == decode.generate_uncached(model, prompt, 6, temperature=0.0,
                                              window=MAX_LEN)


@nnx.jit
def _decode(mixer, x, positions, mask):
  return mixer.decode(x, positions, mask)


def test_absorbed_and_expanded_steps_agree_on_one_cache():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 32)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = jnp.ones((2, 6), bool)
  outs, caches = {}, {}
  for absorb in (True, False):  # the same weights (seed 0), one path each
    mixer = MultiHeadLatentAttention(mixer_cfg(yarn=True, absorb=absorb),
                                     rngs=nnx.Rngs(0))
    _randomize_norms(mixer, np.random.default_rng(3))
    mixer.init_cache(2, 8, jnp.float32)
    prefill = _decode(mixer, x[:, :5], positions[:, :5], mask[:, :5])
    step = _decode(mixer, x[:, 5:], positions[:, 5:], mask[:, 5:])
    outs[absorb] = np.concatenate([prefill, step], axis=1)
    caches[absorb] = np.asarray(mixer.cached_latent[...])
  full = np.asarray(nnx.jit(lambda m, x: m(x, jnp.arange(6)))(mixer, x))
  np.testing.assert_array_equal(caches[True], caches[False])
  np.testing.assert_allclose(outs[True], outs[False], atol=1e-5, rtol=0)
  np.testing.assert_allclose(outs[True], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_cache_holds_the_latent_and_the_rope_key_per_token(dtype):
  model = make_model()
  decode.init_cache(model, 3, 10, dtype)
  for block in model.blocks:
    caches = {k[0]: v for k, v in nnx.to_flat_state(nnx.state(block.attn, nnx.Cache))}
    assert set(caches) == {"cached_latent", "cached_rope_key", "cached_positions"}
    values = [v for v in caches.values() if jnp.issubdtype(v.dtype, jnp.floating)]
    per_token = sum(v.size * v.dtype.itemsize for v in values) // (3 * 10)
    assert per_token == (8 + 4) * jnp.dtype(dtype).itemsize
    assert caches["cached_latent"].shape == (3, 10, 8)
    assert caches["cached_rope_key"].shape == (3, 10, 4)


def test_a_later_token_never_changes_earlier_outputs():
  model = make_model(YARN_KEYS)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 64, (2, 10)).astype(np.int32)
  changed = tokens.copy()
  changed[:, 6] = (changed[:, 6] + 1) % 64
  forward = nnx.jit(lambda m, t: m(t, deterministic=True)[0])
  a, b = forward(model, jnp.asarray(tokens)), forward(model, jnp.asarray(changed))
  np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
  assert np.abs(np.asarray(a[:, 6:]) - np.asarray(b[:, 6:])).max() > 1e-4


# ----------------------------------------------------------------------------------
# A whole model: trains, counts, takes LoRA, shards.
# ----------------------------------------------------------------------------------


def test_a_mla_model_trains_a_step():
  config = lm_config(**{"batch_size": 4, "steps": 5, "warmup_steps": 1,
                        "model.moe_every": 2, "moe.num_experts": 4,
                        "moe.group_size": 32, **YARN_KEYS})
  assert validate_config(config, num_devices=8) == []
  model = build.make_model(config, vocab_size=64, seed=0)
  before = np.asarray(model.blocks[0].attn.kv_b_proj[...])
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, None, seed=0)
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  tokens = np.random.default_rng(0).integers(0, 64, (4, 33), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  after = np.asarray(state.params["blocks"][0]["attn"]["kv_b_proj"][...])
  assert np.abs(after - before).max() > 0


def test_params_and_flops_come_from_the_modules():
  model = make_model()
  m_, n, v = 32, 4, 64
  mla = 32 * 12 + 12 + 12 * 4 * 10 + 32 * 12 + 8 + 8 * 4 * 11 + 4 * 5 * 32
  block = mla + 2 * m_ + 2 * m_ * 64  # norms, dense FFN (gelu: wi, wo)
  total = v * m_ + 2 * block + m_ + m_ * v  # embedding, blocks, final norm, output
  assert count_params(model)["total"] == total
  seq = 32
  matrices = mla - 12 - 8
  per_block = 2 * matrices + 2 * seq * n * (6 + 4 + 5) + 2 * 2 * m_ * 64
  assert flops_per_token(model, seq)["total"] == 2 * per_block + 2 * m_ * v


_forward = nnx.jit(lambda m, t: m(t, deterministic=True)[0])


def test_lora_targets_cover_every_projection():
  model = make_model()
  weights = peft_lora.target_weights(model, ["attention"])
  assert [(w.path, w.name, w.in_dims) for w in weights[:6]] == [
      (("blocks", 0, "attn"), name, 2 if name == "o_proj" else 1) for name in (
          "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")] + [
              (("blocks", 1, "attn"), "q_a_proj", 1)]
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 8)), jnp.int32)
  base = _forward(model, tokens)
  assert peft_lora.add_lora(model, ["attention"], rank=2, alpha=4.0) == 10
  same = _forward(model, tokens)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(base))  # B = 0
  rng = np.random.default_rng(5)
  for *_, adapter in lora.adapters(model):
    adapter.lora_b.set_value(jnp.asarray(rng.normal(size=adapter.lora_b.shape) * 0.1,
                                         jnp.float32))
  adapted = _forward(model, tokens)
  assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
  assert lora.merge(model) == 10
  merged = _forward(model, tokens)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-5, rtol=0)


def test_a_2x4_mesh_shards_the_heads_and_equals_one_device():
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 64, (4, 12)), jnp.int32)
  want = _forward(make_model(), tokens)
  model = param_sharding.shard_model(make_model(), sharding.make_mesh(2, 1, 4))
  specs = param_sharding.describe_sharding(model)
  assert specs["blocks/0/attn/q_b_proj"] == P(None, "model")
  assert specs["blocks/0/attn/kv_b_proj"] == P(None, "model")
  assert specs["blocks/0/attn/o_proj"] == P("model")
  got = _forward(model, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------
# YaRN by hand.
# ----------------------------------------------------------------------------------


def test_yarn_frequencies_by_hand():
  # DeepSeek-V3's numbers on 16 dims: corr(b) = 16 ln(4096 / (2 pi b)) / (2 ln 10000):
  # corr(32) = 2.618 -> low 2, corr(1) = 5.628 -> high 6; ramp (i - 2) / 4 clipped.
  ramp = np.array([0, 0, 0, 0.25, 0.5, 0.75, 1, 1])
  kept = 10000.0 ** (-np.arange(8) / 8)
  want = kept * (1 - ramp) + kept / 40 * ramp
  got = rope.yarn_inv_freq(16, 10000.0, 40.0, 4096, 32.0, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # mscale(40) = 0.1 ln 40 + 1; DeepSeek's mscale = mscale_all_dim = 1 cancel on the
  # rotary values and square on the softmax scale.
  assert rope.yarn_mscale(40.0, 1.0) == pytest.approx(1.3688879454113936, rel=1e-12)
  assert rope.yarn_mscale(1.0, 1.0) == 1.0
  assert rope.yarn_attention_factor(40.0, 1.0, 1.0) == 1.0
  assert rope.yarn_attention_factor(40.0, 1.0, 0.0) == pytest.approx(1.36888794541139)
  cfg = TransformerConfig(
      vocab_size=8, num_layers=1, d_model=32, num_heads=4, d_ff=8, mixer="mla",
      mla=MlaConfig(qk_nope_head_dim=128, qk_rope_head_dim=64), rope_scaling="yarn",
      rope_factor=40.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0)
  mixer = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))
  assert mixer.scale == pytest.approx(192 ** -0.5 * 1.3688879454113936 ** 2, rel=1e-12)


def test_yarn_reaches_plain_attention_and_none_is_unchanged():
  base = dict(vocab_size=8, num_layers=1, d_model=32, num_heads=2, d_ff=8,
              rope_base=100.0)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 5, 32)), jnp.float32)
  pos = jnp.arange(5)
  plain = Attention(TransformerConfig(**base), rngs=nnx.Rngs(0))
  yarn = Attention(TransformerConfig(**base, rope_scaling="yarn", rope_factor=4.0,
                                     rope_original_max_len=64), rngs=nnx.Rngs(0))
  q0, k0, _ = plain._qkv(x, pos)
  q1, k1, _ = yarn._qkv(x, pos)
  raw = jnp.einsum("BLM,MND->BLND", x, plain.query[...])
  # head_dim 16, base 100, original 64, factor 4: corr(32) = 16 ln(64 / 201.06) /
  # (2 ln 100) < 0 -> low 0; corr(1) = 16 ln(64 / 6.283) / 9.21 = 4.03 -> high 5.
  ramp = np.clip(np.arange(8) / 5, 0, 1)
  kept = 100.0 ** (-np.arange(8) / 8)
  table = kept * (1 - ramp) + kept / 4 * ramp
  factor = 0.1 * math.log(4) + 1  # mscale(4), no mscale_all_dim
  np.testing.assert_allclose(np.asarray(q1), np.asarray(rope.rotary(
      raw, pos, 100.0, inv_freq=table, attention_factor=factor)), atol=1e-5)
  # rope_scaling="none" is RoFormer's rotary, bit for bit.
  np.testing.assert_array_equal(np.asarray(q0), np.asarray(rope.rotary(raw, pos, 100.0)))
  assert np.abs(np.asarray(k1) - np.asarray(k0)).max() > 1e-3


# ----------------------------------------------------------------------------------
# Config errors: one line each.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keys,start", [
    ({"mla.kv_lora_rank": 0}, "mla.kv_lora_rank=0 "),
    ({"mla.qk_rope_head_dim": 5}, "mla.qk_rope_head_dim=5 "),
    ({"mla.q_lora_rank": -1}, "mla.q_lora_rank=-1 "),
    ({"model.rope_scaling": "yarn", "model.yarn_mscale_all_dim": -1.0},
     "model.yarn_mscale_all_dim=-1.0 "),
    ({"model.mixer": "mqa"}, "model.mixer='mqa' "),
    ({"model.position": "learned"}, "model.mixer='mla' needs rotary positions"),
    ({"model.rope_scaling": "ntk"}, "model.rope_scaling='ntk' "),
    ({"model.rope_scaling": "yarn", "model.rope_factor": 0.5}, "model.rope_factor=0.5 "),
    ({"model.rope_scaling": "yarn", "model.yarn_beta_fast": 0.0},
     "model.yarn_beta_fast=0.0 "),
])
def test_bad_keys_give_one_line(keys, start):
  errors = validate_config(lm_config(**keys), num_devices=8)
  assert len(errors) == 1 and errors[0].startswith(start), errors
  assert "\n" not in errors[0]


def test_mla_keys_are_not_checked_without_the_mixer():
  config = lm_config(**{"model.mixer": "attention", "mla.kv_lora_rank": 0})
  assert validate_config(config, num_devices=8) == []
  assert build.transformer_config(config, 64).mla is None
  assert validate_config(lm_config(), num_devices=8) == []
