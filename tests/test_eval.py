"""Evaluation: the whole validation split once, its standard error, padding and meshes."""

import math

import jax
import numpy as np
import optax
import pytest

from moe_jax import data
from moe_jax.parallel import sharding
from moe_jax.models import param_sharding
from moe_jax.training import build, evaluation, run_state, train
from moe_jax.training.config import default_config
from moe_jax.training.metrics import read_metrics


def test_batch_stderr_hand_example():
  # nats [2, 6, 3] over tokens [1, 2, 1]: batch means x_b = [2, 3, 3], x = 11/4 = 2.75.
  # w_b (x_b - x) = [-0.75, 0.5, 0.25]; squares sum to 0.5625 + 0.25 + 0.0625 = 0.875.
  # SE = sqrt(3/2 * 0.875) / 4 = sqrt(1.3125) / 4 = 0.286410...
  assert evaluation.batch_stderr([2.0, 6.0, 3.0], [1.0, 2.0, 1.0]) == pytest.approx(
      math.sqrt(1.3125) / 4, rel=1e-12)
  # Equal weights: std(x_b) / sqrt(B) = 1 / sqrt(3) for means [1, 2, 3].
  assert evaluation.batch_stderr([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == pytest.approx(
      1 / math.sqrt(3), rel=1e-12)
  # A batch of padding only (weight 0) is left out; one batch has no stderr.
  assert evaluation.batch_stderr([1.0, 2.0, 3.0, 0.0],
                                 [1.0, 1.0, 1.0, 0.0]) == pytest.approx(
      1 / math.sqrt(3), rel=1e-12)
  assert math.isnan(evaluation.batch_stderr([5.0], [2.0]))


def test_evaluate_combines_batches_by_tokens():
  fake = iter([
      {"nats": 2.0, "tokens": 1.0, "byte_nats": 2.0, "bytes": 1.0, "aux_loss": 1.0,
       "dropped_fraction": 0.5},
      {"nats": 6.0, "tokens": 2.0, "byte_nats": 3.0, "bytes": 1.0, "aux_loss": 4.0,
       "dropped_fraction": 0.0},
      {"nats": 3.0, "tokens": 1.0, "byte_nats": 3.0, "bytes": 1.0, "aux_loss": 1.0,
       "dropped_fraction": 0.5},
  ])
  out = evaluation.evaluate(lambda params, batch: next(fake), None, range(3))
  assert out["eval_loss"] == pytest.approx(11 / 4)
  assert out["eval_tokens"] == 4 and out["eval_batches"] == 3
  assert out["eval_loss_stderr"] == pytest.approx(math.sqrt(1.3125) / 4)
  assert out["eval_bits_per_byte"] == pytest.approx(8 / 3 / math.log(2))
  # Token-weighted: (1*1 + 4*2 + 1*1) / 4 and (0.5 + 0 + 0.5) / 4.
  assert out["eval_aux_loss"] == pytest.approx(2.5)
  assert out["eval_dropped_fraction"] == pytest.approx(0.25)


SEQ_LEN, BATCH = 16, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Local text whose validation file leaves a partial window and a partial batch."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "the", "king", "my", "lord", "sweet", "night"]
  for i in range(10):  # 9 train files, the last (sorted) one is validation
    n = 400 if i < 9 else 173
    text = " ".join(rng.choice(words, n))
    (root / f"f{i}.txt").write_text(text[:n] if i == 9 else text, encoding="utf-8")
  return f"text:{root}/*.txt"


def _config(moe_every=2, **mesh):
  c = default_config()
  c.batch_size, c.data.seq_len = BATCH, SEQ_LEN
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 2, 32, 2, 64
  c.model.moe_every = moe_every
  c.moe.num_experts = 4
  # C = S: nothing is dropped, so a window fed alone routes like the same window
  # padded to L in a batch (group_size=0: one group per sequence).
  c.moe.eval_capacity_factor = 4.0
  c.mesh.data, c.mesh.expert = mesh.get("data", 1), mesh.get("expert", 1)
  return c


def _reference_loss(model, tokens):
  """Mean CE over every target of the stream: the full windows in one unpadded batch
  (one routing group per row, as in the eval), then the partial last window alone."""
  n = (tokens.size - 1) // SEQ_LEN
  full = np.stack([tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1] for i in range(n)])
  windows = [full.astype(np.int32), tokens[None, n * SEQ_LEN:].astype(np.int32)]
  nats, count = 0.0, 0
  for w in windows:
    if w.shape[1] < 2:
      continue
    logits, _ = model(w[:, :-1], deterministic=True)
    nats += float(optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).sum())
    count += w[:, 1:].size
  return nats / count, count


