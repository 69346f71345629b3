"""LoRA targets, merge and ESFT selection (moe_jax/layers/lora_adapters.py,
moe_jax/peft/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax.layers import lora_adapters
from moe_jax.training import build
from moe_jax.training.config import default_config
from moe_jax.layers.experts import Experts
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.peft import esft, finetune
from moe_jax.peft import lora as peft_lora
from moe_jax.models.transformer import Transformer
from moe_jax.models.model_config import TransformerConfig

ALL_TARGETS = ("router", "experts", "shared_experts", "attention", "dense_ffn")
M, H, E, HS, V, N_HEADS = 16, 24, 4, 32, 40, 2


def tiny_model(dispatch="indices", *, shared=1, activation="swiglu", seed=0):
  """Block 0: attention + dense FFN; block 1: attention + MoE (top-2, shared experts)."""
  moe = MoeConfig(d_model=M, d_ff=H, num_experts=E, top_k=2, group_size=16,
                  dispatch=dispatch, num_shared_experts=shared, activation=activation,
                  capacity_factor=1.0, eval_capacity_factor=1.0,
                  init_scale=0.1, router_init_scale=0.1)
  cfg = TransformerConfig(vocab_size=V, num_layers=2, d_model=M, num_heads=N_HEADS,
                          d_ff=HS, moe_every=2, moe=moe, activation=activation)
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def tokens(seed=1, shape=(2, 16)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def logits_of(model, x):
  return model(x, deterministic=True)[0]


def randomise_b(model, seed=2):
  """Nonzero B factors, so the adapters change the outputs."""
  key = jax.random.key(seed)
  for i, (_, _, _, ad) in enumerate(lora_adapters.adapters(model)):
    b = ad.lora_b
    b.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype))


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "dropless"])
def test_zero_init_outputs_equal_the_base_model_exactly(dispatch):
  model = tiny_model(dispatch)
  x = tokens()
  base = logits_of(model, x)
  n = peft_lora.add_lora(model, ALL_TARGETS, rank=4, alpha=8.0)
  # router 1 + experts 3 (swiglu) + shared 3 + attention 2x4 + dense FFN 3.
  assert n == 1 + 3 + 3 + 8 + 3
  np.testing.assert_array_equal(np.asarray(logits_of(model, x)), np.asarray(base))


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "dropless"])
def test_merge_equals_the_adapted_model(dispatch):
  model = tiny_model(dispatch)
  x = tokens()
  base = logits_of(model, x)
  peft_lora.add_lora(model, ALL_TARGETS, rank=4, alpha=8.0)
  randomise_b(model)
  adapted = logits_of(model, x)
  assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2  # the adapters do something
  # W + (alpha / r) * reshape(A @ B) from the raw factors, in numpy (alpha / r = 2).
  expected = [(owner, name, np.asarray(getattr(owner, name)[...], np.float64)
               + 2.0 * (np.asarray(ad.lora_a[...], np.float64)
                        @ np.asarray(ad.lora_b[...], np.float64)).reshape(
                            getattr(owner, name).shape))
              for _, owner, name, ad in lora_adapters.adapters(model)]
  assert lora_adapters.merge(model) == 18
  for owner, name, want in expected:
    np.testing.assert_allclose(np.asarray(getattr(owner, name)[...]), want, atol=1e-5,
                               rtol=1e-5, err_msg=name)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  np.testing.assert_allclose(np.asarray(logits_of(model, x)), np.asarray(adapted),
                             atol=1e-5, rtol=0)


def test_every_dispatch_path_sees_the_same_adapted_experts():
  """Same weights, three dispatch paths: equal outputs with nonzero adapters (C = S,
  nothing dropped; eval_capacity_factor=E makes C = S for the capacity paths)."""
  outs = {}
  for dispatch in ("einsum", "indices", "dropless"):
    model = tiny_model(dispatch)
    peft_lora.add_lora(model, ("experts",), rank=2, alpha=2.0)
    randomise_b(model)
    layer = model.blocks[1].ffn
    layer.cfg = MoeConfig(**{**layer.cfg.__dict__, "eval_capacity_factor": float(E)})
    outs[dispatch] = logits_of(model, tokens())
  np.testing.assert_allclose(outs["einsum"], outs["indices"], atol=1e-5)
  np.testing.assert_allclose(outs["einsum"], outs["dropless"], atol=1e-5)


def test_expert_adapters_match_a_per_expert_loop():
  """W'_e = W_e + (alpha / r) A_e B_e for every expert e, on every read path."""
  experts = Experts(E, M, H, activation="relu", rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(3)
  for name in ("wi", "wo"):
    lora_adapters.attach(experts, name, batch_dims=1, in_dims=1, rank=3, alpha=6.0,
                         rngs=rngs)
  key = jax.random.key(4)
  for i, name in enumerate(("wi", "wo")):
    b = lora_adapters.adapter(experts, name).lora_b
    b.set_value(jax.random.normal(jax.random.fold_in(key, i), b.shape))
  x = jax.random.normal(jax.random.key(5), (E, 3, M))
  ref = []
  for e in range(E):
    def w(name):
      ad = lora_adapters.adapter(experts, name)
      return getattr(experts, name)[e] + 2.0 * ad.lora_a[e] @ ad.lora_b[e]  # 6 / 3
    ref.append(jax.nn.relu(x[e] @ w("wi")) @ w("wo"))
  ref = jnp.stack(ref)
  np.testing.assert_allclose(experts(x, deterministic=True), ref, atol=1e-4)
  # Gathered (decode) path: token t of expert e picks expert e.
  index = jnp.repeat(jnp.arange(E), 3)[:, None]
  got = experts.gathered(x.reshape(E * 3, M), index, deterministic=True)[:, 0]
  np.testing.assert_allclose(got.reshape(E, 3, M), ref, atol=1e-4)
  # Ragged (dropless) path: rows sorted by expert, 3 each.
  got = experts.ragged(x.reshape(E * 3, M), jnp.full((E,), 3, jnp.int32),
                       deterministic=True)
  np.testing.assert_allclose(got.reshape(E, 3, M), ref, atol=1e-4)


@pytest.mark.parametrize("a_init,bound_times_sqrt_k", [
    ("he_uniform", np.sqrt(6.0)),             # flax's nnx.LoRA: sqrt(6 / K)
    ("kaiming_uniform_a_sqrt5", 1.0),         # HF PEFT: gain sqrt(2 / 6) * sqrt(3 / K)
])
def test_lora_a_init_bound(a_init, bound_times_sqrt_k):
  """A [E, K, r] is uniform on [-b, b] over its fan-in K (per expert, not E * K): the
  extremes of 4 * 96 * 64 draws reach within 1% of b and never pass it, and the
  variance is b^2 / 3. finetune.a_init picks it; the default keeps He-uniform."""
  model = tiny_model()
  config = ml_collections.ConfigDict({"finetune": finetune.default_finetune_config()})
  assert config.finetune.a_init == "he_uniform"
  config.finetune.targets, config.finetune.rank = ("experts",), 64
  config.finetune.a_init = a_init
  assert not finetune.finetune_errors(config.finetune)
  info = finetune.prepare(model, config)["info"]
  assert info["a_init"] == a_init
  experts = next(m for _, m in nnx.iter_modules(model) if isinstance(m, Experts))
  a = np.asarray(experts.wo_lora.lora_a[...])  # wo [E, H, M]: K = H = 24
  assert a.shape == (E, H, 64)
  bound = bound_times_sqrt_k / np.sqrt(H)
  assert lora_adapters.a_bound(a_init, H) == pytest.approx(bound)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  assert a.var() == pytest.approx(bound ** 2 / 3, rel=0.05)
  config.finetune.a_init = "normal"
  assert "finetune.a_init='normal' is unknown" in finetune.finetune_errors(
      config.finetune)[0]


def test_trainable_count_equals_the_formula():
  model = tiny_model()
  peft_lora.add_lora(model, ALL_TARGETS, rank=4, alpha=8.0)
  r = 4
  # A weight [*b, *in, *out] adds prod(b) * r * (K + N), K = prod(in), N = prod(out).
  router = r * (M + E)
  experts = 3 * E * r * (M + H)        # wi, wi_gate [E, M, H]; wo [E, H, M]
  shared = 3 * r * (M + 1 * H)         # shared width = num_shared_experts * d_ff
  attention = 2 * (4 * r * (M + M))   # per block: q, k, v [M, N, D], out [N, D, M]
  dense = 3 * r * (M + HS)
  expected = router + experts + shared + attention + dense
  assert expected == 80 + 1920 + 480 + 1024 + 576  # r=4, M=16, E=4, H=24, HS=32
  assert peft_lora.lora_param_count(model) == expected
  per_weight = sum(peft_lora.adapter_param_count(w.shape, ad.lora_a.ndim - 2,
                                                 1 if name != "out" else 2, r)
                   for _, owner, name, ad in lora_adapters.adapters(model)
                   for w in [getattr(owner, name)])
  assert per_weight == expected


def test_targets_the_model_lacks_are_refused_in_one_line():
  dense_only = tiny_model(shared=0)
  with pytest.raises(ValueError, match="shared_experts.*num_shared_experts=0"):
    peft_lora.add_lora(dense_only, ("experts", "shared_experts"), rank=2, alpha=2.0)
  with pytest.raises(ValueError, match="'mlp', which is not a target.*router"):
    peft_lora.add_lora(dense_only, ("mlp",), rank=2, alpha=2.0)
  assert not jax.tree.leaves(nnx.state(dense_only, nnx.LoRAParam))


def test_lora_params_carry_logical_axes_like_their_weights():
  model = tiny_model()
  peft_lora.add_lora(model, ("experts", "attention"), rank=2, alpha=2.0)
  ad = lora_adapters.adapter(model.blocks[1].ffn.experts, "wi")
  assert ad.lora_a.get_metadata("logical_axes") == ("expert", "embed", None)
  assert ad.lora_b.get_metadata("logical_axes") == ("expert", None, "mlp")
  ad = lora_adapters.adapter(model.blocks[0].mixer, "out")
  assert ad.lora_a.shape == (M, 2) and ad.lora_b.shape == (2, M)


# ---------------------------------------------------------------------------------
# ESFT
# ---------------------------------------------------------------------------------


def test_select_experts_hand_example():
  shares = {1: np.array([0.1, 0.4, 0.3, 0.2]), 3: np.array([0.25, 0.25, 0.25, 0.25])}
  # Layer 1 sorted: e1 0.4, e2 0.3 (cum 0.7), e3 0.2 (0.9), e0 0.1 (1.0).
  sel = esft.select_experts(shares, 0.6)
  assert sel[1].tolist() == [False, True, True, False]   # 0.7 >= 0.6
  assert sel[3].tolist() == [True, True, True, False]    # 0.25, 0.5, 0.75 >= 0.6
  assert esft.select_experts(shares, 0.7)[1].tolist() == [False, True, True, False]
  assert esft.select_experts(shares, 0.71)[1].tolist() == [False, True, True, True]
  assert esft.select_experts(shares, 0.4)[1].tolist() == [False, True, False, False]
  assert esft.select_experts(shares, 0.5)[3].tolist() == [True, True, False, False]
  assert esft.select_experts(shares, 1.0)[1].all()
  with pytest.raises(ValueError, match="top_p=0"):
    esft.select_experts(shares, 0)


@pytest.mark.parametrize("score,paper_p", [("gate", 0.1), ("token", 0.2)])
def test_esft_top_p_defaults_to_the_papers_threshold_for_the_score(score, paper_p):
  """Wang et al. 2024 select up to p = 0.1 of the gate share (ESFT-Gate) and p = 0.2 of
  the token share (ESFT-Token); an explicit top_p wins."""
  batch = {"inputs": tokens(shape=(2, 16))}
  for top_p, expected in ((None, paper_p), (0.6, 0.6)):
    model = tiny_model("dropless")
    config = ml_collections.ConfigDict({"finetune": finetune.default_finetune_config()})
    config.finetune.method, config.finetune.esft.score = "esft", score
    config.finetune.esft.top_p = top_p
    assert not finetune.finetune_errors(config.finetune)
    info = finetune.prepare(model, config, [batch])["info"]
    assert info["top_p"] == expected
    shares = {int(k): np.asarray(v) for k, v in info["shares"].items()}
    selected = esft.select_experts(shares, expected)
    assert info["selected"] == {str(k): v.tolist() for k, v in selected.items()}


def test_routing_shares_normalise_the_layer_metrics_over_batches():
  """routing_shares sums each MoE block's choice_counts / gate_mass over the scoring
  batches and normalises per layer; what those metrics hold is pinned by hand in
  test_gate_and_token_scores_hand_example."""
  model = tiny_model("dropless")  # nothing dropped: every choice is kept
  x = tokens(shape=(2, 16))
  batch = {"inputs": x}
  token = esft.routing_shares(model, [batch, batch], "token")
  gate = esft.routing_shares(model, [batch], "gate")
  assert list(token) == [1] and token[1].shape == (E,)
  out = model.forward(x, deterministic=True)
  counts = np.asarray(out.moe_aux[1].metrics["choice_counts"])
  assert counts.sum() == 2 * 16 * 2  # T * K choices
  np.testing.assert_allclose(token[1], counts / counts.sum(), rtol=1e-6)
  mass = np.asarray(out.moe_aux[1].metrics["gate_mass"])
  assert mass.sum() == pytest.approx(2 * 16, rel=1e-5)  # normalised gates sum to 1
  np.testing.assert_allclose(gate[1], mass / mass.sum(), rtol=1e-6)


@pytest.mark.parametrize("capacity_factor", [3.0, 2.0])
def test_gate_and_token_scores_hand_example(capacity_factor):
  """What ESFT sums, by hand: one group of 3 tokens, M=2, E=3, top-2, softmax gates
  renormalised over the 2 choices.

  W = [[0, ln 2, ln 5], [ln 3, ln 2, 0]]; x1 = [1, 0], x2 = [0, 1], x3 = [1, 1]:
    x1 W = ln[1, 2, 5]  -> p = [1, 2, 5] / 8   -> e2 5/7, e1 2/7
    x2 W = ln[3, 2, 1]  -> p = [3, 2, 1] / 6   -> e0 3/5, e1 2/5
    x3 W = ln[3, 4, 5]  -> p = [3, 4, 5] / 12  -> e2 5/9, e1 4/9
  Token choices per expert: [1, 3, 2] of T * K = 6 -> token shares [1, 3, 2] / 6.
  Gate mass: e0 3/5, e1 2/7 + 2/5 + 4/9, e2 5/7 + 5/9 (sum 3 = T).
  capacity_factor=2 gives C = ceil(2 * 3 / 3) = 2: the queue is choice-major, so e1's
  second choices arrive x1, x2, x3 and x3's is dropped; its gate then counts 0 in the
  gate mass (e1 2/7 + 2/5), while the token count still has it (the token score counts
  every choice, kept or not).
  """
  cfg = MoeConfig(d_model=2, d_ff=4, num_experts=3, top_k=2, group_size=3,
                  min_capacity=1, capacity_factor=capacity_factor,
                  eval_capacity_factor=capacity_factor, dispatch="indices",
                  init_scale=0.1, router_init_scale=0.1)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  ln = np.log
  layer.router.kernel.set_value(jnp.array([[0.0, ln(2), ln(5)], [ln(3), ln(2), 0.0]],
                                          jnp.float32))
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
  _, aux = layer(x, deterministic=True)
  x3_e1 = 4 / 9 if capacity_factor == 3.0 else 0.0
  mass = np.array([3 / 5, 2 / 7 + 2 / 5 + x3_e1, 5 / 7 + 5 / 9])
  np.testing.assert_allclose(np.asarray(aux.metrics["gate_mass"]), mass, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux.metrics["choice_counts"]), [1, 3, 2])
  assert float(aux.metrics["dropped_fraction"]) == 0.0  # every token keeps a choice


