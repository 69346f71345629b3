"""The router zoo: DeepSeek/Mixtral options of route, expert choice, noisy top-k and the
balancing helpers, against hand-computed cases and the loop references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.routing import common
from tests.reference import expert_choice_loop, noisy_top_k_loop, route_zoo_loop

LN = math.log

# Jitted once per static configuration (op-by-op dispatch is slow on a small CPU).
route = jax.jit(routing.route, static_argnames=(
    "top_k", "capacity", "second_policy", "second_threshold", "normalize_gates",
    "batch_priority", "score_fn", "expert_groups", "top_groups", "gate_scale",
    "balance_choices"))
expert_choice = jax.jit(routing.expert_choice, static_argnames=("capacity",))
noisy_top_k = jax.jit(routing.noisy_top_k, static_argnames=("top_k", "capacity"))


def _logits_from_probs(probs):
  """Logits whose softmax is ``probs`` (up to float rounding)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


# ----------------------------------------------------------------------------
# route: group-limited routing
# ----------------------------------------------------------------------------


def test_groups_score_the_sum_of_their_two_largest():
  # E=6 in 3 groups {e0,e1} {e2,e3} {e4,e5}; p = [.30,.05, .20,.20, .15,.10].
  # Group scores: .35, .40, .25. The global argmax e0 sits in the second-best group,
  # so with top_groups=1 only {e2,e3} is open: top-2 = e2, e3 (tie .20/.20 -> e2).
  # Gates renormalised over the choices: .2/.4 = .5 each.
  probs = np.array([[[.30, .05, .20, .20, .15, .10]]])
  logits = _logits_from_probs(probs)
  out = route(logits, top_k=2, capacity=1, expert_groups=3, top_groups=1)
  np.testing.assert_array_equal(out.expert_index[0, 0], [2, 3])
  np.testing.assert_allclose(out.gates[0, 0], [.5, .5], rtol=1e-5)
  # Without groups: e0 (.30), then e2 (.20, tie with e3 -> lower index).
  out = route(logits, top_k=2, capacity=1)
  np.testing.assert_array_equal(out.expert_index[0, 0], [0, 2])
  # top_groups=2 opens {e2,e3} (.40) and {e0,e1} (.35): top-4 = e0 (.30), e2, e3
  # (.20 each), e1 (.05), skipping the closed e4 (.15) and e5 (.10).
  out = route(logits, top_k=4, capacity=1, expert_groups=3, top_groups=2)
  np.testing.assert_array_equal(out.expert_index[0, 0], [0, 2, 3, 1])


def test_group_ties_go_to_the_lower_group_index():
  # p = [.25,.05, .05,.25, .10,.30]: groups {e0,e1} and {e2,e3} hold the same two
  # values, so their scores .30 tie exactly; {e4,e5} scores .40.
  # top_groups=2 keeps g2 and g0 (tie -> lower index): open experts e0, e1, e4, e5.
  # top-3 = e5 (.30), e0 (.25), e4 (.10). Had the tie gone to g1, the second choice
  # would be e3 (.25) instead of e0.
  probs = np.array([[[.25, .05, .05, .25, .10, .30]]])
  out = route(_logits_from_probs(probs), top_k=3, capacity=1, expert_groups=3,
              top_groups=2)
  np.testing.assert_array_equal(out.expert_index[0, 0], [5, 0, 4])
  # Gates: .30/.65, .25/.65, .10/.65.
  np.testing.assert_allclose(out.gates[0, 0], np.array([.30, .25, .10]) / .65,
                             rtol=1e-5)


def test_one_expert_groups_score_that_expert_alone():
  # expert_groups = E = 4: a group's score is its only u. p = [.1, .4, .2, .3],
  # top_groups=2 -> experts e1, e3 open; top-2 = e1, e3 (the same as without groups).
  # top_groups=1 -> only e1 open, so top_k=2 is refused.
  probs = np.array([[[.1, .4, .2, .3]]])
  out = route(_logits_from_probs(probs), top_k=2, capacity=1, expert_groups=4,
              top_groups=2)
  np.testing.assert_array_equal(out.expert_index[0, 0], [1, 3])
  with pytest.raises(ValueError, match="top_k=2 exceeds"):
    routing.route(_logits_from_probs(probs), top_k=2, capacity=1, expert_groups=4,
                  top_groups=1)