@pytest.mark.parametrize("moe_every,data_axis,expert_axis", [
    (0, 1, 1), (2, 1, 1), (2, 2, 2), (2, 4, 1)])
def test_full_eval_scores_every_token_once_on_any_mesh(corpus, moe_every, data_axis,
                                                       expert_axis):
  lm = data.make_lm_datasets(corpus, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  # 173 bytes + EOS = 174 tokens, 173 targets: 10 full windows and one of 13, in 3
  # batches of 4 rows whose last has one empty row.
  assert (lm.num_eval_targets, lm.num_eval_windows, lm.num_eval_batches) == (173, 11, 3)
  config = _config(moe_every, data=data_axis, expert=expert_axis)
  model = build.make_model(config)
  want, count = _reference_loss(model, lm.eval_tokens)

  mesh = sharding.make_mesh(data_axis, expert_axis)
  param_sharding.shard_model(model, mesh)
  eval_step = train.make_eval_step(model)
  _, params, _ = run_state.split_model(model)
  batches = (sharding.shard_batch(b, mesh) for b in lm.eval_iter(num_steps=None))
  got = evaluation.evaluate(eval_step, params, batches)
  assert got["eval_tokens"] == count == 173 and got["eval_batches"] == 3
  assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
  assert math.isfinite(got["eval_loss_stderr"]) and got["eval_loss_stderr"] > 0
  if moe_every:
    assert got["eval_dropped_fraction"] == 0.0  # padding took no slot


def test_padding_is_never_routed():
  # Padding rows ahead of real tokens in the same group: masked, their content changes
  # nothing of the real rows (outputs, losses, metrics), because they take no slot.
  config = _config()
  config.moe.eval_capacity_factor = 1.0  # tight: padding would take slots if routed
  config.moe.group_size = 2 * SEQ_LEN  # groups of two rows: padding shares a group
  model = build.make_model(config)
  rng = np.random.default_rng(1)
  real = rng.integers(0, 256, (2, SEQ_LEN)).astype(np.int32)
  mask = np.array([[False] * SEQ_LEN, [True] * SEQ_LEN] * 2)  # rows: pad, real, pad, real

  def batch(seed):
    pad = np.random.default_rng(seed).integers(0, 256, (2, SEQ_LEN)).astype(np.int32)
    return np.stack([pad[0], real[0], pad[1], real[1]])

  (a, a_aux), (b, b_aux) = (model(batch(s), deterministic=True, token_mask=mask)
                            for s in (2, 3))
  np.testing.assert_array_equal(a[mask], b[mask])
  for block in a_aux:
    np.testing.assert_array_equal(a_aux[block].aux_loss, b_aux[block].aux_loss)
    for key in ("expert_load", "dropped_fraction", "router_confidence"):
      np.testing.assert_array_equal(a_aux[block].metrics[key], b_aux[block].metrics[key])
  # Unmasked, the padding competes for the slots and the real rows change.
  (c, _), (d, _) = (model(batch(s), deterministic=True) for s in (2, 3))
  assert not np.allclose(c[mask], d[mask])


def test_train_writes_eval_tokens_and_stderr(corpus, tmp_path):
  # On a 2x2 mesh: a 1-batch sample at step 1, the whole split at the last step.
  config = _config(data=2, expert=2)
  config.data.name = corpus
  config.steps, config.warmup_steps, config.log_every = 2, 1, 1
  config.eval_every, config.checkpoint_every = 1, 2
  config.eval_steps, config.final_eval_steps = 1, 0
  config.sample.length, config.progress_bar = 0, False
  train.train_and_evaluate(config, str(tmp_path))
  lines = [l for l in read_metrics(str(tmp_path), "eval")]
  assert [(l["step"], l["eval_batches"], l["eval_tokens"]) for l in lines] == [
      (1, 1, 4 * SEQ_LEN), (2, 3, 173)]
  assert lines[-1]["eval_loss_stderr"] > 0
  assert lines[0]["eval_loss_stderr"] == "nan"  # one batch: no standard error
