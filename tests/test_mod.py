"""Mixture-of-Depths (moe_jax/models/mod.py, moe_jax/routing/depth.py): selection, the
routed block against a loop reference, gradients, causality in training and sampling,
cached decoding, FLOP and parameter counts, configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.inference import decode
from moe_jax.models import mod
from moe_jax import routing
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.routing import depth
from moe_jax.models.transformer import Transformer
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.sizes import count_params, flops_per_token
from tests.reference import routed_block_loop
from tests.test_decode import FORCED, MAX_LEN, PROMPTS, teacher_forced
from tests.test_decode import make_model as make_lm

M, H, V = 16, 32, 64


def config(num_layers=2, capacity=0.25, predictor="router_bce", moe=None, moe_every=0,
           **kw):
  return TransformerConfig(vocab_size=V, num_layers=num_layers, d_model=M, num_heads=2,
                           d_ff=H, max_len=32, mod_every=2, mod_capacity=capacity,
                           mod_predictor=predictor, moe=moe, moe_every=moe_every, **kw)


def make(**kw):
  return Transformer(config(**kw), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------
# Selection: pure functions
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity,length,k", [
    (0.125, 128, 16), (0.125, 1, 1), (0.125, 9, 2),  # ceil(1.125) = 2
    (0.3, 10, 3),  # 0.3 * 10 = 3.0000000000000004 in floats: still 3
    (1.0, 7, 7), (0.25, 16, 4)])
def test_k_is_the_ceiling_of_capacity_times_length(capacity, length, k):
  assert depth.depth_capacity(length, capacity) == k


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5])
def test_a_capacity_that_selects_no_token_or_too_many_is_refused(capacity):
  with pytest.raises(ValueError, match="use a capacity in \\(0, 1\\]"):
    depth.depth_capacity(16, capacity)


def test_top_k_by_hand_with_ties_to_the_lower_position():
  r = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0],  # three tokens tie at 3
                 [0.5, 0.5, 0.5, 0.5, 0.5],  # all tie
                 [-1.0, -2.0, 4.0, 0.0, 4.0]])
  # Row 0, k = 2: of the three 3.0s the lower positions 1 and 2 win over 4.
  # Row 1: positions 0 and 1. Row 2: the two 4.0s, positions 2 and 4.
  np.testing.assert_array_equal(depth.select_top_k(r, 2), [[1, 2], [0, 1], [2, 4]])
  # k = 4, row 0: 1, 2, 4 (the 3.0s), then 3 (2.0); returned in position order.
  np.testing.assert_array_equal(depth.select_top_k(r, 4)[0], [1, 2, 3, 4])
  # Padding ranks below every real token: row 0 without position 1 -> 2 and 4.
  mask = jnp.ones((3, 5), bool).at[0, 1].set(False)
  np.testing.assert_array_equal(depth.select_top_k(r, 2, mask)[0], [2, 4])
  member = depth.membership(depth.select_top_k(r, 2), 5)
  np.testing.assert_array_equal(member[2], [False, False, True, False, True])


def test_bce_and_metrics_by_hand():
  logits = jnp.array([[2.0, -1.0, 0.0, 3.0]])
  target = jnp.array([[True, False, True, False]])
  valid = jnp.array([[True, True, True, False]])  # the last token is padding
  # BCE = softplus(z) - y z, mean over the 3 valid tokens:
  # (softplus(2) - 2) + softplus(-1) + softplus(0) = 0.126928 + 0.313262 + 0.693147
  want = (math.log1p(math.exp(2)) - 2 + math.log1p(math.exp(-1)) + math.log(2)) / 3
  assert float(depth.predictor_bce(logits, target, valid)) == pytest.approx(want, 1e-6)
  weights = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  m = depth.depth_metrics(weights, logits, target, target, valid)
  # Predicted (logit > 0, i.e. sigmoid > 0.5): T, F, F (0 is not > 0); agrees with the
  # target on tokens 0 and 1 of 3. r over valid tokens: mean 2, std sqrt(2/3).
  assert float(m["predicted_fraction"]) == pytest.approx(1 / 3)
  assert float(m["predictor_accuracy"]) == pytest.approx(2 / 3)
  assert float(m["routed_fraction"]) == pytest.approx(2 / 3)
  assert float(m["router_mean"]) == pytest.approx(2.0)
  assert float(m["router_std"]) == pytest.approx(math.sqrt(2 / 3), 1e-6)


def test_pack_routed_puts_routed_tokens_first_in_order():
  routed = jnp.array([[False, True, False, True, True]])
  order, first = depth.pack_routed(routed)
  np.testing.assert_array_equal(order, [[1, 3, 4, 0, 2]])
  np.testing.assert_array_equal(first, [[True, True, True, False, False]])


# ---------------------------------------------------------------------------------
# The routed block
# ---------------------------------------------------------------------------------


def _block_params(block):
  a = block.attn
  return dict(router=np.asarray(block.mod_router.kernel[...], np.float64),
              wq=np.asarray(a.query[...], np.float64),
              wk=np.asarray(a.key[...], np.float64),
              wv=np.asarray(a.value[...], np.float64),
              wo=np.asarray(a.out[...], np.float64),
              attn_scale=np.asarray(block.attn_norm.scale[...], np.float64),
              ffn_scale=np.asarray(block.ffn_norm.scale[...], np.float64),
              ffn_wi=np.asarray(block.ffn.wi[...], np.float64),
              ffn_wo=np.asarray(block.ffn.wo[...], np.float64))


def _run_block(block, x, **kw):
  positions = jnp.arange(x.shape[1], dtype=jnp.int32)
  return block(x, positions, deterministic=True, **kw)


def test_routed_block_matches_the_gather_scatter_loop_reference():
  model = make()
  block = model.blocks[1]
  assert isinstance(block, mod.RoutedBlock) and model.cfg.mod_blocks == (1,)
  x = jax.random.normal(jax.random.key(1), (2, 12, M))
  out, aux = _run_block(block, x)
  want, picked = routed_block_loop(x, capacity=0.25, **_block_params(block))
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
  # k = ceil(0.25 * 12) = 3 per row; the others leave exactly as they came in.
  selected = np.asarray(aux.depth.selected)
  for b in range(2):
    assert sorted(np.flatnonzero(selected[b])) == picked[b]
    others = ~selected[b]
    assert np.array_equal(np.asarray(out)[b, others], np.asarray(x)[b, others])
  assert float(aux.depth.metrics["routed_fraction"]) == pytest.approx(3 / 12)


def test_compute_runs_on_the_gathered_k_tokens_only():
  # Every matmul of the routed block but the router's runs on [B, k = 3, ...]: no
  # operand or result has the sequence length L = 12 (a masked full-length block
  # would). Sizes are distinct: B 2, k 3, N 2, D 8, M 16, H 32, L 12.
  block = make().blocks[1]
  x = jnp.zeros((2, 12, M))
  jaxpr = jax.make_jaxpr(lambda x: _run_block(block, x)[0])(x)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  shapes = [tuple(v.aval.shape) for e in dots for v in (*e.invars, *e.outvars)]
  router = [(2, 12, M), (M,), (2, 12)]  # the router: one weight per token
  assert all(s in router or 12 not in s for s in shapes), shapes
  assert any(s == (2, 3, M) for s in shapes)  # the gathered tokens


def test_gradients_reach_the_router_through_r_times_f():
  # out_i = x_i + (x_i . w) f_i for the selected tokens, and f does not depend on w,
  # so d(sum_i c . out_i)/dw = sum_{i selected} (c . f_i) x_i.
  block = make().blocks[1]
  x = jax.random.normal(jax.random.key(2), (2, 12, M))
  c = jax.random.normal(jax.random.key(3), (2, 12, M))
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)

  def loss(params):
    out, _ = _run_block(nnx.merge(graphdef, params, rest), x)
    return jnp.sum(out * c)

  grads = jax.grad(loss)(params)
  got = np.asarray(grads["mod_router"]["kernel"][...])
  out, aux = _run_block(block, x)
  r = np.asarray(x) @ np.asarray(block.mod_router.kernel[...])
  selected = np.asarray(aux.depth.selected)
  f = (np.asarray(out) - np.asarray(x)) / r[..., None]
  want = np.einsum("BL,BLM->M", np.sum(np.asarray(c) * f, -1) * selected, np.asarray(x))
  assert np.abs(got).max() > 0
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("predictor", ["router_bce", "mlp"])
def test_the_bce_trains_the_router_or_only_the_mlp(predictor):
  model = make(predictor=predictor)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, V)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(params):
    out = nnx.merge(graphdef, params, rest).forward(tokens, deterministic=True)
    return out.depth_aux[1].bce_loss, jnp.mean(out.logits ** 2)

  bce_grads = jax.grad(lambda p: losses(p)[0])(params)
  lm_grads = jax.grad(lambda p: losses(p)[1])(params)
  router = np.abs(np.asarray(bce_grads["blocks"][1]["mod_router"]["kernel"][...]))
  if predictor == "router_bce":
    assert router.max() > 0  # the BCE is on the router's own logits
  else:
    # Stop-gradient inputs: the BCE reaches the MLP and nothing else, and the LM loss
    # never reaches the MLP.
    flat = nnx.to_flat_state(nnx.State(bce_grads))
    for path, g in flat:
      moved = np.abs(np.asarray(g.get_value())).max() > 0
      assert moved == ("predictor" in path), path
    mlp = lm_grads["blocks"][1]["predictor"]
    assert all(np.abs(np.asarray(v.get_value())).max() == 0
               for _, v in nnx.to_flat_state(nnx.State(mlp)))


# ---------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------


def test_training_mode_leak_by_hand_a_future_token_takes_an_earlier_ones_slot():
  # r = x[..., 0]: L = 4, capacity 0.5 -> k = 2. r = (1, 2, 0.5, 0.1) selects {0, 1}.
  # Raising the future token 3 to r = 3 selects {1, 3}: token 0 drops out of the
  # selection (so its output becomes x_0), and token 1 no longer attends to it.
  # This is the leak of top-k routing (docs/mod.md); token 2 is unselected either way
  # and unchanged. With the predictor (sigmoid(r) > 0.5, all four r > 0 here) the
  # earlier outputs do not move.
  model = make(capacity=0.5)
  block = model.blocks[1]
  kernel = np.zeros(M, np.float32)
  kernel[0] = 1.0
  block.mod_router.kernel[...] = jnp.asarray(kernel)
  x = np.array(jax.random.normal(jax.random.key(5), (1, 4, M)))
  x[0, :, 0] = [1.0, 2.0, 0.5, 0.1]
  changed = x.copy()
  changed[0, 3, 0] = 3.0
  out_a, aux_a = _run_block(block, jnp.asarray(x))
  out_b, aux_b = _run_block(block, jnp.asarray(changed))
  np.testing.assert_array_equal(aux_a.depth.selected[0], [True, True, False, False])
  np.testing.assert_array_equal(aux_b.depth.selected[0], [False, True, False, True])
  out_a, out_b = np.asarray(out_a)[0], np.asarray(out_b)[0]
  assert np.array_equal(out_b[0], x[0, 0]) and not np.allclose(out_a[0], x[0, 0])
  assert not np.allclose(out_a[1], out_b[1])
  assert np.array_equal(out_a[2], out_b[2])
  pa, _ = _run_block(block, jnp.asarray(x), use_predictor=True)
  pb, _ = _run_block(block, jnp.asarray(changed), use_predictor=True)
  np.testing.assert_array_equal(np.asarray(pa)[0, :3], np.asarray(pb)[0, :3])


@pytest.fixture(scope="module")
def lm():
  """A 4-block model (routed blocks 1 and 3), its jitted forward, and token pairs that
  differ from position 10 on."""
  model = make(num_layers=4, capacity=0.25)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda t, p: nnx.merge(graphdef, state).forward(
      t, deterministic=True, use_predictor=p), static_argnums=1)
  a = jax.random.randint(jax.random.key(6), (8, 16), 0, V)
  b = a.at[:, 10:].set((a[:, 10:] + 1 + jnp.arange(8)[:, None]) % V)
  return forward, a, b


def test_training_mode_changes_no_earlier_output_except_through_the_selection(lm):
  # A token's output depends on the tokens at or before it and on which of them each
  # routed block selects. So before the first position where the selection of the
  # two sequences differs in any routed block, the logits must be equal.
  forward, a, b = lm
  out_a, out_b = forward(a, False), forward(b, False)
  leaked = 0
  for row in range(a.shape[0]):
    first = 10
    for i in (1, 3):
      differ = np.flatnonzero(np.asarray(out_a.depth_aux[i].selected[row])
                              != np.asarray(out_b.depth_aux[i].selected[row]))
      if differ.size:
        first = min(first, int(differ[0]))
    np.testing.assert_allclose(out_a.logits[row, :first], out_b.logits[row, :first],
                               atol=1e-6, err_msg=f"row {row}")
    leaked += first < 10
  assert leaked > 0  # some rows do show the leak (the test is not vacuous)


def test_sampling_mode_with_the_predictor_is_causal(lm):
  forward, a, b = lm
  out_a, out_b = forward(a, True), forward(b, True)
  np.testing.assert_allclose(out_a.logits[:, :10], out_b.logits[:, :10], atol=1e-6)
  assert not np.allclose(out_a.logits[:, 10:], out_b.logits[:, 10:])
  for i in (1, 3):
    routed = np.asarray(out_a.depth_aux[i].routed)
    assert 0 < routed.mean() < 1  # the predictor routes some tokens, not all
    np.testing.assert_array_equal(routed[:, :10],
                                  np.asarray(out_b.depth_aux[i].routed)[:, :10])


# ---------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------

MOD_MODELS = {
    "mod": {"model.num_layers": 4, "model.mod_every": 2, "model.mod_capacity": 0.25},
    # MLP predictor, top-2 MoE FFNs with no-op experts (MoDE) in the routed blocks.
    "mod_mlp_mode": {"model.num_layers": 4, "model.mod_every": 2,
                     "model.mod_capacity": 0.25, "model.mod_predictor": "mlp",
                     "model.moe_every": 2, "moe.top_k": 2, "moe.noop_experts": 4,
                     "moe.eval_capacity_factor": 8.0},
    # Routed Mamba blocks (1, 3) around an attention block (2): an unrouted token
    # leaves the conv and SSM state as it was.
    "mod_mamba": {"model.num_layers": 4, "model.attn_layer_period": 4,
                  "model.attn_layer_offset": 2, "model.position": "none",
                  "mamba.chunk_size": 4, "model.mod_every": 2, "model.mod_capacity": 0.25},
}


_lms = {}


def _decoding_setup(name):
  """(model, its jitted predictor-routed forward, the teacher-forced rows as a padded
  i32[3, 13] batch), built once per model."""
  if name not in _lms:
    model = make_lm(MOD_MODELS[name])
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda t: nnx.merge(graphdef, state).forward(
        t, deterministic=True, use_predictor=True))
    tokens = np.zeros((3, 13), np.int32)
    for b, (p, f) in enumerate(zip(PROMPTS, FORCED)):
      tokens[b, :len(p) + len(f)] = p + f
    _lms[name] = model, forward, tokens
  return _lms[name]


@pytest.mark.parametrize("name", [
    "mod", pytest.param("mod_mlp_mode", marks=pytest.mark.slow),
    pytest.param("mod_mamba", marks=pytest.mark.slow)])
def test_cached_decoding_equals_the_forward_pass_with_the_predictor(name):
  model, forward, tokens = _decoding_setup(name)
  full = forward(jnp.asarray(tokens))
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=12)
  for padding in decode.PADDINGS:
    cached = teacher_forced(decoder, padding)
    for b, (p, f) in enumerate(zip(PROMPTS, FORCED)):
      np.testing.assert_allclose(cached[b], np.asarray(full.logits[b, :len(p) + len(f)]),
                                 atol=1e-5, rtol=0, err_msg=f"row {b}, {padding}")
  # After a left-padded prefill, a routed block's cache holds exactly the prompt
  # tokens its predictor routed, at their positions; the others' slots stay empty
  # (-1), so no later token can attend to them in that block.
  decoder.prefill(PROMPTS, padding="left")
  cache = nnx.State(decoder._cache)  # pylint: disable=protected-access
  seen = set()
  for i in (1, 3):
    if "attn" not in cache["blocks"][i]:
      continue  # a Mamba block keeps no slots
    slots = np.asarray(cache["blocks"][i]["attn"]["cached_positions"].get_value())
    for b, prompt in enumerate(PROMPTS):
      routed = np.asarray(full.depth_aux[i].routed[b, :len(prompt)])
      seen.update(routed.tolist())
      want = np.where(routed, np.arange(len(prompt)), -1)
      np.testing.assert_array_equal(slots[b, :len(prompt)], want)
      assert np.all(slots[b, len(prompt):] == -1)
  assert seen == ({True, False} if name != "mod_mamba" else set())


@pytest.mark.slow
def test_cached_sampling_equals_the_uncached_sampler_and_skips_unrouted_steps():
  model, forward, tokens = _decoding_setup("mod")
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=12)
  greedy = decoder.generate(PROMPTS, 10, temperature=0.0, padding="left")
  for prompt, toks in zip(PROMPTS, greedy):
    assert toks == decode.generate_uncached(model, prompt, 10, temperature=0.0,
                                            window=MAX_LEN)
  # Batch 1: a step where the one row is not routed skips the block (lax.cond); the
  # generated row must show such a step for the skip path to have run.
  single = decode.Decoder(model, batch_size=1, max_len=MAX_LEN, prefill_len=12)
  toks = single.generate([PROMPTS[1]], 10, temperature=0.0)[0]
  assert toks == greedy[1]
  seq = np.zeros_like(tokens[:1])  # the same shape: no new compilation
  seq[0, :len(PROMPTS[1]) + 9] = PROMPTS[1] + toks[:-1]
  routed = forward(jnp.asarray(seq)).depth_aux
  steps = slice(len(PROMPTS[1]), len(PROMPTS[1]) + 9)
  assert any(not np.all(np.asarray(routed[i].routed[0, steps])) for i in (1, 3))


# ---------------------------------------------------------------------------------
# Sizes and FLOPs
# ---------------------------------------------------------------------------------


def test_flops_count_k_tokens_in_routed_blocks_by_hand():
  # 2 blocks, block 1 routed; L = 16, capacity 0.25 -> k = 4. Per token (2 FLOPs per
  # multiply-add): a full block 2 (4 M^2 + 2 M H) + 4 L M = 4096 + 1024 = 5120; a
  # routed block runs k of L tokens, each with context k:
  # (4096 + 4 * 4 * 16) * 4 / 16 = 4352 / 4 = 1088. Head 2 M V = 2048.
  # The router, 2 M = 32 per token, on its own.
  model = nnx.eval_shape(lambda: Transformer(config(), rngs=nnx.Rngs(0)))
  f = flops_per_token(model, 16)
  assert f == {"active": 5120 + 1088 + 2048, "total": 5120 + 1088 + 2048, "router": 32}
  # The MLP predictor runs on every token: 2 x (M * M/4 + M/4 + M/4 + 1) = 2 * 73.
  mlp = nnx.eval_shape(lambda: Transformer(config(predictor="mlp"), rngs=nnx.Rngs(0)))
  assert flops_per_token(mlp, 16)["active"] == f["active"] + 146
  # k = ceil(0.25 * 10) = 3 of L = 10: (4096 + 4 * 3 * 16) * 3 // 10 summed per
  # sequence with the full block's (4096 + 4 * 10 * 16) * 10, then // 10.
  assert flops_per_token(model, 10)["active"] == (
      (4736 * 10 + 4288 * 3) // 10 + 2048)


def test_flops_of_an_moe_with_no_op_experts_in_a_routed_block_by_hand():
  # Block 1 is routed and MoE: E = 4 experts of width H plus N = 4 no-op experts,
  # top-1. Per routed token: attention 2 * 4 M^2 + 4 k M = 2048 + 256; experts
  # 2 * (4 * 2 M H) * 1 / (E + N) = 2 * 4096 / 8 = 1024 (total: all 8192); MoE
  # router 2 M (E + N) = 256; times k / L = 1/4.
  moe = MoeConfig(d_model=M, d_ff=H, num_experts=4, noop_experts=4, group_size=0,
                  capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
  model = nnx.eval_shape(lambda: Transformer(config(moe=moe, moe_every=2),
                                             rngs=nnx.Rngs(0)))
  f = flops_per_token(model, 16)
  assert f["active"] == 5120 + (2048 + 256 + 1024) // 4 + 2048
  assert f["total"] == 5120 + (2048 + 256 + 8192) // 4 + 2048
  assert f["router"] == 32 + 256 // 4


def test_param_counts_include_the_router_and_the_predictor():
  base = count_params(nnx.eval_shape(lambda: Transformer(
      TransformerConfig(vocab_size=V, num_layers=2, d_model=M, num_heads=2, d_ff=H,
                        max_len=32), rngs=nnx.Rngs(0))))
  routed = count_params(nnx.eval_shape(lambda: Transformer(config(), rngs=nnx.Rngs(0))))
  mlp = count_params(nnx.eval_shape(lambda: Transformer(config(predictor="mlp"),
                                                        rngs=nnx.Rngs(0))))
  assert routed["total"] == base["total"] + M and routed["router"] == M
  assert routed["active"] == routed["total"]  # a routed token uses all the weights
  # MLP: W_i [16, 4], b_i [4], w_o [4], b_o [] = 73.
  assert mlp["predictor"] == 73 and mlp["total"] == routed["total"] + 73


# ---------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,words", [
    ({"mod_every": 1}, "mod_every=1 must be 0"),
    ({"num_layers": 1}, "places no routed block"),
    ({"mod_capacity": 0.0}, "<= 0 tokens"),
    ({"mod_capacity": 2.0}, "more than the L tokens"),
    ({"mod_predictor": "oracle"}, "'router_bce'")])
def test_transformer_config_refuses_impossible_values(kw, words):
  args = dict(vocab_size=V, num_layers=2, d_model=M, num_heads=2, d_ff=H, mod_every=2)
  args.update(kw)
  with pytest.raises(ValueError, match=words):
    TransformerConfig(**args)


def test_routing_exports():
  assert routing.select_top_k is depth.select_top_k
  assert set(mod.PREDICTORS) == set(depth.PREDICTOR_NAMES)


# ---------------------------------------------------------------------------------
# Training and evaluation steps
# ---------------------------------------------------------------------------------


def _tiny_config(coef):
  from moe_jax.training.config import default_config  # pylint: disable=import-outside-toplevel
  c = default_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 2, 16, 2, 32
  c.model.mod_every, c.model.mod_capacity, c.model.mod_predictor = 2, 0.25, "mlp"
  c.model.mod_aux_loss_coef = coef
  c.weight_decay, c.warmup_steps, c.data.seq_len = 0.0, 0, 16
  return c


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_the_train_step_weights_the_bce_and_reports_the_metrics(coef):
  # The MLP predictor only learns from coef * BCE: with coef 0 its gradient is 0 and
  # (no weight decay) Adam leaves it exactly where it was.
  from moe_jax.training import build, evaluation, loop_utils, losses, run_state, train  # pylint: disable=import-outside-toplevel
  c = _tiny_config(coef)
  model = build.make_model(c, vocab_size=V)
  tx, _ = build.make_optimizer(c)
  _, params, _ = run_state.split_model(model)
  state = run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
  before = jax.tree.map(np.asarray, params["blocks"][1]["predictor"])
  tokens = jax.random.randint(jax.random.key(7), (2, 17), 0, V)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  state, metrics = train.make_train_step(model, tx, c)(state, batch)
  after = state.params["blocks"][1]["predictor"]
  moved = [not np.array_equal(before[k], np.asarray(after[k])) for k in before]
  assert all(moved) if coef else not any(moved)
  assert metrics["mod_predictor_accuracy"].shape == (1,)  # one routed block
  line = loop_utils.train_line(jax.device_get(metrics), (), (1,))
  assert line["mod_routed_fraction"] == {"layer_1": pytest.approx(0.25)}
  assert set(line) >= {"mod_aux_loss", "mod_predicted_fraction", "mod_router_mean",
                       "mod_router_std", "mod_predictor_accuracy"}
  if coef:  # the eval line: the causal loss and the predictor per block
    values = evaluation.evaluate(train.make_eval_step(model), state.params, [batch])
    trained = run_state.merge_model(*train._merge_parts(model, state.params), None)  # pylint: disable=protected-access
    logits, _ = jax.jit(lambda t: trained(t, deterministic=True, use_predictor=True))(
        batch["inputs"])
    ce, count = losses.lm_loss(logits, batch["targets"])
    assert values["eval_loss_predictor"] == pytest.approx(float(ce / count), rel=1e-5)
    assert values["eval_loss_predictor"] != pytest.approx(values["eval_loss"], rel=1e-7)
    assert set(values["eval_mod_predictor_accuracy"]) == {"layer_1"}
    assert set(values["eval_mod_predicted_fraction"]) == {"layer_1"}