def test_mask_to_top_groups_uses_minus_inf():
  # DeepSeek-V3 masks with -inf, so even a negative biased score in an open group
  # beats every closed expert.
  u = jnp.array([[[-5.0, -6.0, 1.0, 0.5]]])  # groups {e0,e1}: -11, {e2,e3}: 1.5
  masked = routing.mask_to_top_groups(u, 2, 1)
  np.testing.assert_array_equal(masked[0, 0], [-np.inf, -np.inf, 1.0, 0.5])


# ----------------------------------------------------------------------------
# route: selection bias, sigmoid scores, gate scale
# ----------------------------------------------------------------------------


def test_bias_changes_the_choice_but_never_the_gate():
  # p = [.5, .3, .2], bias = [0, .3, 0] -> u = [.5, .6, .2].
  # Top-1: e1 is chosen with gate s[e1] = .3 (not .6). Top-2: e1 then e0; the gates
  # are .3/.8 and .5/.8, the same per expert as without bias (e0 .625, e1 .375).
  logits = _logits_from_probs(np.array([[[.5, .3, .2]]]))
  bias = jnp.array([0.0, 0.3, 0.0])
  out = route(logits, top_k=1, capacity=1, selection_bias=bias)
  np.testing.assert_array_equal(out.expert_index[0, 0], [1])
  np.testing.assert_allclose(out.gates[0, 0], [.3], rtol=1e-5)
  out = route(logits, top_k=2, capacity=1, selection_bias=bias)
  np.testing.assert_array_equal(out.expert_index[0, 0], [1, 0])
  np.testing.assert_allclose(out.gates[0, 0], [.375, .625], rtol=1e-5)
  plain = route(logits, top_k=2, capacity=1)
  np.testing.assert_array_equal(plain.expert_index[0, 0], [0, 1])
  np.testing.assert_allclose(plain.gates[0, 0], [.625, .375], rtol=1e-5)


def test_bias_gets_no_gradient_and_bpr_uses_unbiased_scores():
  logits = jax.random.normal(jax.random.key(0), (2, 8, 4))
  bias = jnp.array([0.2, -0.1, 0.0, 0.05])

  def loss(b):
    out = route(logits, top_k=2, capacity=3, selection_bias=b, balance_choices="all")
    return jnp.sum(out.combine_weights) + out.aux_loss + out.z_loss

  np.testing.assert_array_equal(jax.grad(loss)(bias), np.zeros(4))
  # BPR orders tokens by s of the first choice, not u: compare with the reference.
  out = route(logits, top_k=2, capacity=3, selection_bias=bias, batch_priority=True)
  ref = route_zoo_loop(logits, top_k=2, capacity=3, selection_bias=np.asarray(bias),
                       batch_priority=True)
  np.testing.assert_array_equal(out.dispatch_mask, ref["dispatch"])


