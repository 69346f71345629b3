"""Hash routing (Roller et al. 2021) as ROUTERS["hash"]: the fixed assignment by hand,
the same expert for the same token everywhere, capacity against the slow reference,
dropless, cached decoding, training, and the config rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import analysis
from moe_jax.layers.moe_config import MoeConfig, validate_moe_config
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.layers.router_families import TokenContext
from moe_jax.inference import decode
from moe_jax.routing.hash import HASH_SEED, hash_experts, hash_route
from moe_jax.training.config import validate_config
from tests import reference
from tests.test_config_validation import switch_config
from tests.test_decode import (FORCED, MAX_LEN, PREFILL_LEN, PROMPTS, full_logits,
                               make_model, teacher_forced)


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser in Python integers."""
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & 0xFFFFFFFF
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & 0xFFFFFFFF
  return h ^ (h >> 16)


def _expert(token, num_experts, seed=HASH_SEED):
  """The documented assignment: block t // E rotated by fmix32(block ^ seed) mod E."""
  return (token % num_experts + _fmix32((token // num_experts) ^ seed) % num_experts) \
      % num_experts


# ------------------------------------------------------------------------------------
# The assignment
# ------------------------------------------------------------------------------------


def test_assignment_by_hand():
  # The Python finaliser is MurmurHash3's: fmix32(1) is a published value.
  assert _fmix32(0) == 0 and _fmix32(1) == 0x514E28B7
  # E = 4: ids 0-3 are block 0, rotated by fmix32(0 ^ 0x5EED) mod 4 = 2, so they go
  # to experts 2, 3, 0, 1; ids 4-7 are block 1, fmix32(1 ^ 0x5EED) mod 4 = 2 as well.
  assert _fmix32(0x5EED) % 4 == 2 and _fmix32(0x5EEC) % 4 == 2
  ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 1000, 12345], np.int32)
  np.testing.assert_array_equal(hash_experts(ids, 4), [_expert(int(t), 4) for t in ids])
  np.testing.assert_array_equal(hash_experts(ids, 4), [2, 3, 0, 1, 2, 3, 0, 1, 3, 1])
  np.testing.assert_array_equal(hash_experts(ids, 8, seed=0),
                                [_expert(int(t), 8, seed=0) for t in ids])


@pytest.mark.parametrize("vocab, num_experts", [(1000, 8), (1003, 8), (50, 7)])
def test_assignment_is_balanced_over_the_vocabulary_and_not_trivial(vocab, num_experts):
  experts = np.asarray(hash_experts(np.arange(vocab), num_experts))
  counts = np.bincount(experts, minlength=num_experts)
  assert counts.max() - counts.min() <= 1, counts
  assert not np.array_equal(experts, np.arange(vocab) % num_experts)  # blocks rotate


# ------------------------------------------------------------------------------------
# Capacity and dropless
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 2, 3, 8])
def test_capacity_drops_match_the_slow_reference(capacity):
  # G=2 groups of S=8 tokens with repeated ids, so experts overflow; token 6 of
  # group 1 is padding.
  ids = np.array([[3, 3, 7, 3, 11, 3, 7, 0], [5, 5, 5, 9, 1, 5, 5, 2]], np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, 6] = False
  num_experts = 4
  out = hash_route(jnp.asarray(ids), num_experts, capacity=capacity,
                   token_mask=jnp.asarray(mask))
  # The reference routes top-1 on a point mass at the hashed expert (gate 1).
  probs = np.zeros(ids.shape + (num_experts,))
  for g, s in np.ndindex(ids.shape):
    probs[g, s, _expert(int(ids[g, s]), num_experts)] = 1.0
  dispatch, combine = reference.route_loop(probs, top_k=1, capacity=capacity,
                                           token_mask=mask, queue_order="token_major")
  np.testing.assert_array_equal(out.dispatch_mask, dispatch)
  np.testing.assert_array_equal(out.combine_weights, combine)
  valid = mask.sum()
  kept_tokens = dispatch.any(axis=(2, 3)).sum()
  np.testing.assert_allclose(out.metrics["dropped_fraction"], 1 - kept_tokens / valid)
  assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
  assert float(out.metrics["router_entropy"]) == 0.0
  if capacity == 1:
    assert kept_tokens < valid  # the capacity bites


def _hash_layer(**kw):
  base = dict(d_model=8, d_ff=16, num_experts=4, router="hash", capacity_factor=1.0,
              eval_capacity_factor=1.0, group_size=0, min_capacity=1)
  base.update(kw)
  return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(0))


def test_dropless_equals_the_capacity_unbounded_einsum():
  ids = jax.random.randint(jax.random.key(0), (3, 12), 0, 6)  # few ids: overflow
  x = jax.random.normal(jax.random.key(1), (3, 12, 8))
  ctx = TokenContext(token_ids=ids)
  dropless = _hash_layer(dispatch="dropless")
  einsum = _hash_layer(dispatch="einsum", capacity_factor=4.0, eval_capacity_factor=4.0)
  y_dropless, aux = dropless(x, deterministic=True, context=ctx)
  y_einsum, aux_einsum = einsum(x, deterministic=True, context=ctx)
  np.testing.assert_allclose(y_dropless, y_einsum, atol=1e-5, rtol=1e-5)
  assert float(aux.metrics["dropped_fraction"]) == 0.0
  np.testing.assert_array_equal(aux.metrics["choice_counts"],
                                aux_einsum.metrics["choice_counts"])
  # The same layer with capacity 1 slot per expert drops (so the case is not trivial).
  tight = _hash_layer(dispatch="einsum", capacity_factor=0.25, eval_capacity_factor=0.25)
  _, aux_tight = tight(x, deterministic=True, context=ctx)
  assert float(aux_tight.metrics["dropped_fraction"]) > 0.0


