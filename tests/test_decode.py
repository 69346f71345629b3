"""Cached decoding (moe_jax.inference.decode) against the full forward pass and the
uncached sampler.

Every model is built from the experiment config by dotted overrides, so a new family is
one line in MODELS. Each MoE model routes without drops in the full forward pass
(``eval_capacity_factor = E`` gives C = S, or dropless), which is when cached and full
logits must agree exactly (docs/inference.md).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.inference import decode
from moe_jax.parallel import sharding
from moe_jax.models import param_sharding
from moe_jax.training import build
from moe_jax.errors import ConfigError
from moe_jax.training.config import default_config, set_keys
from moe_jax.models.transformer import Transformer

TINY = {"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
        "model.d_ff": 64, "moe.num_experts": 4, "moe.group_size": 64,
        "moe.eval_capacity_factor": 4.0, "data.seq_len": 32}

MODELS = {
    "dense": {"model.moe_every": 0},
    "dense_learned_positions": {"model.moe_every": 0, "model.position": "learned"},
    "switch": {"model.moe_every": 2, "moe.top_k": 1},
    "top2": {"model.moe_every": 2, "moe.top_k": 2},
    # Mixtral (Jiang et al. 2024): top-2 of 8 SwiGLU experts in every block, dropless.
    "mixtral": {"model.moe_every": 1, "moe.top_k": 2, "model.activation": "swiglu",
                "moe.num_experts": 8, "moe.dispatch": "dropless"},
    # DeepSeek-MoE/V3 (as deepseek_small): fine-grained routed experts plus a shared one,
    # sigmoid scores, selection bias, group-limited top-3, dropless.
    "deepseek": {"model.moe_every": 2, "moe.num_experts": 8, "moe.d_ff": 16,
                 "moe.num_shared_experts": 1, "moe.top_k": 3, "moe.score_fn": "sigmoid",
                 "moe.bias_update_rate": 1e-3, "moe.expert_groups": 4,
                 "moe.top_groups": 2, "moe.dispatch": "dropless", "moe.z_loss_coef": 0.0},
    # Jamba (as jamba_small, 4 blocks): Mamba, Mamba + MoE, attention, Mamba + MoE;
    # top-2 of 4 experts, no positional encoding; a 4-token scan chunk, so the
    # prefill's 12 tokens cross chunks.
    "jamba": {"model.num_layers": 4, "model.attn_layer_period": 4,
              "model.attn_layer_offset": 2, "model.moe_every": 2, "model.moe_offset": 1,
              "moe.top_k": 2, "model.position": "none", "mamba.chunk_size": 4},
}

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
# Teacher-forced continuations, one per prompt.
FORCED = [[1, 2, 3, 4], [40, 41, 42, 43], [7, 7, 7, 7]]
PREFILL_LEN, MAX_LEN = 12, 24


def make_model(overrides, **more):
  config = default_config()
  set_keys(config, {**TINY, **overrides, **more})
  return build.make_model(config, vocab_size=64, seed=0)


def full_logits(model, rows):
  """f32[L, V] logits of each row, from one full forward pass of the right-padded
  batch (causal, and no token is dropped, so padding changes nothing)."""
  length = max(len(r) for r in rows)
  tokens = np.array([r + [0] * (length - len(r)) for r in rows], np.int32)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t, deterministic=True))
  logits, aux = forward(state, tokens)
  for a in aux.values():
    assert float(a.metrics["dropped_fraction"]) == 0.0
  return [np.asarray(logits[b, :len(r)]) for b, r in enumerate(rows)]


def teacher_forced(decoder, padding):
  """Prefill logits at every prompt token and step logits along FORCED, per row."""
  logits, _ = decoder.prefill(PROMPTS, padding=padding, all_logits=True)
  out = [list(np.asarray(logits[b])[decoder.layout.mask[b]]) for b in range(len(PROMPTS))]
  for t in range(len(FORCED[0])):
    step_logits, _, _ = decoder.step(np.array([f[t] for f in FORCED]))
    for b in range(len(PROMPTS)):
      out[b].append(np.asarray(step_logits[b]))
  return [np.stack(rows) for rows in out]


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_decoding_equals_the_full_forward_and_the_uncached_sampler(name):
  model = make_model(MODELS[name])
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  # Teacher forcing: the step after feeding FORCED[b][t] predicts what the full
  # forward pass predicts at that position, so every position of prompt + FORCED is
  # compared.
  expected = full_logits(model, [p + f for p, f in zip(PROMPTS, FORCED)])
  for padding in decode.PADDINGS:
    cached = teacher_forced(decoder, padding)
    for b in range(len(PROMPTS)):
      np.testing.assert_allclose(cached[b], expected[b], atol=1e-5, rtol=0,
                                 err_msg=f"row {b}, {padding} padding")
  # Greedy: the uncached window holds the whole row (<= 21 tokens), so nothing slides.
  greedy = decoder.generate(PROMPTS, 12, temperature=0.0, padding="left")
  for prompt, tokens in zip(PROMPTS, greedy):
    assert tokens == decode.generate_uncached(model, prompt, 12, temperature=0.0,
                                              window=MAX_LEN)


def test_one_compilation_for_prefill_and_one_for_the_step():
  # top2_small's random second-expert policy draws from an RNG stream in the step loop.
  model = make_model(MODELS["top2"], **{"moe.second_policy": "random"})
  decoder = decode.Decoder(model, batch_size=4, max_len=16, prefill_len=8)
  decoder.generate([[1], [2, 3, 4]], 5, temperature=0.0)
  decoder.generate([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9], [3], [4, 4, 4]], 9,
                   temperature=0.7, top_k=3, top_p=0.9, seed=1, padding="left",
                   stop_ids=[5, None, 2, 7])
  # 8 + 30 tokens overflow max_len=16: the window slides by re-running prefill.
  out = decoder.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 30, temperature=0.0)
  assert len(out[0]) == 30
  assert decoder.traces == {"prefill": 1, "step": 1}


def test_stop_ids_end_each_row_and_leave_the_others_alone():
  model = make_model(MODELS["switch"])
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  free = decoder.generate(PROMPTS, 10, temperature=0.0)
  stop = free[0][2]
  first = free[0].index(stop)
  stopped = decoder.generate(PROMPTS, 10, temperature=0.0, stop_ids=[stop, None, -5])
  assert stopped[0] == free[0][:first + 1]
  assert stopped[1:] == free[1:]


def test_prompt_layout_left_and_right():
  right = decode.layout_prompts([[7, 8], [9]], 4, padding="right", pad_id=0)
  np.testing.assert_array_equal(right.tokens, [[7, 8, 0, 0], [9, 0, 0, 0]])
  np.testing.assert_array_equal(right.positions, [[0, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(right.last, [1, 0])
  left = decode.layout_prompts([[7, 8], [9]], 4, padding="left", pad_id=0)
  np.testing.assert_array_equal(left.tokens, [[0, 0, 7, 8], [0, 0, 0, 9]])
  np.testing.assert_array_equal(left.positions, [[0, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(left.mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(left.last, [3, 3])
  with pytest.raises(ValueError, match="prompt 0 has 5 tokens"):
    decode.layout_prompts([[1] * 5], 4)


def test_sampling_rules_by_hand():
  # probs 0.4, 0.3, 0.2, 0.1: top_p=0.5 keeps {0, 1} (mass above token 1 is 0.4 < 0.5,
  # above token 2 it is 0.7); top_k=3 keeps {0, 1, 2}; temperature 0 is the argmax.
  logits = jnp.log(jnp.array([[0.3, 0.4, 0.1, 0.2]]))
  order = {1: 0, 0: 1, 3: 2, 2: 3}  # token -> rank
  keys = jax.random.split(jax.random.key(0), 400)

  def draws(t, k, p):
    fn = jax.vmap(lambda key: decode.sample_logits(logits, key, t, k, p)[0])
    return set(np.asarray(fn(keys)).tolist())

  assert draws(0.0, 0, 1.0) == {1}
  assert draws(1.0, 1, 1.0) == {1}
  assert draws(1.0, 0, 0.5) == {1, 0}
  assert {order[t] for t in draws(1.0, 3, 1.0)} == {0, 1, 2}
  assert draws(1.0, 0, 1.0) == {0, 1, 2, 3}
  assert draws(1.0, 3, 0.5) == {1, 0}


def test_non_causal_routers_are_refused():
  model = make_model(MODELS["switch"])
  cfg = model.cfg
  bpr = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, batch_priority=True))
  with pytest.raises(ConfigError, match="block 1: this MoE router is not causal"):
    decode.Decoder(Transformer(bpr, rngs=nnx.Rngs(0)), batch_size=1, max_len=8)
  expert_choice = make_model(MODELS["switch"], **{"moe.router": "expert_choice"})
  with pytest.raises(ConfigError, match="block 1: this MoE router is not causal"):
    decode.Decoder(expert_choice, batch_size=1, max_len=8)


def test_bad_decoder_arguments_are_refused():
  model = make_model(MODELS["dense_learned_positions"])
  with pytest.raises(ValueError, match="max_len=64 exceeds the model's 32 learned"):
    decode.Decoder(model, batch_size=1, max_len=64)
  decoder = decode.Decoder(model, batch_size=2, max_len=8)
  with pytest.raises(ValueError, match="3 prompts for a decoder of batch_size=2"):
    decoder.generate([[1]] * 3, 2)
  with pytest.raises(ValueError, match="top_p=0.0 must be in"):
    decoder.generate([[1]], 2, top_p=0.0)


def test_bfloat16_compute_decodes_close_to_the_full_forward():
  model = make_model(MODELS["top2"], **{"model.dtype": "bfloat16"})
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(decoder._empty)
             if v.ndim == 4)
  cached = teacher_forced(decoder, "left")
  expected = full_logits(model, [p + f for p, f in zip(PROMPTS, FORCED)])
  for b in range(len(PROMPTS)):
    assert np.all(np.isfinite(cached[b]))
    # bfloat16 keeps ~3 significant digits; the two paths round differently.
    np.testing.assert_allclose(cached[b], expected[b], atol=0.1, rtol=0)


def test_sharded_decoding_equals_one_device(data=2, expert=4):
  # 8 rows x prefill 12 = 96 tokens, 12 per data-parallel device: groups of 12.
  overrides = {**MODELS["top2"], "moe.group_size": 12, "moe.dispatch": "indices"}
  prompts = [PROMPTS[b % 3][: 1 + b] for b in range(8)]
  single = decode.Decoder(make_model(overrides), batch_size=8, max_len=MAX_LEN,
                          prefill_len=PREFILL_LEN)
  expected = single.generate(prompts, 6, temperature=0.0)
  ref_logits, _ = single.prefill(prompts, all_logits=True)
  model = param_sharding.shard_model(make_model(overrides),
                                     sharding.make_mesh(data, expert))
  sharded = decode.Decoder(model, batch_size=8, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  assert sharded.generate(prompts, 6, temperature=0.0) == expected
  logits, _ = sharded.prefill(prompts, all_logits=True)
  mask = sharded.layout.mask
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref_logits)[mask],
                             atol=1e-5, rtol=0)


def _one_expert_layer():
  """2 experts, top-1, eval capacity C = max(ceil(0.5 * S / 2), 1): 1 slot for S <= 4.
  The router sends every token with positive features to expert 0."""
  from moe_jax.layers.moe_config import MoeConfig  # pylint: disable=import-outside-toplevel
  from moe_jax.layers.moe_layer import MoeLayer  # pylint: disable=import-outside-toplevel
  layer = MoeLayer(MoeConfig(d_model=4, d_ff=8, num_experts=2, top_k=1,
                             eval_capacity_factor=0.5, min_capacity=1, group_size=8,
                             activation="gelu",
                             capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1),
                   rngs=nnx.Rngs(0))
  layer.router.kernel.set_value(jnp.array([[1.0, -1.0]] * 4))
  x = jax.random.uniform(jax.random.key(1), (4, 1, 4), minval=0.5, maxval=1.5)
  alone = jnp.concatenate([layer(x[b:b + 1], deterministic=True)[0] for b in range(4)])
  return layer, x, alone


def test_a_decode_step_drops_no_token_for_capacity():
  # 4 rows' new tokens all pick expert 0. Evaluation (S = 4, C = 1) keeps the first
  # and drops 3 (output exactly 0); the step routes with C = S = 4 and keeps all 4, each
  # equal to the token routed alone.
  layer, x, alone = _one_expert_layer()
  y_eval, aux = layer(x, deterministic=True)
  assert float(aux.metrics["dropped_fraction"]) == 0.75
  assert np.count_nonzero(np.abs(np.asarray(y_eval)).sum(-1)) == 1
  y_step = layer.decode(x, jnp.ones((4, 1), bool), prefill=False)
  np.testing.assert_allclose(y_step, alone, atol=1e-6)
  assert np.all(np.abs(np.asarray(y_step)).sum(-1) > 0)


def test_padding_takes_no_capacity_at_prefill():
  # One row of 4 tokens, the first two padding: with C = 1 the single slot goes to the
  # first real token (position 2), not to padding; padding outputs exactly 0.
  layer, x, alone = _one_expert_layer()
  row = x.reshape(1, 4, 4)
  y = layer.decode(row, jnp.array([[False, False, True, True]]), prefill=True)
  np.testing.assert_allclose(y[0, 2], alone[2, 0], atol=1e-6)
  assert np.all(np.asarray(y[0, [0, 1, 3]]) == 0)


def test_a_step_of_few_tokens_gathers_only_the_chosen_experts():
  # 2 tokens x top-2 = 4 choices < 8 experts: the step takes gather_dispatch, which must
  # equal the capacity path (indices, C = S = 2) for the same routing.
  from moe_jax.layers.moe_config import MoeConfig  # pylint: disable=import-outside-toplevel
  from moe_jax.layers.moe_layer import MoeLayer  # pylint: disable=import-outside-toplevel
  layer = MoeLayer(MoeConfig(d_model=8, d_ff=16, num_experts=8, top_k=2,
                             activation="swiglu", dispatch="indices",
                             capacity_factor=1.0, group_size=1024, init_scale=0.1,
                             router_init_scale=0.1), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 1, 8))
  mask = jnp.array([[True], [False]])
  gathered = layer.decode(x, mask, prefill=False)
  capacity, _ = layer(x, deterministic=True, token_mask=mask, group_size=2, capacity=2)
  np.testing.assert_allclose(gathered, capacity, atol=1e-6, rtol=0)
  assert np.all(np.asarray(gathered[1]) == 0)  # the masked row