def test_sigmoid_scores_normalisation_and_gate_scale():
  # logits [ln3, 0, -ln3] -> sigmoid s = [3/4, 1/2, 1/4].
  logits = jnp.array([[[LN(3), 0.0, -LN(3)]]])
  # Top-2 normalised: .75/1.25 = .6, .5/1.25 = .4; gate_scale 2.5 -> 1.5, 1.0.
  out = route(logits, top_k=2, capacity=1, score_fn="sigmoid", gate_scale=2.5)
  np.testing.assert_allclose(out.gates[0, 0], [1.5, 1.0], rtol=1e-5)
  # Not normalised: 2.5 * [.75, .5].
  out = route(logits, top_k=2, capacity=1, score_fn="sigmoid", gate_scale=2.5,
              normalize_gates=False)
  np.testing.assert_allclose(out.gates[0, 0], [1.875, 1.25], rtol=1e-5)
  # Top-1 keeps the raw score: 2.5 * .75.
  out = route(logits, top_k=1, capacity=1, score_fn="sigmoid", gate_scale=2.5)
  np.testing.assert_allclose(out.gates[0, 0], [1.875], rtol=1e-5)
  # The policy judges the unscaled gate: g2 = .4 <= .45 is dropped, although the
  # scaled gate 1.0 would pass.
  out = route(logits, top_k=2, capacity=1, score_fn="sigmoid", gate_scale=2.5,
              second_policy="threshold", second_threshold=0.45)
  np.testing.assert_array_equal(out.kept[0, 0], [True, False])
  # Aux with p = s / sum s = [1/2, 1/3, 1/6], one token, E = 3:
  #   "first": c = [1,0,0] -> 3 / (1*1) * 1/2 = 1.5
  #   "all":   c = [1,1,0] -> 3 / (2*1) * (1/2 + 1/3) = 1.25
  out = route(logits, top_k=2, capacity=1, score_fn="sigmoid")
  assert float(out.aux_loss) == pytest.approx(1.5, rel=1e-6)
  out = route(logits, top_k=2, capacity=1, score_fn="sigmoid", balance_choices="all")
  assert float(out.aux_loss) == pytest.approx(1.25, rel=1e-6)
  # Entropy of p: -(1/2 ln 1/2 + 1/3 ln 1/3 + 1/6 ln 1/6); z-loss on the logits.
  entropy = -(.5 * LN(.5) + LN(1 / 3) / 3 + LN(1 / 6) / 6)
  assert float(out.metrics["router_entropy"]) == pytest.approx(entropy, rel=1e-5)
  assert float(out.z_loss) == pytest.approx(LN(3 + 1 + 1 / 3) ** 2, rel=1e-5)