def test_frozen_rows_stay_bit_identical_under_adamw_with_weight_decay():
  params = {"experts": {"wi": jnp.arange(24.0).reshape(4, 3, 2) - 5.0},
            "norm": jnp.ones((3,))}
  # A -0.0 in frozen row 1: freeze_rows alone gives it a +0.0 update, and -0.0 + 0.0
  # is +0.0, so only keep_frozen keeps its bits.
  params["experts"]["wi"] = params["experts"]["wi"].at[1, 0, 0].set(-0.0)
  masks = esft.mask_tree(params, {("experts", "wi"): np.array([True, False, True,
                                                              False])[:, None, None]})
  assert masks["norm"] is None
  tx = optax.chain(optax.adamw(0.1, weight_decay=0.5), esft.freeze_rows(masks))
  state = tx.init(params)
  p = params
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, p)
    updates, state = tx.update(grads, state, p)
    p = esft.keep_frozen(optax.apply_updates(p, updates), p, masks)
  old, new = np.asarray(params["experts"]["wi"]), np.asarray(p["experts"]["wi"])
  assert np.signbit(new[1, 0, 0])
  for e in (1, 3):
    assert old[e].tobytes() == new[e].tobytes()
  for e in (0, 2):
    assert not np.array_equal(old[e], new[e])
  assert not np.array_equal(np.asarray(p["norm"]), np.ones(3))


