"""``balance_scope``: balance statistics per routing group or over the whole batch.

Hand-computed cases for the Switch loss and the noisy top-k losses, "group" equal to
the per-group formula it always was, padding left out of the pooled counts, the family
defaults of the layer, and sharded runs equal to one-device runs with batch scope.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeConfig, MoeLayer, routing
from moe_jax.training.build import moe_config
from moe_jax.training.config import default_config, validate_config
from moe_jax.layers.router_families import ROUTERS, balance_scope
from tests.reference import noisy_top_k_loop
from tests.sharding_demo import train_demo

route = jax.jit(routing.route, static_argnames=(
    "top_k", "capacity", "balance_choices", "balance_scope"))
noisy_top_k = jax.jit(routing.noisy_top_k,
                      static_argnames=("top_k", "capacity", "balance_scope"))

# Two groups of S = 3 tokens over E = 2 experts (top-1 picks the larger p).
# Group 0: three tokens, choices e0, e0, e1.
# Group 1: one token choosing e0, then two padding tokens that would choose e1.
PROBS = np.array([[[.8, .2], [.6, .4], [.4, .6]],
                  [[.9, .1], [.2, .8], [.2, .8]]], np.float32)
MASK = np.array([[True, True, True], [True, False, False]])


def _logits(probs=PROBS):
  return jnp.log(jnp.asarray(probs))


def _switch(scope=None, mask=MASK, logits=None):
  kw = {} if scope is None else {"balance_scope": scope}
  logits = _logits() if logits is None else logits
  return route(logits, top_k=1, capacity=3,
               token_mask=None if mask is None else jnp.asarray(mask), **kw)


def test_switch_batch_scope_by_hand():
  # Pooled over the 4 valid tokens: f = [3/4, 1/4], P = [2.7/4, 1.3/4], so
  # aux = 2 * (.75 * .675 + .25 * .325) = 1.175.
  batch = float(_switch("batch").aux_loss)
  np.testing.assert_allclose(batch, 1.175, rtol=1e-6)
  # Per group: group 0 f = [2/3, 1/3], P = [.6, .4] -> 2 * (.4 + .4/3) = 16/15; group 1
  # f = [1, 0], P = [.9, .1] -> 1.8; the mean over groups is 1.4333. Weighting the
  # groups by their tokens (1.25) is not the pooled value either.
  group = float(_switch("group").aux_loss)
  np.testing.assert_allclose(group, (16 / 15 + 1.8) / 2, rtol=1e-6)
  assert abs(batch - group) > 0.2 and abs(batch - (3 * 16 / 15 + 1.8) / 4) > 0.05


def test_switch_batch_scope_equals_one_group_of_all_tokens():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 8, 6)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 8)) < 0.8)
  for choices in ("first", "all"):
    pooled = route(logits, top_k=2, capacity=8, token_mask=mask,
                   balance_choices=choices, balance_scope="batch")
    one = route(logits.reshape(1, 32, 6), top_k=2, capacity=32,
                token_mask=mask.reshape(1, 32), balance_choices=choices)
    np.testing.assert_allclose(pooled.aux_loss, one.aux_loss, rtol=1e-6)


def test_padding_is_left_out_of_the_pooled_statistics():
  # Only the 4 valid tokens count: the same value as those 4 tokens alone in one group.
  valid = jnp.log(jnp.asarray(PROBS[MASK][None]))  # f32[1, 4, E]
  alone = route(valid, top_k=1, capacity=4, balance_scope="batch")
  np.testing.assert_allclose(_switch("batch").aux_loss, alone.aux_loss, rtol=1e-6)
  # Counting the padding would give f = [1/2, 1/2], i.e. exactly 1.
  np.testing.assert_allclose(_switch("batch", mask=None).aux_loss, 1.0, rtol=1e-6)
  # noisy_top_k without noise, top-1: importance = load = counts of valid tokens, [3, 1]
  # pooled; the padding would make them [3, 3] (cv2 0).
  out = noisy_top_k(_logits(), jnp.ones_like(_logits()), top_k=1, capacity=3,
                    token_mask=jnp.asarray(MASK), balance_scope="batch")
  np.testing.assert_allclose(out.metrics["load_cv2"], 0.25, rtol=1e-6)


def test_noisy_batch_scope_by_hand():
  # Without noise and top-1 the gates are 1, so importance = load = choice counts.
  # Pooled [3, 1]: var 1, mean 2 -> cv2 = 1/4 each. Per group: [2, 1] -> 1/9 and
  # [1, 0] -> 1, mean 5/9 each.
  logits = _logits()
  mask = jnp.asarray(MASK)
  batch = noisy_top_k(logits, jnp.ones_like(logits), top_k=1, capacity=3,
                      token_mask=mask, balance_scope="batch")
  group = noisy_top_k(logits, jnp.ones_like(logits), top_k=1, capacity=3,
                      token_mask=mask, balance_scope="group")
  for name in ("importance_cv2", "load_cv2"):
    np.testing.assert_allclose(batch.metrics[name], 0.25, rtol=1e-6)
    np.testing.assert_allclose(group.metrics[name], 5 / 9, rtol=1e-6)
  np.testing.assert_allclose(batch.aux_loss, 0.5, rtol=1e-6)
  np.testing.assert_allclose(group.aux_loss, 10 / 9, rtol=1e-6)


def test_noisy_batch_scope_with_noise_is_the_pooled_loop_reference():
  # Shazeer et al.'s importance and smooth load of every valid token (before capacity:
  # C = 3 drops some choices here) summed over all groups, then one cv2 each.
  rng = np.random.default_rng(1)
  clean = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
  std = jnp.asarray(rng.uniform(0.5, 1.5, size=(3, 8, 5)), jnp.float32)
  mask = rng.random((3, 8)) < 0.75
  key = jax.random.key(3)
  out = noisy_top_k(clean, std, top_k=2, capacity=3, rng=key,
                    token_mask=jnp.asarray(mask), balance_scope="batch")
  noise = jax.random.normal(key, clean.shape, jnp.float32)  # the contract's draw
  ref = noisy_top_k_loop(clean, std, noise, top_k=2, capacity=3, token_mask=mask)
  pooled = [routing.cv2(ref[name].sum(0)) for name in ("importance", "load")]
  np.testing.assert_allclose(out.metrics["importance_cv2"], pooled[0], rtol=1e-5)
  np.testing.assert_allclose(out.metrics["load_cv2"], pooled[1], rtol=1e-5)
  np.testing.assert_allclose(out.aux_loss, sum(pooled), rtol=1e-5)
  group = noisy_top_k(clean, std, top_k=2, capacity=3, rng=key,
                      token_mask=jnp.asarray(mask))
  np.testing.assert_allclose(group.aux_loss, ref["aux_loss"], rtol=1e-5)
  assert abs(float(group.aux_loss) - float(out.aux_loss)) > 1e-3


def _old_switch_loss(probs, expert_index, valid, num_choices):
  """The per-group loss as it was before ``balance_scope`` existed."""
  num_experts = probs.shape[-1]
  num_valid = jnp.sum(valid, axis=-1)
  safe_valid = jnp.maximum(num_valid, 1.0)
  hot = (jax.nn.one_hot(expert_index[..., :num_choices], num_experts)
         * valid[..., None, None])
  counts = jnp.sum(hot, axis=(1, 2))
  frac_tokens = counts / (safe_valid[:, None] * num_choices)
  frac_probs = jnp.sum(probs * valid[..., None], axis=1) / safe_valid[:, None]
  group_has_tokens = (num_valid > 0).astype(jnp.float32)
  per_group = num_experts * jnp.sum(frac_tokens * frac_probs, axis=-1)
  return jnp.sum(per_group * group_has_tokens) / jnp.maximum(
      jnp.sum(group_has_tokens), 1.0)


def test_group_scope_is_bit_identical_to_the_default():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(4, 8, 6)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 8)) < 0.8).at[3].set(False)  # one empty group
  default = route(logits, top_k=2, capacity=3, token_mask=mask, balance_choices="all")
  group = route(logits, top_k=2, capacity=3, token_mask=mask, balance_choices="all",
                balance_scope="group")
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(group)):
    np.testing.assert_array_equal(a, b)
  probs = jax.nn.softmax(logits, axis=-1)
  valid = mask.astype(jnp.float32)
  for k in (1, 2):
    np.testing.assert_array_equal(
        routing.load_balancing_loss(probs, default.expert_index, valid, k),
        _old_switch_loss(probs, default.expert_index, valid, k))
  std = jnp.ones_like(logits)
  noisy_default = noisy_top_k(logits, std, top_k=2, capacity=3, rng=jax.random.key(0),
                              token_mask=mask)
  noisy_group = noisy_top_k(logits, std, top_k=2, capacity=3, rng=jax.random.key(0),
                            token_mask=mask, balance_scope="group")
  for a, b in zip(jax.tree.leaves(noisy_default), jax.tree.leaves(noisy_group)):
    np.testing.assert_array_equal(a, b)


def test_bad_scope_is_refused():
  logits = _logits()
  with pytest.raises(ValueError, match="balance_scope"):
    routing.route(logits, top_k=1, capacity=3, balance_scope="global")
  with pytest.raises(ValueError, match="balance_scope"):
    routing.noisy_top_k(logits, jnp.ones_like(logits), top_k=1, capacity=3,
                        balance_scope="global")
  with pytest.raises(ValueError, match="balance_scope"):
    MoeConfig(d_model=4, d_ff=8, num_experts=2, balance_scope="global")
  config = default_config()
  config.moe.balance_scope = "global"
  assert validate_config(config, num_devices=1) == [
      "moe.balance_scope='global' is unknown; use 'group' (per routing group), 'batch' "
      "(over the whole global batch) or None (the router's default)."]
  config.moe.balance_scope = "batch"
  assert validate_config(config, num_devices=1) == []
  config.moe.router = "expert_choice"
  config.moe.allow_noncausal_routing = True
  errors = validate_config(config, num_devices=1)
  assert len(errors) == 1 and errors[0].startswith(
      "moe.balance_scope='batch' has no effect with router='expert_choice'")


def test_lm_config_key_reaches_the_layer_config():
  config = default_config()
  config.model.moe_every = 2
  assert moe_config(config).balance_scope is None  # the family's default
  config.moe.balance_scope = "batch"
  assert moe_config(config).balance_scope == "batch"


def test_family_defaults():
  assert ROUTERS["topk"].balance_scope == "group"
  assert ROUTERS["noisy_topk"].balance_scope == "batch"
  cfg = MoeConfig(d_model=4, d_ff=8, num_experts=4)
  assert balance_scope(cfg) == "group"
  assert balance_scope(dataclasses.replace(cfg, router="noisy_topk")) == "batch"
  assert balance_scope(dataclasses.replace(cfg, router="noisy_topk",
                                           balance_scope="group")) == "group"


def _layer_aux(**kw):
  kw = {"capacity_factor": 1.0, "init_scale": 0.1, "router_init_scale": 0.1, **kw}
  cfg = MoeConfig(d_model=8, d_ff=16, num_experts=4, group_size=8, top_k=2, **kw)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8), jnp.float32)
  return float(layer(x, deterministic=False)[1].aux_loss)


@pytest.mark.parametrize("router,default", [("topk", "group"), ("noisy_topk", "batch")])
def test_layer_uses_the_family_default(router, default):
  other = "group" if default == "batch" else "batch"
  unset = _layer_aux(router=router)
  assert unset == _layer_aux(router=router, balance_scope=default)
  assert abs(unset - _layer_aux(router=router, balance_scope=other)) > 1e-4


# Sharded runs (8 fake CPU devices): data x expert meshes against one device, with the
# MoE losses pooled over the global batch of 16 sequences (G = 16 groups of 8 tokens).
SHARDED = {
    "switch": dict(balance_scope="batch"),
    "noisy_topk": dict(router="noisy_topk", top_k=2),  # batch by default
}


_one_device = {}


@pytest.mark.parametrize("name,data,expert", [("switch", 2, 4), ("switch", 8, 1),
                                              ("noisy_topk", 4, 2)])
def test_sharded_batch_scope_equals_single_device(name, data, expert):
  moe = SHARDED[name]
  if name not in _one_device:
    _one_device[name] = train_demo(1, 1, 1, num_experts=(4, 8), steps=3, moe=moe)
  want = _one_device[name]
  got = train_demo(data, expert, 1, num_experts=(4, 8), steps=3, moe=moe)
  np.testing.assert_allclose(got["aux_losses"], want["aux_losses"], rtol=1e-5)
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, atol=1e-5)
  for path, g in want["grads"].items():
    np.testing.assert_allclose(got["grads"][path], g, rtol=1e-5, atol=1e-5,
                               err_msg=path)
  if name == "switch":
    # The scope changes the loss: per-group statistics of 8 tokens give another value.
    group = train_demo(1, 1, 1, num_experts=(4, 8), steps=1)
    assert abs(group["aux_losses"][0] - want["aux_losses"][0]) > 1e-3