def test_layer_without_token_ids_says_how_to_pass_them():
  layer = _hash_layer()
  with pytest.raises(ValueError, match="TokenContext"):
    layer(jnp.zeros((1, 4, 8)), deterministic=True)


# ------------------------------------------------------------------------------------
# In a model: same expert everywhere, cached decoding, training
# ------------------------------------------------------------------------------------

HASH_MODEL = {"model.moe_every": 1, "moe.router": "hash", "moe.top_k": 1}


def test_same_token_same_expert_at_every_position_row_and_layer():
  model = make_model(HASH_MODEL)
  tokens = jnp.array([[5, 9, 5, 17, 5, 9, 33, 5], [9, 5, 5, 60, 17, 5, 2, 9]], jnp.int32)
  routes = analysis.trace_routing(model, tokens)
  assert list(routes) == ["blocks/0/ffn", "blocks/1/ffn"]
  expected = np.array([[_expert(int(t), 4)] for t in np.asarray(tokens).ravel()])
  for r in routes.values():
    np.testing.assert_array_equal(r.expert_index.reshape(-1, 1), expected)
    np.testing.assert_array_equal(r.kept, True)  # eval capacity factor 4: C = S
    np.testing.assert_array_equal(r.gates, 1.0)
    np.testing.assert_array_equal(r.confidence, 1.0)  # a point mass, no router


def test_mixture_of_depths_block_hashes_the_tokens_it_runs():
  # Block 1 is a routed block: its MoE layer sees only the k tokens of each row that
  # the depth router selects, and must hash their own ids (the context is gathered).
  model = make_model(HASH_MODEL, **{"model.mod_every": 2, "model.mod_capacity": 0.5})
  tokens = jnp.array([[5, 9, 5, 17, 5, 9, 33, 5], [9, 5, 5, 60, 17, 5, 2, 9]], jnp.int32)
  routes = analysis.trace_routing(model, tokens)
  selected = np.asarray(model.forward(tokens, deterministic=True).depth_aux[1].selected)
  routed = routes["blocks/1/ffn"].expert_index[..., 0]  # i32[B, k]
  assert routed.shape == (2, 4)
  for b in range(2):
    want = sorted(_expert(int(t), 4) for t in np.asarray(tokens[b])[selected[b]])
    assert sorted(routed[b].tolist()) == want


def test_cached_decoding_equals_the_full_forward():
  model = make_model(HASH_MODEL)
  decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN)
  expected = full_logits(model, [p + f for p, f in zip(PROMPTS, FORCED)])
  cached = teacher_forced(decoder, "right")
  for b in range(len(PROMPTS)):
    np.testing.assert_allclose(cached[b], expected[b], atol=1e-5, rtol=0)


def test_tiny_lm_trains_without_router_parameters():
  model = make_model(HASH_MODEL, **{"moe.capacity_factor": 1.25})
  params = nnx.state(model, nnx.Param)
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
  assert any("ffn/experts" in p for p in paths)
  assert not any("router" in p for p in paths), paths
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, 64)

  @nnx.jit
  def step(model, optimizer, tokens):
    def loss_fn(model):
      logits, aux = model(tokens[:, :-1], deterministic=False)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      return ce + sum(0.01 * a.aux_loss + 0.001 * a.z_loss for a in aux.values()), aux
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, aux

  losses = []
  for _ in range(8):
    loss, aux = step(model, optimizer, tokens)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.5, losses
  for a in aux.values():  # nothing for a router to learn
    assert float(a.aux_loss) == 0.0 and float(a.z_loss) == 0.0


# ------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    ({"moe.top_k": 2}, "moe.top_k=2"),
    ({"moe.balance_scope": "batch"}, "moe.balance_scope='batch'"),
    ({"moe.bias_update_rate": 1e-3}, "moe.bias_update_rate=0.001"),
    ({"moe.noop_experts": 2}, "moe.noop_experts=2"),
    ({"moe.jitter_noise": 0.01}, "moe.jitter_noise=0.01"),
])
def test_bad_combinations_give_one_line_naming_the_key(overrides, key):
  errors = validate_config(switch_config(**{"moe.router": "hash", **overrides}),
                           num_devices=1)
  assert len(errors) == 1, errors
  assert key in errors[0] and "router='hash'" in errors[0], errors[0]
  assert "\n" not in errors[0]


def test_hash_config_is_valid_with_capacity_and_dropless():
  assert validate_config(switch_config(**{"moe.router": "hash"}), num_devices=1) == []
  cfg = MoeConfig(d_model=8, d_ff=16, num_experts=4, router="hash", dispatch="dropless")
  assert validate_moe_config(cfg) == []
  assert _hash_layer().is_causal
  assert _hash_layer().router is None
  assert _hash_layer(dispatch="dropless").experts_per_token == 1
