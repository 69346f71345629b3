"""Queue order of top-k choices and causal routing (docs/routing.md, "Queue order").

Choice-major queues (GShard: every first choice of a group before any second one) let a
token's second choice depend on the first choices of later tokens. Token-major queues
(each token's choices together, in position order) do not, so a causal LM with capacity
and ``top_k > 1`` routes with them (``moe.queue_order="auto"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.inference import decode
from moe_jax import routing
from moe_jax.training import build
from moe_jax.training.config import queue_order, validate_config
from moe_jax.layers.router_families import causality
from tests.reference import route_loop, route_zoo_loop
# The default config with an MoE block every other block, and dotted-key overrides.
from tests.test_config_validation import switch_config as lm_config

# ----------------------------------------------------------------------------
# The routing function
# ----------------------------------------------------------------------------


def test_issue_probe_choice_major_leaks_and_token_major_does_not():
  # G=1, S=4, E=2, top_k=2, C=2. Token 3's first choice is expert 1 in `a` and expert 0
  # in `b`; tokens 0-2 are the same in both.
  early = [[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
  a = jnp.asarray([early + [[0.0, 3.0]]], jnp.float32)
  b = jnp.asarray([early + [[3.0, 0.0]]], jnp.float32)
  # Choice-major by hand: firsts 0, 0, 1, (1 | 0) take the slots of expert 0 (tokens 0,
  # 1) and expert 1 (token 2, then token 3 in `a`); seconds 1, 1, 0 then find
  # expert 1 with 1 (`b`) or 0 (`a`) free slots and expert 0 full.
  kept_a = routing.route(a, top_k=2, capacity=2).kept[0, :3]
  kept_b = routing.route(b, top_k=2, capacity=2).kept[0, :3]
  np.testing.assert_array_equal(kept_a, [[True, False], [True, False], [True, False]])
  np.testing.assert_array_equal(kept_b, [[True, True], [True, False], [True, False]])
  # Token-major by hand: (0,0)->e0 slot 0, (0,1)->e1 slot 0, (1,0)->e0 slot 1,
  # (1,1)->e1 slot 1, (2,0)->e1 slot 2 (dropped), (2,1)->e0 slot 2 (dropped).
  for logits in (a, b):
    out = routing.route(logits, top_k=2, capacity=2, queue_order="token_major")
    np.testing.assert_array_equal(out.kept[0, :3],
                                  [[True, True], [True, True], [False, False]])
    np.testing.assert_array_equal(out.position[0, :3], [[0, 0], [1, 1], [2, 2]])


def test_default_is_choice_major_bit_for_bit():
  logits = jax.random.normal(jax.random.key(0), (3, 16, 5)) * 2
  base = routing.route(logits, top_k=2, capacity=3)
  explicit = routing.route(logits, top_k=2, capacity=3, queue_order="choice_major")
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("top_k, capacity, batch_priority, policy", [
    (1, 2, False, "all"), (2, 3, False, "all"), (2, 3, True, "all"),
    (2, 2, False, "threshold"), (3, 3, False, "all"), (3, 2, True, "threshold")])
def test_token_major_matches_loop_reference(top_k, capacity, batch_priority, policy):
  logits = jax.random.normal(jax.random.key(7 * top_k + capacity), (3, 16, 5)) * 2
  kw = dict(top_k=top_k, capacity=capacity, second_policy=policy,
            second_threshold=0.3, batch_priority=batch_priority)
  out = routing.route(logits, queue_order="token_major", **kw)
  dispatch, combine = route_loop(jax.nn.softmax(logits), queue_order="token_major",
                                 **kw)
  np.testing.assert_array_equal(out.dispatch_mask, dispatch)
  np.testing.assert_allclose(out.combine_weights, combine, rtol=1e-5, atol=1e-7)
  # Position is the place in the expert's token-major queue, counted over wanted
  # choices only.
  order = (np.argsort(-np.asarray(jnp.max(jax.nn.softmax(logits), -1)), axis=-1,
                      kind="stable") if batch_priority
           else np.broadcast_to(np.arange(16), (3, 16)))
  index, wanted = np.asarray(out.expert_index), np.ones((3, 16, top_k), bool)
  if policy == "threshold":
    wanted[..., 1:] = np.asarray(out.gates[..., 1:] > 0) | (
        np.asarray(out.position[..., 1:]) >= capacity)
  for g in range(3):
    seen = np.zeros(5, int)
    for s in order[g]:
      for j in range(top_k):
        if not wanted[g, s, j]:
          continue
        assert out.position[g, s, j] == seen[index[g, s, j]], (g, s, j)
        seen[index[g, s, j]] += 1


def test_token_major_router_zoo_and_noisy_match_their_references():
  logits = jax.random.normal(jax.random.key(3), (2, 12, 8)) * 2
  bias = jax.random.normal(jax.random.key(4), (8,)) * 0.1
  kw = dict(top_k=3, capacity=3, score_fn="sigmoid", expert_groups=4, top_groups=2,
            balance_choices="all", queue_order="token_major")
  out = routing.route(logits, selection_bias=bias, **kw)
  ref = route_zoo_loop(logits, selection_bias=np.asarray(bias), **kw)
  np.testing.assert_array_equal(out.dispatch_mask, ref["dispatch"])
  from tests.reference import noisy_top_k_loop  # pylint: disable=import-outside-toplevel
  std = jnp.full(logits.shape, 0.5)
  noisy = routing.noisy_top_k(logits, std, top_k=2, capacity=2, rng=jax.random.key(5),
                              queue_order="token_major")
  noise = jax.random.normal(jax.random.key(5), logits.shape, jnp.float32)
  ref = noisy_top_k_loop(logits, std, noise, top_k=2, capacity=2,
                         queue_order="token_major")
  np.testing.assert_array_equal(noisy.dispatch_mask, ref["dispatch"])
  assert float(jnp.mean(noisy.kept)) < 1.0  # the capacity dropped choices


def test_bad_queue_order_is_refused():
  with pytest.raises(ValueError, match="queue_order must be one of"):
    routing.route(jnp.zeros((1, 4, 2)), top_k=2, capacity=2, queue_order="token")


# ----------------------------------------------------------------------------
# The LM config: "auto", refusal, causality derived from k, order and drops
# ----------------------------------------------------------------------------


def moe_cfg(config):
  model = build.make_model(config, vocab_size=16)
  return next(b.ffn.cfg for b in model.blocks if b.is_moe)


def test_auto_is_token_major_for_causal_lm_and_choice_major_for_masked_lm():
  assert queue_order(lm_config()) == "token_major"
  assert queue_order(lm_config(**{"model.objective": "masked_lm"})) == "choice_major"
  assert queue_order(lm_config(**{"moe.queue_order": "choice_major"})) == "choice_major"
  assert moe_cfg(lm_config(**{"moe.top_k": 2})).queue_order == "token_major"


def test_choice_major_top2_with_capacity_is_refused_in_a_causal_lm():
  config = lm_config(**{"moe.top_k": 2, "moe.queue_order": "choice_major"})
  errors = validate_config(config)
  assert len(errors) == 1, errors
  assert errors[0].startswith("moe.queue_order='choice_major' is not causal")
  assert "allow_noncausal_routing" in errors[0] and "token_major" in errors[0]
  # Each of these makes it causal or allowed.
  for more in ({"moe.queue_order": "token_major"}, {"moe.queue_order": "auto"},
               {"moe.top_k": 1}, {"moe.dispatch": "dropless"},
               {"moe.capacity_factor": 8.0, "moe.eval_capacity_factor": 8.0},
               {"moe.allow_noncausal_routing": True},
               {"model.objective": "masked_lm"}):
    assert validate_config(lm_config(**{"moe.top_k": 2,
                                        "moe.queue_order": "choice_major", **more})) == []
  assert validate_config(lm_config(**{"moe.queue_order": "tokens"}))[0].startswith(
      "moe.queue_order='tokens' is unknown")


def test_causality_is_derived_not_declared():
  cfg = moe_cfg(lm_config(**{"moe.top_k": 2}))
  import dataclasses  # pylint: disable=import-outside-toplevel
  assert causality(cfg) is None
  assert "later tokens" in causality(dataclasses.replace(cfg, queue_order="choice_major"))
  assert causality(dataclasses.replace(cfg, queue_order="choice_major",
                                       dispatch="dropless")) is None
  assert causality(dataclasses.replace(cfg, queue_order="choice_major", top_k=1)) is None
  assert "batch_priority" in causality(dataclasses.replace(cfg, batch_priority=True))
  assert causality(dataclasses.replace(cfg, batch_priority=True,
                                       dispatch="dropless")) is None
  assert "expert choice" in causality(dataclasses.replace(cfg, top_k=1,
                                                         router="expert_choice"))


# ----------------------------------------------------------------------------
# The model: changing the last token changes no earlier logit
# ----------------------------------------------------------------------------

# Tight capacity: S = 16 tokens a group (one sequence), 4 experts, C = 4 (top-2
# keeps few second choices).
TIGHT = {"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
         "model.d_ff": 64, "model.moe_every": 1, "moe.num_experts": 4,
         "moe.capacity_factor": 1.0, "moe.eval_capacity_factor": 1.0,
         "moe.min_capacity": 1, "data.seq_len": 16, "batch_size": 8}

# Every router family x dispatch path x queue order the causal LM accepts.
CAUSAL_CASES = {
    "switch_einsum": {"moe.dispatch": "einsum"},
    "switch_indices": {"moe.dispatch": "indices"},
    "switch_dropless": {"moe.dispatch": "dropless"},
    "switch_choice_major": {"moe.dispatch": "indices", "moe.queue_order": "choice_major"},
    "top2_einsum": {"moe.top_k": 2, "moe.dispatch": "einsum"},
    "top2_indices": {"moe.top_k": 2, "moe.dispatch": "indices"},
    "top2_random_policy": {"moe.top_k": 2, "moe.second_policy": "random",
                           "moe.dispatch": "indices"},
    "top2_dropless_choice_major": {"moe.top_k": 2, "moe.dispatch": "dropless",
                                   "moe.queue_order": "choice_major"},
    "top2_dropless_batch_priority": {"moe.top_k": 2, "moe.dispatch": "dropless",
                                     "moe.batch_priority": True},
    "deepseek_top3_einsum": {"moe.top_k": 3, "moe.score_fn": "sigmoid",
                             "moe.expert_groups": 2, "moe.top_groups": 2,
                             "moe.z_loss_coef": 0.0, "moe.bias_update_rate": 1e-3,
                             "moe.dispatch": "einsum"},
    "noisy_top2_einsum": {"moe.router": "noisy_topk", "moe.top_k": 2,
                          "moe.dispatch": "einsum"},
    "noisy_top2_indices": {"moe.router": "noisy_topk", "moe.top_k": 2,
                           "moe.dispatch": "indices"},
    "noisy_top2_dropless": {"moe.router": "noisy_topk", "moe.top_k": 2,
                            "moe.dispatch": "dropless"},
}


def last_token_spread(overrides, values=range(0, 32, 4), modes=(False, True)):
  """Max over earlier positions of how far the logits move when only the last token
  of the sequence changes (to each of ``values``), in training (the same random
  streams for every call) and evaluation mode; and the smallest share of choices
  kept."""
  config = lm_config(**{**TIGHT, **overrides})
  model = build.make_model(config, vocab_size=32, seed=1)
  rows = np.tile(np.random.default_rng(0).integers(0, 32, 16), (2, 1)).astype(np.int32)
  graphdef, state = nnx.split(model)
  spread, kept = 0.0, 1.0
  for deterministic in modes:
    # Merged afresh at each call: the same random streams (noise, second-expert
    # draws) for every call.
    forward = jax.jit(lambda s, t, d=deterministic: nnx.merge(graphdef, s)(
        t, deterministic=d))
    first = None
    for value in values:
      rows[:, -1] = value
      logits, aux = forward(state, rows)
      earlier = np.asarray(logits[:, :-1])
      first = earlier if first is None else first
      spread = max(spread, float(np.max(np.abs(earlier - first))))
      for a in aux.values():
        kept = min(kept, 1.0 - float(a.metrics["dropped_fraction"]))
        if overrides.get("moe.top_k", 1) > 1:
          kept = min(kept, float(a.metrics["second_kept_fraction"]))
  return spread, kept


@pytest.mark.parametrize("name", list(CAUSAL_CASES))
def test_the_last_token_changes_no_earlier_logit(name):
  overrides = CAUSAL_CASES[name]
  assert validate_config(lm_config(**{**TIGHT, **overrides})) == []
  spread, kept = last_token_spread(overrides)
  assert spread <= 1e-6, f"{name}: earlier logits moved by {spread}"
  if overrides.get("moe.dispatch") != "dropless":
    assert kept < 1.0, f"{name}: capacity dropped nothing, so the test cannot bite"


def test_choice_major_shows_the_leak():
  # The same model as top2_einsum with GShard's queue: allowed only by the flag, and
  # it leaks.
  overrides = {"moe.top_k": 2, "moe.dispatch": "einsum",
               "moe.queue_order": "choice_major"}
  assert validate_config(lm_config(**{**TIGHT, **overrides}))
  spread, _ = last_token_spread({**overrides, "moe.allow_noncausal_routing": True},
                                values=range(32), modes=(True,))
  assert spread > 1e-3


def test_generate_uncached_masks_its_padding():
  # Choice-major queues over the whole 16-token window: unmasked trailing padding would
  # queue its first choices ahead of the real tokens' second choices. The capacity is
  # 1 for the window and for the bare prompt alike (cf 0.01, min_capacity 1), so a
  # masked window routes like the prompt alone.
  config = lm_config(**{**TIGHT, "moe.top_k": 2, "moe.queue_order": "choice_major",
                        "moe.allow_noncausal_routing": True,
                        "moe.capacity_factor": 0.01, "moe.eval_capacity_factor": 0.01})
  model = build.make_model(config, vocab_size=32, seed=2)
  prompt = [3, 1, 4, 1, 5]
  forward = jax.jit(lambda t: model(t, deterministic=True)[0])
  # The padding matters: the unmasked window's logits differ from the prompt's.
  window = jnp.asarray([prompt + [0] * 11], jnp.int32)
  bare = forward(jnp.asarray([prompt], jnp.int32))[0, -1]
  assert float(jnp.max(jnp.abs(forward(window)[0, 4] - bare))) > 1e-4
  # The uncached sampler's logits are those of the prompt alone.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  np.testing.assert_allclose(
      decode._window_logits(graphdef, params, rest, np.asarray(window), 4),  # pylint: disable=protected-access
      bare, atol=1e-5, rtol=0)
  # Greedy by hand on the unpadded sequence.
  ids = list(prompt)
  for _ in range(6):
    ids.append(int(jnp.argmax(forward(jnp.asarray([ids], jnp.int32))[0, -1])))
  assert decode.generate_uncached(model, prompt, 6, temperature=0.0,
                                  window=16) == ids[len(prompt):]