def test_mixtral_softmax_over_top_k_logits_equals_normalised_softmax():
  # Mixtral: topk on the logits, then softmax over those k logits.
  logits = jax.random.normal(jax.random.key(5), (2, 16, 8)) * 2
  out = route(logits, top_k=2, capacity=16, score_fn="softmax", normalize_gates=True)
  top_values, top_index = jax.lax.top_k(logits, 2)
  np.testing.assert_array_equal(out.expert_index, top_index)
  np.testing.assert_allclose(out.gates, jax.nn.softmax(top_values, axis=-1),
                             rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# route: balance_choices and choice_counts
# ----------------------------------------------------------------------------


def test_aux_first_vs_all_and_hf_mixtral_is_k_times():
  # G=1, S=2, E=3, top-2.
  #   t0: p = [.5, .3, .2] -> e0, e1      t1: p = [.2, .5, .3] -> e1, e2
  #   P = [.35, .40, .25]
  #   "first": c = [1, 1, 0] -> 3 / (1*2) * (.35 + .40) = 1.125
  #   "all":   c = [1, 2, 1] -> 3 / (2*2) * (.35 + .80 + .25) = 1.05
  probs = np.array([[[.5, .3, .2], [.2, .5, .3]]])
  logits = _logits_from_probs(probs)
  first = route(logits, top_k=2, capacity=2)
  every = route(logits, top_k=2, capacity=2, balance_choices="all")
  assert float(first.aux_loss) == pytest.approx(1.125, rel=1e-6)
  assert float(every.aux_loss) == pytest.approx(1.05, rel=1e-6)
  # HF transformers' load_balancing_loss_func: E * sum_{k,e} mean_t(mask[t,k,e]) * P_e.
  mask = np.zeros((2, 2, 3))
  mask[0, 0, 0] = mask[0, 1, 1] = mask[1, 0, 1] = mask[1, 1, 2] = 1
  hf = 3 * np.sum(mask.mean(axis=0) * probs[0].mean(axis=0))  # = 2.1
  assert hf == pytest.approx(2 * float(every.aux_loss), rel=1e-6)
  # choice_counts: all K choices before capacity -> [1, 2, 1].
  np.testing.assert_array_equal(every.metrics["choice_counts"], [1, 2, 1])


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("balance_choices", ["first", "all"])
def test_uniform_router_scores_one(score_fn, balance_choices):
  # Equal logits: p_e = 1/E for every token, so sum_e c_e P_e = K' T / E and the loss
  # is E / (K' T) * K' T / E = 1, wherever the (tied) choices land.
  out = route(jnp.zeros((2, 6, 4)), top_k=2, capacity=6, score_fn=score_fn,
              balance_choices=balance_choices)
  assert float(out.aux_loss) == pytest.approx(1.0, rel=1e-6)


def test_choice_counts_are_before_policy_and_capacity_over_valid_tokens():
  # G=2, S=3, E=2, top-2, capacity 1, threshold policy .45, last token of g1 is padding.
  # Every valid token makes 2 choices (one per expert) -> 5 valid tokens: [5, 5],
  # although capacity keeps only 1 per expert and group and the policy drops some.
  logits = jax.random.normal(jax.random.key(7), (2, 3, 2))
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  out = route(logits, top_k=2, capacity=1, second_policy="threshold",
              second_threshold=0.45, token_mask=mask)
  np.testing.assert_array_equal(out.metrics["choice_counts"], [5, 5])


# ----------------------------------------------------------------------------
# route: against the loop reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(top_k=2, capacity=3, score_fn="sigmoid"),
    dict(top_k=3, capacity=4, score_fn="sigmoid", expert_groups=4, top_groups=2,
         gate_scale=2.5, balance_choices="all", use_bias=True),
    dict(top_k=2, capacity=2, expert_groups=2, top_groups=1, use_bias=True,
         batch_priority=True),
    dict(top_k=1, capacity=3, expert_groups=8, top_groups=3, use_bias=True),
    dict(top_k=3, capacity=2, score_fn="sigmoid", expert_groups=4, top_groups=3,
         second_policy="threshold", second_threshold=0.25, normalize_gates=False,
         balance_choices="all", use_bias=True, masked=True),
])
def test_route_options_match_loop_reference(kw):
  kw = dict(kw)
  logits = jax.random.normal(jax.random.key(kw["top_k"] + kw["capacity"]),
                             (3, 12, 8)) * 2
  if kw.pop("use_bias", False):
    kw["selection_bias"] = jax.random.normal(jax.random.key(11), (8,)) * 0.1
  if kw.pop("masked", False):
    kw["token_mask"] = jnp.arange(36).reshape(3, 12) < 30
  out = route(logits, **kw)
  ref_kw = {k: (np.asarray(v) if hasattr(v, "shape") else v) for k, v in kw.items()}
  ref = route_zoo_loop(logits, **ref_kw)
  np.testing.assert_array_equal(out.expert_index, ref["expert_index"])
  np.testing.assert_array_equal(out.dispatch_mask, ref["dispatch"])
  np.testing.assert_allclose(out.combine_weights, ref["combine"], rtol=1e-5, atol=1e-7)
  assert float(out.aux_loss) == pytest.approx(ref["aux_loss"], rel=1e-5)
  np.testing.assert_array_equal(out.metrics["choice_counts"], ref["choice_counts"])


# ----------------------------------------------------------------------------
# update_selection_bias
# ----------------------------------------------------------------------------


def test_update_selection_bias_rule():
  # counts [3, 1, 2, 2], mean 2 -> sign(mean - c) = [-1, +1, 0, 0] (sign(0) = 0).
  # bias [0, .5, -1, 0] + .1 * that = [-.1, .6, -1, 0].
  new = routing.update_selection_bias(np.array([0, .5, -1, 0], np.float64),
                                      np.array([3, 1, 2, 2], np.int32), 0.1)
  assert new.dtype == jnp.float32
  np.testing.assert_allclose(new, [-.1, .6, -1, 0], rtol=1e-6)
  # Balanced counts leave the bias alone.
  np.testing.assert_array_equal(
      routing.update_selection_bias(jnp.ones(3), jnp.array([4., 4., 4.]), 0.5),
      np.ones(3))
  with pytest.raises(ValueError, match="shape"):
    routing.update_selection_bias(jnp.zeros(3), jnp.zeros(4), 0.1)


