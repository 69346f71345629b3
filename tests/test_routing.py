"""Exact semantics of moe_jax.routing, pinned with hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from tests.reference import route_loop

LN = math.log

# Jitted once per static configuration: op-by-op dispatch of the ~100 small ops of a
# route call costs seconds per test on a small CPU.
route = jax.jit(routing.route, static_argnames=(
    "top_k", "capacity", "second_policy", "second_threshold", "normalize_gates",
    "batch_priority"))


def _logits_from_probs(probs):
  """Logits whose softmax is exactly ``probs`` (up to float rounding)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


# ----------------------------------------------------------------------------
# expert_capacity
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group_size, num_experts, cf, min_cap, expected",
    [
        (1024, 8, 1.25, 4, 160),  # 1.25 * 1024 / 8 = 160 exactly (no rounding up)
        (1024, 8, 1.0, 4, 128),
        (1000, 8, 1.0, 4, 125),
        (1001, 8, 1.0, 4, 126),  # ceil(125.125)
        (10, 4, 1.0, 4, 4),  # ceil(2.5) = 3 -> raised to min_capacity 4
        (10, 4, 1.0, 1, 3),
        (3, 1, 2.0, 4, 3),  # ceil(6) = 6 -> capped at S = 3
        (256, 8, 2.0, 4, 64),  # GShard 2N/E for top-2 is capacity_factor 2.0
    ])
def test_expert_capacity(group_size, num_experts, cf, min_cap, expected):
  assert routing.expert_capacity(group_size, num_experts, cf, min_cap) == expected