def test_frozen_rows_gradients_do_not_touch_the_trained_rows_under_clipping():
  """ESFT's frozen experts have no gradient: whatever the backward pass gives their
  rows, the trained rows move as in a model without them (global-norm clip 1.0 and
  AdamW; the gradients' norms are 2-10, so the clip is active at every step)."""
  config = default_config()
  config.steps, config.warmup_steps, config.learning_rate = 10, 1, 0.1
  config.grad_clip, config.weight_decay = 1.0, 0.1
  keep = np.array([True, False, True, False])
  wi = jax.random.normal(jax.random.key(0), (4, 3, 2))
  params = {"experts": {"wi": wi}, "norm": jnp.ones((3,))}
  tx, _, masks = finetune.make_optimizer(
      config, params, {("experts", "wi"): keep[:, None, None]})
  # The same optimizer on a model holding only the trained rows.
  ref_tx, _ = build.make_optimizer(config)
  ref = {"experts": {"wi": wi[keep]}, "norm": params["norm"]}
  ref_state = ref_tx.init(ref)

  def run(frozen_scale):
    p, state, norms = params, tx.init(params), []
    for t in range(4):
      key = jax.random.fold_in(jax.random.key(1), t)
      g = jax.random.normal(key, (4, 3, 2)) * (t + 1)
      g = jnp.where(keep[:, None, None], g, frozen_scale * (10.0 ** t) * g)
      grads = {"experts": {"wi": g}, "norm": jnp.full((3,), 0.5 * (t + 1))}
      p, state, masked, _ = esft.apply_gradients(tx, grads, state, p, masks)
      norms.append(float(optax.global_norm(masked)))
    return p, norms

  zero, zero_norms = run(0.0)
  big, big_norms = run(100.0)
  for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(big)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert zero_norms == big_norms  # the logged grad_norm ignores frozen rows
  p = ref
  for t in range(4):
    g = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (4, 3, 2)) * (t + 1)
    grads = {"experts": {"wi": g[keep]}, "norm": jnp.full((3,), 0.5 * (t + 1))}
    assert float(optax.global_norm(grads)) > 1.0  # the clip acts
    updates, ref_state = ref_tx.update(grads, ref_state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(np.asarray(zero["experts"]["wi"][keep]),
                             np.asarray(p["experts"]["wi"]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(zero["norm"]), np.asarray(p["norm"]), rtol=1e-6)
  assert np.asarray(zero["experts"]["wi"][~keep]).tobytes() == np.asarray(
      wi[~keep]).tobytes()