def test_selection_bias_balances_a_skewed_router():
  # Fixed skewed logits (expert e gets +0.5*(E-1-e)): route, count, update, repeat.
  # The bias moves choices away from the popular experts. The numbers of this run are
  # in the comment below; the test asks only for a four-fold drop of the load's CV.
  num_experts = 8
  skew = 0.5 * jnp.arange(num_experts - 1, -1, -1, dtype=jnp.float32)
  logits = jax.random.normal(jax.random.key(0), (4, 64, num_experts)) + skew

  @jax.jit
  def step(bias):
    out = routing.route(logits, top_k=2, capacity=64, score_fn="sigmoid",
                        selection_bias=bias)
    counts = out.metrics["choice_counts"]
    return routing.update_selection_bias(bias, counts, 1e-2), counts

  def cv(counts):
    return float(jnp.std(counts) / jnp.mean(counts))

  bias = jnp.zeros(num_experts)
  _, counts0 = step(bias)
  for _ in range(100):
    bias, counts = step(bias)
  # This run: choice counts [196, 152, 97, 37, 16, 11, 3, 0] (CV 1.10) at the start,
  # [84, 46, 56, 72, 69, 61, 65, 59] (CV 0.17) after 100 updates of 0.01.
  assert cv(counts0) > 1.0
  assert cv(counts) < cv(counts0) / 4


# ----------------------------------------------------------------------------
# expert_choice
# ----------------------------------------------------------------------------


def test_expert_choice_ties_and_padding():
  # G=1, S=4, E=2, C=1; t3 is padding.
  #   t0: logits [0, 0]    -> s = [.5, .5]
  #   t1: logits [0, 0]    -> s = [.5, .5]
  #   t2: logits [ln4, 0]  -> s = [.8, .2]
  #   t3: logits [0, ln9]  -> s = [.1, .9] (padding: would win e1 if it counted)
  # e0 picks t2 (.8). e1: t0 and t1 tie at .5 -> t0 (lower index). t1 is picked by
  # nobody: dropped 1 of 3 valid tokens; experts per token (1 + 0 + 1) / 3.
  logits = jnp.array([[[0., 0.], [0., 0.], [LN(4), 0.], [0., LN(9)]]])
  mask = jnp.array([[1, 1, 1, 0]], bool)
  out = expert_choice(logits, capacity=1, token_mask=mask)
  np.testing.assert_array_equal(out.expert_index[0], [[0, 1]] * 4)
  np.testing.assert_array_equal(out.kept[0], [[0, 1], [0, 0], [1, 0], [0, 0]])
  np.testing.assert_allclose(out.gates[0], [[0, .5], [0, 0], [.8, 0], [0, 0]],
                             rtol=1e-6)
  assert int(out.position[0, 0, 1]) == 0 and int(out.position[0, 2, 0]) == 0
  assert int(out.position[0, 1, 1]) == 1  # t1 ranks second for e1
  assert float(out.metrics["dropped_fraction"]) == pytest.approx(1 / 3)
  assert float(out.metrics["experts_per_token"]) == pytest.approx(2 / 3)
  assert float(out.aux_loss) == 0.0
  # z over valid tokens: logsumexp = ln2, ln2, ln5.
  assert float(out.z_loss) == pytest.approx((2 * LN(2) ** 2 + LN(5) ** 2) / 3,
                                            rel=1e-6)
  # C=2: e0 takes t2 (.8), then t0 (tie with t1 at .5 -> t0); e1 takes t0, t1.
  out = expert_choice(logits, capacity=2, token_mask=mask)
  np.testing.assert_array_equal(out.kept[0], [[1, 1], [0, 1], [1, 0], [0, 0]])
  np.testing.assert_array_equal(out.position[0, 0], [1, 0])
  np.testing.assert_array_equal(out.position[0, 1, 1], 1)
  assert float(out.metrics["experts_per_token"]) == pytest.approx(4 / 3)
  # Dispatch slots follow the ranks.
  np.testing.assert_array_equal(out.dispatch_mask[0, :, 0], [[0, 1], [0, 0], [1, 0],
                                                             [0, 0]])