@pytest.mark.parametrize("kwargs, name", [
    (dict(group_size=16, num_experts=4, capacity_factor=0.0), "capacity_factor"),
    (dict(group_size=16, num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (dict(group_size=0, num_experts=4, capacity_factor=1.0), "group_size"),
    (dict(group_size=16, num_experts=0, capacity_factor=1.0), "num_experts"),
    (dict(group_size=16, num_experts=4, capacity_factor=1.0, min_capacity=0),
     "min_capacity"),
])
def test_expert_capacity_bad_args(kwargs, name):
  with pytest.raises(ValueError, match=name):
    routing.expert_capacity(**kwargs)


# ----------------------------------------------------------------------------
# Hand-computed routing cases
# ----------------------------------------------------------------------------


def test_top1_capacity_overflow_drops_later_tokens():
  # Five tokens in one group all prefer expert 0 (p = 0.7); capacity 2.
  # Queue of expert 0 in token order: t0 -> slot 0, t1 -> slot 1, t2..t4 -> positions
  # 2, 3, 4 >= C, dropped. Expert 1 receives nothing.
  probs = np.tile([[0.7, 0.3]], (5, 1))[None]
  out = route(_logits_from_probs(probs), top_k=1, capacity=2)
  expected = np.zeros((1, 5, 2, 2), bool)
  expected[0, 0, 0, 0] = True
  expected[0, 1, 0, 1] = True
  np.testing.assert_array_equal(out.dispatch_mask, expected)
  np.testing.assert_allclose(out.combine_weights, expected * 0.7, rtol=1e-6)
  np.testing.assert_array_equal(out.position[0, :, 0], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(out.kept[0, :, 0], [1, 1, 0, 0, 0])
  assert float(out.metrics["dropped_fraction"]) == pytest.approx(3 / 5)
  # Load counts first choices before capacity: all 5 chose expert 0.
  np.testing.assert_allclose(out.metrics["expert_load"], [1.0, 0.0])
  # Fill counts kept choices per slot: expert 0 has 2 of 2 slots used.
  np.testing.assert_allclose(out.metrics["expert_fill"], [1.0, 0.0])


def test_top2_first_choices_have_priority_over_second_choices():
  # G=1, S=4, E=3, capacity 2.
  #   t0: p = [.6, .3, .1] -> first e0, second e1
  #   t1: p = [.6, .3, .1] -> first e0, second e1
  #   t2: p = [.6, .3, .1] -> first e0, second e1
  #   t3: p = [.2, .7, .1] -> first e1, second e0
  # Queue: all first choices in token order, then all second choices.
  #   e0: t0(1st) pos 0, t1(1st) pos 1, t2(1st) pos 2 -> dropped, t3(2nd) pos 3 -> dropped
  #   e1: t3(1st) pos 0, t0(2nd) pos 1, t1(2nd) pos 2 -> dropped, t2(2nd) pos 3 -> dropped
  # Token 3's first choice beats t0's second choice for e1 although t0 comes earlier.
  probs = np.array([[.6, .3, .1], [.6, .3, .1], [.6, .3, .1], [.2, .7, .1]])[None]
  out = route(_logits_from_probs(probs), top_k=2, capacity=2)
  np.testing.assert_array_equal(out.expert_index[0], [[0, 1], [0, 1], [0, 1], [1, 0]])
  np.testing.assert_array_equal(out.position[0], [[0, 1], [1, 2], [2, 3], [0, 3]])
  np.testing.assert_array_equal(out.kept[0], [[1, 1], [1, 0], [0, 0], [1, 0]])
  # Normalised gates: .6/.9 = 2/3 and .3/.9 = 1/3; t3: .7/.9 = 7/9.
  np.testing.assert_allclose(out.gates[0], [[2 / 3, 1 / 3], [2 / 3, 0], [0, 0],
                                            [7 / 9, 0]], rtol=1e-5)
  expected = np.zeros((4, 3, 2), bool)
  expected[0, 0, 0] = expected[1, 0, 1] = True  # e0 slots
  expected[3, 1, 0] = expected[0, 1, 1] = True  # e1 slots
  np.testing.assert_array_equal(out.dispatch_mask[0], expected)
  # t2 has no kept choice -> 1 of 4 tokens dropped.
  assert float(out.metrics["dropped_fraction"]) == pytest.approx(0.25)
  # 2 of 4 second choices kept? No: only t0's -> 1/4.
  assert float(out.metrics["second_kept_fraction"]) == pytest.approx(0.25)


def test_ties_go_to_lowest_expert_index():
  # Uniform probabilities: first choice e0, second e1 (e0 masked out), for every token.
  out = route(jnp.zeros((1, 2, 4)), top_k=2, capacity=2)
  np.testing.assert_array_equal(out.expert_index[0], [[0, 1], [0, 1]])
  # Tie between e1 and e2 after e0: second choice is e1.
  probs = np.array([[[.4, .3, .3]]])
  out = route(_logits_from_probs(probs), top_k=2, capacity=1)
  np.testing.assert_array_equal(out.expert_index[0, 0], [0, 1])


def test_batch_priority_orders_by_top1_probability():
  # S=4 tokens all prefer e0, capacity 2. Top-1 probabilities .55, .9, .7, .9.
  # BPR order: t1 (.9), t3 (.9, tie -> position order), t2 (.7), t0 (.55).
  # e0 slots: t1 -> 0, t3 -> 1; t2 and t0 dropped.
  probs = np.array([[.55, .45], [.9, .1], [.7, .3], [.9, .1]])[None]
  out = route(_logits_from_probs(probs), top_k=1, capacity=2,
                      batch_priority=True)
  np.testing.assert_array_equal(out.position[0, :, 0], [3, 0, 2, 1])
  np.testing.assert_array_equal(out.kept[0, :, 0], [0, 1, 0, 1])
  assert out.dispatch_mask[0, 1, 0, 0] and out.dispatch_mask[0, 3, 0, 1]
  # Without BPR the first two tokens win.
  out = route(_logits_from_probs(probs), top_k=1, capacity=2)
  np.testing.assert_array_equal(out.kept[0, :, 0], [1, 1, 0, 0])


def test_batch_priority_top2_second_choices_follow_the_same_order():
  # E=2, capacity 2, top-2: every token's second choice is the other expert.
  #   t0: p=[.6,.4] first e0   t1: p=[.2,.8] first e1   t2: p=[.9,.1] first e0
  # BPR order by top-1 prob: t2 (.9), t1 (.8), t0 (.6).
  # First choices: e0 <- t2 (pos 0), t0 (pos 1); e1 <- t1 (pos 0).
  # Second choices in the same order: t2 -> e1 pos 1 (kept), t1 -> e0 pos 2 (dropped),
  # t0 -> e1 pos 2 (dropped).
  probs = np.array([[.6, .4], [.2, .8], [.9, .1]])[None]
  out = route(_logits_from_probs(probs), top_k=2, capacity=2,
                      batch_priority=True)
  np.testing.assert_array_equal(out.position[0], [[1, 2], [0, 2], [0, 1]])
  np.testing.assert_array_equal(out.kept[0], [[1, 0], [1, 0], [1, 1]])


def test_normalize_gates():
  probs = np.array([[[.5, .3, .2]]])
  out = route(_logits_from_probs(probs), top_k=2, capacity=1,
                      normalize_gates=True)
  np.testing.assert_allclose(out.gates[0, 0], [.5 / .8, .3 / .8], rtol=1e-6)
  out = route(_logits_from_probs(probs), top_k=2, capacity=1,
                      normalize_gates=False)
  np.testing.assert_allclose(out.gates[0, 0], [.5, .3], rtol=1e-6)
  # Top-1 keeps the raw probability either way (Switch).
  out = route(_logits_from_probs(probs), top_k=1, capacity=1,
                      normalize_gates=True)
  np.testing.assert_allclose(out.gates[0, 0], [.5], rtol=1e-6)


def test_threshold_policy_uses_normalised_second_gate():
  # t0: p=[.5,.4,.1] -> g2 = .4/.9 = .444 > .3 kept.
  # t1: p=[.7,.2,.1] -> g2 = .2/.9 = .222 <= .3 dropped by policy (not by capacity).
  # Without normalisation t0's raw g2 = .4 > .3 and t1's .2 < .3: same decisions, but
  # t2: p=[.4,.35,.25] -> normalised .35/.75 = .467 kept; raw .35 kept. Use threshold .45
  # to split them: normalised .467 > .45 kept, raw .35 < .45 dropped.
  probs = np.array([[.5, .4, .1], [.7, .2, .1], [.4, .35, .25]])[None]
  logits = _logits_from_probs(probs)
  out = route(logits, top_k=2, capacity=3, second_policy="threshold",
                      second_threshold=0.3)
  np.testing.assert_array_equal(out.kept[0, :, 1], [1, 0, 1])
  out = route(logits, top_k=2, capacity=3, second_policy="threshold",
                      second_threshold=0.45)
  np.testing.assert_array_equal(out.kept[0, :, 1], [0, 0, 1])
  out = route(logits, top_k=2, capacity=3, second_policy="threshold",
                      second_threshold=0.45, normalize_gates=False)
  np.testing.assert_array_equal(out.kept[0, :, 1], [0, 0, 0])


def test_policy_dropped_second_choice_takes_no_slot():
  # E=2, capacity 1, threshold .2.
  #   t0: p=[.9,.1] -> first e0 (pos 0, kept); second e1 with g2 = .1 <= .2: removed
  #       by the policy before queueing.
  #   t1: p=[.7,.3] -> first e0 (pos 1 >= C, dropped); second e1 with g2 = .3 > .2.
  # Queue of e1 (second choices in token order): t0's was removed, so t1's second
  # choice is at position 0 and kept. Had the removed choice queued, it would be at 1.
  probs = np.array([[.9, .1], [.7, .3]])[None]
  out = route(_logits_from_probs(probs), top_k=2, capacity=1,
                      second_policy="threshold", second_threshold=0.2)
  np.testing.assert_array_equal(out.kept[0], [[1, 0], [0, 1]])
  np.testing.assert_array_equal(out.position[0, 1], [1, 0])
  assert float(out.gates[0, 0, 1]) == 0.0
  assert float(out.gates[0, 1, 1]) == pytest.approx(0.3, rel=1e-5)
  assert float(out.metrics["dropped_fraction"]) == 0.0


def test_random_policy_keep_rate_and_determinism():
  # g2 (normalised) = .1/.9... use p=[.8,.1,.1]: g2 = .1/.9 = 1/9; threshold .2
  # -> keep probability (1/9)/.2 = 5/9. With 20000 tokens the rate is 5/9 +- 0.012 (3σ).
  n = 20000
  probs = np.tile([[.8, .1, .1]], (n, 1))[None]
  logits = _logits_from_probs(probs)
  kw = dict(top_k=2, capacity=n, second_policy="random", second_threshold=0.2)
  out = route(logits, rng=jax.random.key(0), **kw)
  rate = float(jnp.mean(out.kept[0, :, 1]))
  assert abs(rate - 5 / 9) < 0.012, rate
  again = route(logits, rng=jax.random.key(0), **kw)
  np.testing.assert_array_equal(out.kept, again.kept)
  other = route(logits, rng=jax.random.key(1), **kw)
  assert not np.array_equal(out.kept, other.kept)
  # g2 >= threshold: min(1, g2 / threshold) = 1, always kept.
  probs = np.tile([[.5, .4, .1]], (1000, 1))[None]
  out = route(_logits_from_probs(probs), rng=jax.random.key(0), top_k=2,
                      capacity=1000, second_policy="random", second_threshold=0.2)
  assert bool(jnp.all(out.kept[0, :, 1]))


def test_capacity_is_enforced_and_slots_unique():
  # Regression: a cumsum over the wrong axis drops nothing and double-books slots.
  logits = jax.random.normal(jax.random.key(0), (3, 64, 8)) * 3
  for top_k in (1, 2):
    out = route(logits, top_k=top_k, capacity=5)
    dispatch = np.asarray(out.dispatch_mask)
    assert dispatch.sum(axis=1).max() <= 1  # each (expert, slot) holds <= 1 token
    assert (dispatch.sum(axis=(1, 3)) <= 5).all()  # each expert <= C tokens
    assert dispatch.sum(axis=(2, 3)).max() <= top_k
    assert float(out.metrics["dropped_fraction"]) > 0  # skewed logits must drop


# ----------------------------------------------------------------------------
# Golden losses
# ----------------------------------------------------------------------------


def test_golden_aux_and_z_loss():
  # Group 0: t0 p=[.8,.2] (logits [ln4, 0]), t1 p=[.6,.4] (logits [ln1.5, 0]).
  #   f = [1, 0] (both pick e0), P = [.7, .3] -> aux = 2 * (1*.7 + 0*.3) = 1.4
  # Group 1: t0 p=[.2,.8] (logits [0, ln4]), t1 p=[.8,.2].
  #   f = [.5, .5], P = [.5, .5] -> aux = 2 * (.25 + .25) = 1.0
  # aux_loss = mean over groups = 1.2
  # z: logsumexp([ln4, 0]) = ln5, logsumexp([ln1.5, 0]) = ln2.5
  #   z_loss = (3 ln5^2 + ln2.5^2) / 4
  logits = jnp.array([[[LN(4), 0.], [LN(1.5), 0.]], [[0., LN(4)], [LN(4), 0.]]])
  out = route(logits, top_k=1, capacity=2)
  assert float(out.aux_loss) == pytest.approx(1.2, rel=1e-6)
  assert float(out.z_loss) == pytest.approx((3 * LN(5)**2 + LN(2.5)**2) / 4, rel=1e-6)
  # expert_load: first choices e0, e0, e1, e0 -> [.75, .25]
  np.testing.assert_allclose(out.metrics["expert_load"], [.75, .25])
  # router_confidence: mean of .8, .6, .8, .8 = .75
  assert float(out.metrics["router_confidence"]) == pytest.approx(0.75, rel=1e-6)


def test_z_loss_uses_logits_not_probabilities():
  # A constant shift leaves the probabilities (and routing) unchanged but moves
  # logsumexp by the same constant.
  logits = jax.random.normal(jax.random.key(1), (2, 8, 4))
  a = route(logits, top_k=1, capacity=8)
  b = route(logits + 10.0, top_k=1, capacity=8)
  np.testing.assert_array_equal(a.dispatch_mask, b.dispatch_mask)
  assert float(a.aux_loss) == pytest.approx(float(b.aux_loss), rel=1e-6)
  lse = jax.nn.logsumexp(logits, axis=-1)
  assert float(b.z_loss) == pytest.approx(float(jnp.mean((lse + 10) ** 2)), rel=1e-5)
  assert float(b.z_loss) > float(a.z_loss) + 50


def test_aux_loss_balanced_router_is_one_and_collapsed_is_e():
  # Perfectly balanced: f_e = P_e = 1/E -> E * E * (1/E^2) = 1.
  num_experts = 4
  logits = jnp.where(jnp.eye(num_experts, dtype=bool), 5.0, 0.0)[None]  # t_i -> e_i
  balanced = route(logits, top_k=1, capacity=4)
  assert float(balanced.aux_loss) == pytest.approx(1.0, rel=1e-6)
  # Collapsed: every token to e0 with p -> 1: f = [1,0,..], P ~ [1,0,..] -> ~E.
  collapsed = route(jnp.tile(jnp.array([[30., 0, 0, 0]]), (4, 1))[None],
                            top_k=1, capacity=4)
  assert float(collapsed.aux_loss) == pytest.approx(num_experts, rel=1e-6)


# ----------------------------------------------------------------------------
# Fast path against the slow loop reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_k, capacity, batch_priority, policy, normalize",
    [(k, c, bpr, pol, norm)
     for k, c in [(1, 1), (1, 3), (2, 3), (2, 8), (3, 3)]
     for bpr, pol, norm in [(False, "all", True), (True, "all", True),
                            (False, "threshold", True), (True, "threshold", False)]
     if k > 1 or (pol == "all" and norm)])
def test_route_matches_loop_reference(top_k, capacity, batch_priority, policy,
                                      normalize):
  logits = jax.random.normal(jax.random.key(top_k * 10 + capacity), (3, 16, 5)) * 2
  kw = dict(top_k=top_k, capacity=capacity, second_policy=policy,
            second_threshold=0.3, normalize_gates=normalize,
            batch_priority=batch_priority)
  out = route(logits, **kw)
  ref_dispatch, ref_combine = route_loop(jax.nn.softmax(logits), **kw)
  np.testing.assert_array_equal(out.dispatch_mask, ref_dispatch)
  np.testing.assert_allclose(out.combine_weights, ref_combine, rtol=1e-5, atol=1e-7)


def test_token_mask_excludes_padding_everywhere():
  logits = jax.random.normal(jax.random.key(2), (2, 6, 3)) * 2
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
  out = route(logits, top_k=2, capacity=6, token_mask=mask)
  assert not bool(jnp.any(out.dispatch_mask[1, 3:]))
  ref_dispatch, _ = route_loop(jax.nn.softmax(logits), top_k=2, capacity=6,
                               token_mask=np.asarray(mask))
  np.testing.assert_array_equal(out.dispatch_mask, ref_dispatch)
  # Losses equal the mean of per-group losses computed on the real tokens only.
  g0 = route(logits[:1], top_k=2, capacity=6)
  g1 = route(logits[1:, :3], top_k=2, capacity=6)
  assert float(out.aux_loss) == pytest.approx((float(g0.aux_loss) + float(g1.aux_loss))
                                              / 2, rel=1e-6)
  assert float(out.z_loss) == pytest.approx(
      (6 * float(g0.z_loss) + 3 * float(g1.z_loss)) / 9, rel=1e-6)
  np.testing.assert_allclose(
      out.metrics["expert_load"],
      (6 * g0.metrics["expert_load"] + 3 * g1.metrics["expert_load"]) / 9, rtol=1e-6)


def test_route_is_jittable_and_differentiable():
  logits = jax.random.normal(jax.random.key(3), (2, 8, 4))

  def loss(lg):
    out = route(lg, top_k=2, capacity=3)
    return jnp.sum(out.combine_weights) + out.aux_loss + out.z_loss

  g = jax.jit(jax.grad(loss))(logits)
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).sum()) > 0


