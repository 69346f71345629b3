"""moe_jax.data.tokenizer: the byte, Hugging Face and SentencePiece tokenizers behind
one interface, the ``data.tokenizer`` key, and a tiny run trained and sampled with a
``tokenizer.json``."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.data import pipeline
from moe_jax.data.sources import load_text_source
from moe_jax.data.tokenizer import (ByteTokenizer, HfTokenizer, SentencePieceTokenizer,
                                    check_vocab_fits, make_tokenizer)
from moe_jax.errors import ConfigError
from moe_jax.training import build
from moe_jax.training.config import default_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few KB of prose, code and non-Latin text to train the tiny subword models on.
CORPUS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}\n",
    "Grüße aus Köln — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀.\n",
] * 20

ROUND_TRIP = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n  indented",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "Grüße, naïve café: 日本語 Ελληνικά 🙂🚀 \u00a0nbsp",
    "ROMEO:\nBut, soft! what light",
    "",
]

# Spelled-out specials of every kind: plain text, never special ids.
SPELLED = "a <|endoftext|> b <pad> c </s> <s> <unk> <eos> <bos> d"


def _train_hf(path, *, specials=("<|endoftext|>", "<pad>")):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(path))
  return str(path)


def _train_spm(prefix):
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter("".join(CORPUS).splitlines()), model_prefix=str(prefix),
      vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_by_whitespace=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      minloglevel=2)
  return f"{prefix}.model"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("tokenizers")
  return {"hf": _train_hf(d / "tokenizer.json"), "spm": _train_spm(d / "sp")}


@pytest.fixture(scope="module", params=["byte", "hf", "spm"])
def tok(request, files):
  kind = request.param
  return make_tokenizer("byte" if kind == "byte" else f"{kind}:{files[kind]}")


def test_specs_build_their_kind(files):
  assert isinstance(make_tokenizer("byte"), ByteTokenizer)
  hf = make_tokenizer(f"hf:{files['hf']}")
  assert isinstance(hf, HfTokenizer) and hf.vocab_size == 300
  assert hf.spec == f"hf:{files['hf']}"
  sp = make_tokenizer(f"spm:{files['spm']}")
  assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == 400
  assert (sp.pad_id, sp.bos_id, sp.eos_id) == (3, 1, 2)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok, text):
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert tok.decode(ids) == text
  # With BOS/EOS around it (skipped by decode) and as UTF-8 bytes.
  if tok.bos_id is not None:
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
  assert np.array_equal(tok.encode(text.encode("utf-8")), ids)


def test_subwords_are_shorter_than_bytes(files):
  text = "".join(CORPUS[:4])
  hf = make_tokenizer(f"hf:{files['hf']}")
  assert len(hf.encode(text)) < 0.8 * len(ByteTokenizer().encode(text))


def test_special_ids_never_come_out_of_encode(tok):
  ids = tok.encode(SPELLED + "".join(CORPUS[:4]))
  assert not set(ids.tolist()) & set(tok.special_ids)
  assert {tok.pad_id, tok.eos_id} <= set(tok.special_ids)
  assert tok.decode(tok.encode(SPELLED)) == SPELLED
  # decode skips specials and ids past the vocabulary (a bigger embedding's rows).
  ids = tok.encode("ab")
  mixed = [tok.eos_id, *ids.tolist(), tok.pad_id, tok.vocab_size, tok.vocab_size + 7]
  assert tok.decode(mixed) == "ab"


def test_add_bos_add_eos(files):
  hf = make_tokenizer(f"hf:{files['hf']}")
  # The tiny tokenizer.json has <|endoftext|> (EOS) and <pad>, no BOS.
  vocab = json.load(open(files["hf"], encoding="utf-8"))["added_tokens"]
  ids = {t["content"]: t["id"] for t in vocab}
  assert (hf.eos_id, hf.pad_id, hf.bos_id) == (ids["<|endoftext|>"], ids["<pad>"], None)
  assert hf.encode("hi", add_eos=True)[-1] == hf.eos_id
  with pytest.raises(ValueError, match="no BOS"):
    hf.encode("hi", add_bos=True)
  sp = make_tokenizer(f"spm:{files['spm']}")
  out = sp.encode("hi", add_bos=True, add_eos=True)
  assert out[0] == sp.bos_id and out[-1] == sp.eos_id


def test_hf_specials_from_tokenizer_config_and_pad_fallback(tmp_path):
  path = _train_hf(tmp_path / "tokenizer.json", specials=("</s>", "<s>", "<|im_end|>"))
  tok = HfTokenizer(path)
  ids = {t["content"]: t["id"]
         for t in json.load(open(path, encoding="utf-8"))["added_tokens"]}
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (ids["</s>"], ids["<s>"], ids["</s>"])
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<|im_end|>"}, "bos_token": None, "pad_token": "</s>"}))
  tok = HfTokenizer(path)
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (ids["<|im_end|>"], None, ids["</s>"])
  (tmp_path / "no_eos").mkdir()
  no_eos = _train_hf(tmp_path / "no_eos" / "tokenizer.json", specials=("<x>",))
  with pytest.raises(ConfigError, match="no end-of-text token"):
    HfTokenizer(no_eos)


def test_relative_paths_are_read_from_the_work_directory(files, tmp_path):
  shutil.copy(files["hf"], tmp_path / "tokenizer.json")
  tok = make_tokenizer("hf:tokenizer.json", base_dir=str(tmp_path))
  assert tok.spec == f"hf:{tmp_path / 'tokenizer.json'}"
  config = default_config()
  config.data.tokenizer = "hf:tokenizer.json"
  assert build.tokenizer_of(config, workdir=str(tmp_path)).spec == tok.spec
  assert validate_config(config, workdir=str(tmp_path)) == []
  errors = validate_config(config, workdir=str(tmp_path / "elsewhere"))
  assert len(errors) == 1 and "does not exist" in errors[0]


def test_vocab_size_rules(files):
  config = default_config()
  assert build.vocab_size_of(config) == 259
  config.model.objective = "masked_lm"
  assert build.vocab_size_of(config) == 260
  config = default_config()
  config.data.tokenizer = f"hf:{files['hf']}"
  assert build.vocab_size_of(config) == 300
  config.data.vocab_size = 512  # a full-size config's embedding, bigger than needed
  assert build.vocab_size_of(config) == 512
  assert validate_config(config) == []
  config.data.vocab_size = 299
  errors = validate_config(config)
  assert errors == ["data.vocab_size=299 is smaller than the tokenizer's 300 tokens; "
                    "use 0 or at least 300."]
  # Configs from before the key (no data.tokenizer) are the byte tokenizer's.
  config = default_config()
  del config.data["tokenizer"]
  assert build.vocab_size_of(config) == 259 and validate_config(config) == []


@pytest.mark.parametrize("value,message", [
    ("bpe:/x.json", "data.tokenizer='bpe:/x.json' is unknown; use 'byte', 'hf:PATH'"),
    ("hf:", "data.tokenizer='hf:' is unknown"),
    ("bytes", "data.tokenizer='bytes' is unknown"),
    ("hf:/nonexistent/tokenizer.json",
     "data.tokenizer='hf:/nonexistent/tokenizer.json': /nonexistent/tokenizer.json "
     "does not exist; point it at a Hugging Face tokenizer.json"),
    ("spm:/nonexistent/sp.model", "does not exist; point it at a SentencePiece model"),
])
def test_bad_tokenizer_values_get_one_line(value, message):
  config = default_config()
  config.data.tokenizer = value
  errors = validate_config(config)
  assert len(errors) == 1 and "\n" not in errors[0], errors
  assert message in errors[0]


def test_unreadable_file_and_masked_lm_get_one_line(files, tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  config = default_config()
  config.data.tokenizer = f"hf:{bad}"
  errors = validate_config(config)
  assert len(errors) == 1 and "is not a Hugging Face tokenizer.json (" in errors[0]
  assert "\n" not in errors[0]
  config.data.tokenizer = f"hf:{files['hf']}"
  config.model.objective = "masked_lm"
  errors = validate_config(config)
  assert len(errors) == 1 and "masked LM uses the byte tokenizer's MASK id" in errors[0]


def test_too_small_embedding_is_one_line(files):
  tok = make_tokenizer(f"hf:{files['hf']}")
  check_vocab_fits(tok, 300, "--workdir='run'")
  with pytest.raises(ConfigError) as e:
    check_vocab_fits(tok, 259, "--workdir='run'")
  assert len(e.value.errors) == 1
  assert e.value.errors[0].startswith(
      "--workdir='run' has an embedding of 259 rows, fewer than the 300 ids of "
      f"data.tokenizer='hf:{files['hf']}'; use the tokenizer the model was trained "
      "with, or a model with data.vocab_size >= 300.")


def test_pack_documents_puts_eos_between_documents(files):
  docs = ["first doc", "", "Grüße 🙂", b"bytes doc"]
  for spec in (f"hf:{files['hf']}", f"spm:{files['spm']}"):
    tok = make_tokenizer(spec)
    packed = pipeline.pack_documents(docs, tok)
    want = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    assert packed.dtype == np.uint16 and np.array_equal(packed, want)


def test_finetuning_keeps_the_base_runs_tokenizer(files, tmp_path):
  from moe_jax.peft import finetune
  shutil.copy(files["hf"], tmp_path / "tokenizer.json")
  base = default_config()
  base.data.tokenizer = "hf:tokenizer.json"
  ft = default_config()
  del ft["model"], ft["moe"], ft["mamba"]
  ft.data.tokenizer = "hf:tokenizer.json"
  config = finetune.run_config(ft, base, str(tmp_path))
  assert config.data.tokenizer == f"hf:{tmp_path / 'tokenizer.json'}"
  ft.data.tokenizer = "byte"
  with pytest.raises(ConfigError, match="the model reads the base run's tokenizer"):
    finetune.run_config(ft, base, str(tmp_path))


@pytest.mark.slow
def test_train_and_sample_with_a_tokenizer_json(files, tmp_path, monkeypatch):
  import moe_jax.data
  from moe_jax.inference import decode
  from moe_jax.training import run_state, train
  from tests.test_train import HANG_GUARD_S, tiny_config
  made = []

  def make_lm_datasets(*args, **kwargs):
    made.append(pipeline.make_lm_datasets(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(moe_jax.data, "make_lm_datasets", make_lm_datasets)
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copy(files["hf"], workdir / "tokenizer.json")
  config = tiny_config(steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1,
                       log_every=1, eval_steps=1, **{"data.tokenizer": "hf:tokenizer.json",
                                                     "sample.length": 8,
                                                     "sample.top_k": 0})
  summary = train.train_and_evaluate(config, str(workdir))
  # The run's data is the tokenizer.json's: its ids, EOS between documents.
  tok = make_tokenizer(f"hf:{files['hf']}")
  (lm,) = made
  assert lm.tokenizer.spec == f"hf:{workdir / 'tokenizer.json'}"
  source = load_text_source(config.data.name)
  assert np.array_equal(lm.train_tokens, pipeline.pack_documents(source.train, tok))
  assert lm.train_tokens.max() < 300
  assert summary["sample"].startswith(config.sample.prompt)
  saved = json.load(open(workdir / "config.json", encoding="utf-8"))
  assert saved["data"]["tokenizer"] == "hf:tokenizer.json"
  model, _, _ = run_state.load_model(str(workdir))
  assert model.cfg.vocab_size == 300
  # sample.py reads the tokenizer from the run (the work directory's tokenizer.json).
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sample.py"),
       f"--workdir={workdir}", "--prompt=def fib(n):", "--length=12", "--temperature=0"],
      capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
      cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  # The same greedy continuation in process, encoded and decoded with the tokenizer.json.
  ids = decode.Decoder(model, batch_size=1, max_len=32).generate(
      [tok.encode("def fib(n):")], 12, temperature=0.0)[0]
  assert out.stdout.rstrip("\n") == "def fib(n):" + tok.decode(ids)
  # A tokenizer bigger than the checkpoint's embedding: one line, both numbers.
  saved["data"]["tokenizer"] = f"spm:{files['spm']}"
  saved["data"]["vocab_size"] = 300  # the checkpoint's rows
  (workdir / "config.json").write_text(json.dumps(saved))
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sample.py"),
       f"--workdir={workdir}", "--length=4"],
      capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
  assert out.returncode == 1
  assert "has an embedding of 300 rows, fewer than the 400 ids" in out.stderr
  assert "Traceback" not in out.stderr


def test_iterator_state_names_a_subword_tokenizer(files, tmp_path):
  for i in range(12):
    (tmp_path / f"doc{i}.txt").write_text("".join(CORPUS[i % 4:i % 4 + 3]), encoding="utf-8")
  name = f"text:{tmp_path}/*.txt"

  def lm(tokenizer):
    return pipeline.make_lm_datasets(name, seq_len=16, batch_size=2, process_index=0,
                                     process_count=1, tokenizer=tokenizer)

  hf = make_tokenizer(f"hf:{files['hf']}")
  byte_state = lm(None).train_iter().get_state()
  assert "tokenizer" not in byte_state["pipeline"]  # byte states as before the key
  it = lm(hf).train_iter()
  next(it)
  state = it.get_state()
  assert state["pipeline"]["tokenizer"] == "hf:300"
  resumed = lm(hf).train_iter()
  resumed.set_state(state)
  assert np.array_equal(next(resumed)["inputs"], next(it)["inputs"])
  with pytest.raises(ValueError, match="different pipeline"):
    lm(None).train_iter().set_state(state)


def test_token_labels_take_each_tokens_first_byte(files):
  from moe_jax.analysis.categories import char_labels, token_labels
  text = "ROMEO:\nBut, soft! what light"
  byte = ByteTokenizer()
  labels = char_labels(text)[0]
  assert np.array_equal(token_labels(labels, byte.encode(text), byte), labels)
  hf = make_tokenizer(f"hf:{files['hf']}")
  ids = np.concatenate([[hf.eos_id], hf.encode(text)])
  starts = np.cumsum([0] + [len(hf.decode([i]).encode()) for i in ids[1:-1]])
  got = token_labels(labels, ids, hf)
  assert len(ids) < len(labels)  # merges: fewer tokens than bytes
  assert got[0] == -1 and np.array_equal(got[1:], labels[starts])