def test_expert_choice_picks_at_most_the_valid_tokens():
  # Capacity 3 but only 2 valid tokens: each expert picks both, never the padding.
  logits = jax.random.normal(jax.random.key(3), (1, 4, 3))
  out = expert_choice(logits, capacity=3, token_mask=jnp.array([[1, 0, 1, 0]], bool))
  np.testing.assert_array_equal(out.kept[0], [[1, 1, 1], [0, 0, 0], [1, 1, 1],
                                              [0, 0, 0]])
  assert float(out.metrics["experts_per_token"]) == 3.0


@pytest.mark.parametrize("capacity, masked", [(1, False), (3, False), (5, True),
                                              (12, True)])
def test_expert_choice_matches_loop_reference(capacity, masked):
  logits = jax.random.normal(jax.random.key(capacity), (3, 12, 6)) * 2
  mask = (jnp.arange(36).reshape(3, 12) % 7 != 3) if masked else None
  out = expert_choice(logits, capacity=capacity, token_mask=mask)
  ref = expert_choice_loop(logits, capacity=capacity,
                           token_mask=None if mask is None else np.asarray(mask))
  np.testing.assert_array_equal(out.dispatch_mask, ref["dispatch"])
  np.testing.assert_allclose(out.combine_weights, ref["combine"], rtol=1e-5, atol=1e-7)
  for name in ("dropped_fraction", "experts_per_token"):
    assert float(out.metrics[name]) == pytest.approx(ref[name], rel=1e-6)
  assert float(out.z_loss) == pytest.approx(ref["z_loss"], rel=1e-5)
  # Each expert fills min(C, valid tokens) slots per group.
  valid = np.ones((3, 12)) if mask is None else np.asarray(mask)
  per_expert = np.asarray(out.kept).sum(axis=1)  # [G, E]
  np.testing.assert_array_equal(
      per_expert, np.minimum(capacity, valid.sum(axis=1))[:, None] * np.ones((1, 6)))


# ----------------------------------------------------------------------------
# noisy_top_k
# ----------------------------------------------------------------------------


def test_noisy_top_k_without_noise_by_hand():
  # G=1, S=2, E=3, k=2, capacity 1, rng=None (noisy = clean).
  #   t0 clean [2, 1, 0] -> e0, e1, gates softmax([2, 1]) = [a, b], a = e/(e+1)
  #   t1 clean [0, 1, 2] -> e2, e1, gates [a, b]
  # Queue: first choices t0->e0 (0), t1->e2 (0); then t0->e1 (0), t1->e1 (1, dropped).
  # importance = [a, 2b, a]; load (counts) = [1, 2, 1]:
  #   cv2(load) = var / mean^2 = (2/9) / (16/9) = 1/8.
  clean = jnp.array([[[2., 1., 0.], [0., 1., 2.]]])
  out = noisy_top_k(clean, jnp.ones_like(clean), top_k=2, capacity=1)
  a, b = math.e / (math.e + 1), 1 / (math.e + 1)
  np.testing.assert_array_equal(out.expert_index[0], [[0, 1], [2, 1]])
  np.testing.assert_array_equal(out.kept[0], [[1, 1], [1, 0]])
  np.testing.assert_allclose(out.gates[0], [[a, b], [a, 0]], rtol=1e-6)
  imp = np.array([a, 2 * b, a])
  cv2_imp = imp.var() / (imp.mean() ** 2 + 1e-10)
  assert float(out.aux_loss) == pytest.approx(cv2_imp + 1 / 8, rel=1e-5)
  assert float(out.metrics["load_cv2"]) == pytest.approx(1 / 8, rel=1e-5)
  assert float(out.z_loss) == pytest.approx(
      LN(math.exp(2) + math.e + 1) ** 2, rel=1e-6)


def test_noisy_top_k_queues_like_route_with_policy_all():
  # Without noise the choices are route's (softmax is monotone) and so is the queue.
  logits = jax.random.normal(jax.random.key(4), (2, 16, 6))
  mask = jnp.arange(32).reshape(2, 16) < 29
  out = noisy_top_k(logits, jnp.ones_like(logits), top_k=2, capacity=5,
                    token_mask=mask)
  ref = route(logits, top_k=2, capacity=5, second_policy="all", token_mask=mask)
  np.testing.assert_array_equal(out.expert_index, ref.expert_index)
  np.testing.assert_array_equal(out.kept, ref.kept)
  np.testing.assert_array_equal(np.where(out.kept, out.position, -1),
                                np.where(ref.kept, ref.position, -1))