def test_router_math_is_float32_for_bf16_logits():
  logits = jax.random.normal(jax.random.key(4), (1, 8, 4)).astype(jnp.bfloat16)
  out = route(logits, top_k=2, capacity=4)
  assert out.gates.dtype == jnp.float32
  assert out.combine_weights.dtype == jnp.float32
  assert out.aux_loss.dtype == jnp.float32 and out.z_loss.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(capacity=0), "capacity"),
    (dict(second_policy="sometimes", top_k=2), "second_policy"),
    (dict(second_policy="random", top_k=2), "rng"),
    (dict(second_policy="random", top_k=2, rng=jax.random.key(0),
          second_threshold=0.0), "second_threshold"),
])
def test_route_bad_args(kwargs, name):
  kw = dict(top_k=1, capacity=2)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=name):
    routing.route(jnp.zeros((1, 4, 4)), **kw)


def test_route_bad_rank():
  with pytest.raises(ValueError, match="router_logits"):
    routing.route(jnp.zeros((4, 4)), top_k=1, capacity=2)


def test_load_balance_summary():
  s = routing.load_balance_summary([0.25, 0.25, 0.25, 0.25])
  assert s["cv"] == 0.0 and s["max_over_mean"] == 1.0
  s = routing.load_balance_summary([1.0, 0.0])
  assert s["max_over_mean"] == 2.0