@pytest.mark.parametrize("top_k, capacity, masked", [(1, 3, False), (2, 4, True),
                                                     (3, 2, False), (6, 6, True)])
def test_noisy_top_k_matches_loop_reference(top_k, capacity, masked):
  key = jax.random.key(top_k)
  clean = jax.random.normal(key, (3, 10, 6))
  noise_std = jax.nn.softplus(jax.random.normal(jax.random.key(50), (3, 10, 6))) + 1e-2
  mask = (jnp.arange(30).reshape(3, 10) % 4 != 1) if masked else None
  rng = jax.random.key(99)
  out = noisy_top_k(clean, noise_std, top_k=top_k, capacity=capacity, rng=rng,
                    token_mask=mask)
  noise = jax.random.normal(rng, clean.shape, jnp.float32)  # the contract's draw
  ref = noisy_top_k_loop(clean, noise_std, noise, top_k=top_k, capacity=capacity,
                         token_mask=None if mask is None else np.asarray(mask))
  np.testing.assert_array_equal(out.dispatch_mask, ref["dispatch"])
  np.testing.assert_allclose(out.combine_weights, ref["combine"], rtol=1e-5, atol=1e-7)
  assert float(out.aux_loss) == pytest.approx(ref["aux_loss"], rel=1e-4, abs=1e-6)
  # top_k = E: every expert is always chosen, so load is the count, not Phi.
  # Without rng: no noise and load by counts.
  out = noisy_top_k(clean, noise_std, top_k=top_k, capacity=capacity, token_mask=mask)
  ref = noisy_top_k_loop(clean, noise_std, None, top_k=top_k, capacity=capacity,
                         token_mask=None if mask is None else np.asarray(mask))
  np.testing.assert_array_equal(out.dispatch_mask, ref["dispatch"])
  assert float(out.aux_loss) == pytest.approx(ref["aux_loss"], rel=1e-4, abs=1e-6)


def test_noisy_load_matches_monte_carlo():
  # Shazeer's load term for (t, e) is P(e is in t's top k) when e's own noise is drawn
  # again and the other noisy logits stay fixed (eq. 9). Estimate it by drawing e's
  # noisy logit N times and counting how often fewer than k of the other noisy logits
  # beat it; a Bernoulli mean over N draws has standard deviation
  # sqrt(p(1-p)/N) <= 0.5/sqrt(N) = 0.0025 for N = 40000, so 5 sigma + 1e-3 is a
  # bound that a wrong threshold (k-th vs (k+1)-th) misses by far more.
  num_tokens, num_experts, top_k, draws = 6, 4, 2, 40000
  clean = jax.random.normal(jax.random.key(1), (num_tokens, 1, num_experts))
  std = jax.nn.softplus(jax.random.normal(jax.random.key(2), clean.shape)) + 0.3
  rng = jax.random.key(3)
  noisy = clean + jax.random.normal(rng, clean.shape, jnp.float32) * std
  out = noisy_top_k(clean, std, top_k=top_k, capacity=1, rng=rng)
  index = common.top_k_by_argmax(noisy, top_k)
  # One token per group: load[g, e] is that token's probability.
  formula = np.asarray(routing.smooth_load(clean, noisy, std, index,
                                           jnp.ones((num_tokens, 1))))
  np.testing.assert_array_equal(np.asarray(out.expert_index), np.asarray(index))
  fresh = np.asarray(jax.random.normal(jax.random.key(4), (draws, num_tokens,
                                                           num_experts)))
  clean_np, std_np, noisy_np = (np.asarray(a)[:, 0] for a in (clean, std, noisy))
  for e in range(num_experts):
    redrawn = clean_np[:, e] + fresh[:, :, e] * std_np[:, e]  # [N, T]
    others = np.delete(noisy_np, e, axis=1)  # [T, E-1]
    beaten_by = (others[None] > redrawn[..., None]).sum(axis=-1)  # [N, T]
    mc = (beaten_by < top_k).mean(axis=0)  # [T]
    tol = 5 * np.sqrt(np.maximum(mc * (1 - mc), 1e-4) / draws) + 1e-3
    np.testing.assert_array_less(np.abs(mc - formula[:, e]), tol)


def test_noisy_top_k_noise_and_gradients():
  clean = jax.random.normal(jax.random.key(6), (2, 8, 4))
  std = jnp.full_like(clean, 0.5)
  a = noisy_top_k(clean, std, top_k=2, capacity=8, rng=jax.random.key(0))
  b = noisy_top_k(clean, std, top_k=2, capacity=8, rng=jax.random.key(0))
  c = noisy_top_k(clean, std, top_k=2, capacity=8, rng=jax.random.key(1))
  np.testing.assert_array_equal(a.expert_index, b.expert_index)
  assert not np.array_equal(a.expert_index, c.expert_index)

  def loss(lg, sd):
    out = noisy_top_k(lg, sd, top_k=2, capacity=3, rng=jax.random.key(0))
    return jnp.sum(out.combine_weights) + out.aux_loss + out.z_loss

  g_logits, g_std = jax.grad(loss, argnums=(0, 1))(clean, std)
  assert bool(jnp.all(jnp.isfinite(g_logits))) and float(jnp.abs(g_std).sum()) > 0
  # bfloat16 logits are routed in float32.
  out = noisy_top_k(clean.astype(jnp.bfloat16), std, top_k=2, capacity=3,
                    rng=jax.random.key(0))
  assert out.gates.dtype == jnp.float32 and out.aux_loss.dtype == jnp.float32


def test_cv2():
  # [1, 2, 3]: population variance 2/3, mean 2 -> (2/3) / 4 = 1/6.
  assert float(routing.cv2(jnp.array([1., 2., 3.]))) == pytest.approx(1 / 6, rel=1e-6)
  assert float(routing.cv2(jnp.zeros(4))) == 0.0


# ----------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(expert_groups=3, top_groups=1), "expert_groups=3 must divide"),
    (dict(expert_groups=0), "expert_groups"),
    (dict(expert_groups=2), "top_groups is required"),
    (dict(expert_groups=2, top_groups=0), "top_groups"),
    (dict(expert_groups=2, top_groups=3), "top_groups"),
    (dict(expert_groups=1, top_groups=2), "top_groups"),
    (dict(expert_groups=4, top_groups=1, top_k=2), "top_k=2 exceeds"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(capacity=0), "capacity"),
    (dict(score_fn="tanh"), "score_fn"),
    (dict(balance_choices="second"), "balance_choices"),
    (dict(selection_bias=jnp.zeros(3)), "selection_bias"),
    (dict(gate_scale=0.0), "gate_scale"),
])
def test_route_bad_args(kwargs, match):
  kw = dict(top_k=1, capacity=2)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    routing.route(jnp.zeros((1, 4, 4)), **kw)


def test_expert_choice_and_noisy_bad_args():
  logits = jnp.zeros((1, 4, 3))
  with pytest.raises(ValueError, match="capacity=5 exceeds the group size"):
    routing.expert_choice(logits, capacity=5)
  with pytest.raises(ValueError, match="capacity"):
    routing.expert_choice(logits, capacity=0)
  with pytest.raises(ValueError, match="logits"):
    routing.expert_choice(jnp.zeros((4, 3)), capacity=1)
  with pytest.raises(ValueError, match="top_k"):
    routing.noisy_top_k(logits, jnp.ones_like(logits), top_k=4, capacity=1)
  with pytest.raises(ValueError, match="capacity"):
    routing.noisy_top_k(logits, jnp.ones_like(logits), top_k=1, capacity=0)
  with pytest.raises(ValueError, match="noise_std"):
    routing.noisy_top_k(logits, jnp.ones((1, 4, 2)), top_k=1, capacity=1)
