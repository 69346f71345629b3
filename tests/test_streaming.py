"""The streaming pipeline (moe_jax/data/streaming.py): what an epoch holds against the
in-memory pipeline, record shards per process, exact resume after SIGKILL, reads at
start-up, pretokenized shards and grain workers."""

import collections
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moe_jax.data import pipeline, streaming
from moe_jax.data.sources import TextSource
from moe_jax.data.tokenizer import ByteTokenizer
from moe_jax.training.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 600  # hang guard only, never a deadline
TOK = ByteTokenizer()


def _docs(n, seed=0, prefix="", max_len=300):
  """``n`` documents of 0 to ``max_len`` characters, some two- and three-byte UTF-8."""
  rng = np.random.default_rng(seed)
  alphabet = list("abcdefghij klmnop\n") + ["é", "ß", "日"]
  return [prefix + "".join(rng.choice(alphabet, size=rng.integers(0, max_len)))
          for _ in range(n)]


def _source(docs, name="toy"):
  return TextSource(name=name, train_split="train", eval_split="validation",
                    train=docs, eval=docs[: max(1, len(docs) // 5)])


def _stream(docs, **kw):
  kw = {"seq_len": 16, "batch_size": 4, "seed": 0, "process_index": 0,
        "process_count": 1, **kw}
  return streaming.make_streaming_datasets("toy", sources={"toy": _source(docs)}, **kw)


def _windows(batches):
  return [np.concatenate([b["inputs"][i], b["targets"][i, -1:]])
          for b in batches for i in range(b["inputs"].shape[0])]


def test_unshuffled_epoch_is_the_in_memory_pipelines_windows():
  # With the records in their own order, streaming packs the same stream as
  # pack_documents and cuts the same windows: the in-memory epoch (shuffled) is the
  # same multiset of windows. The corpus is padded so its windows fill whole batches.
  seq_len, batch = 16, 4
  docs = _docs(40)
  n = sum(len(d.encode()) + 1 for d in docs)
  docs[-1] += "x" * ((-(n - 1)) % (seq_len * batch))
  tokens = pipeline.pack_documents(docs, TOK)
  assert (tokens.size - 1) % (seq_len * batch) == 0
  lm = pipeline.LmData(
      name="toy", tokenizer=TOK, train_split="train", eval_split="validation",
      seq_len=seq_len, batch_size=batch, eval_batch_size=batch, seed=0,
      process_index=0, process_count=1, train_tokens=tokens, eval_tokens=tokens)
  it = lm.train_iter()
  in_memory = _windows([next(it) for _ in range(lm.steps_per_epoch)])
  it = _stream(docs, seq_len=seq_len, batch_size=batch).train_iter(shuffle=False)
  streamed = _windows([next(it) for _ in range(lm.steps_per_epoch)])
  key = lambda w: w.tobytes()  # noqa: E731
  assert sorted(map(key, streamed)) == sorted(map(key, in_memory))
  # In order, too: window k starts at token k * seq_len of the stream.
  for k, w in enumerate(streamed):
    np.testing.assert_array_equal(w, tokens[k * seq_len : k * seq_len + seq_len + 1])


def test_shuffled_epoch_holds_every_document_once():
  # Shuffled, the windows of an epoch cut a different stream: the epoch's first N
  # tokens (N: the corpus with its EOS separators) are the documents in some order,
  # each exactly once.
  docs = _docs(30, seed=1)
  n = sum(len(d.encode()) + 1 for d in docs)
  it = _stream(docs).train_iter()
  ws = _windows([next(it) for _ in range(-(-n // (16 * 4)) + 1)])
  stream = np.concatenate([ws[0]] + [w[1:] for w in ws[1:]])[:n]
  assert stream[-1] == TOK.eos_id
  got = [TOK.decode(p) for p in np.split(stream, np.flatnonzero(stream == TOK.eos_id) + 1)[:-1]]
  assert collections.Counter(got) == collections.Counter(docs)
  assert got != docs  # shuffled


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_cover_every_record(process_count):
  docs = [f"doc{i}" for i in range(17)]
  per_epoch = {}
  for p in range(process_count):
    it = iter(streaming.document_stream(docs, TOK, seed=5, process_index=p,
                                        process_count=process_count))
    # Process p reads positions p, p + P, ...; two epochs' worth of them.
    mine = [TOK.decode(next(it)) for k in range(p, 2 * len(docs), process_count)]
    per_epoch[p] = mine
  positions = {}
  for p, mine in per_epoch.items():
    for j, doc in enumerate(mine):
      positions[p + j * process_count] = doc
  assert sorted(positions) == list(range(2 * len(docs)))
  for epoch in range(2):
    got = [positions[k] for k in range(epoch * len(docs), (epoch + 1) * len(docs))]
    assert sorted(got) == sorted(docs), epoch  # disjoint and covering, every epoch
  first = [positions[k] for k in range(len(docs))]
  second = [positions[k] for k in range(len(docs), 2 * len(docs))]
  assert first != second  # reshuffled per epoch


class _CountingRecords:
  """A record source that counts its reads."""

  def __init__(self, docs):
    self.docs, self.reads = docs, 0

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    self.reads += 1
    return self.docs[i]


def test_start_up_reads_only_a_few_records():
  records = _CountingRecords(_docs(5000, seed=2))
  data = streaming.make_streaming_datasets(
      "toy", sources={"toy": TextSource("toy", "train", "validation", records, ["x"])},
      seq_len=16, batch_size=4, seed=0,
      process_index=0, process_count=1)
  assert records.reads == 0
  next(data.train_iter())
  # One batch needs 4 * 16 + 1 tokens (a document or two); grain reads a few ahead.
  assert records.reads <= 12, records.reads


_RESUME_SCRIPT = r"""
import os, sys, time
import jax, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
from test_streaming import _mixture_data
from moe_jax.training.checkpoint import Checkpointer
it = _mixture_data().train_iter()
ckpt = Checkpointer({ckpt!r}, keep=2)
with open({out!r}, "w") as f:
  for step in range(1, 7):
    b = next(it)
    f.write(f"{{step}} {{b['inputs'].tobytes().hex()}} {{b['source'].tobytes().hex()}}\n")
    f.flush()
    if step == 3:
      ckpt.save(3, {{"w": jax.numpy.zeros(2)}}, data_iterator=it)
with open({out!r} + ".ready", "w"):
  pass
time.sleep(600)
"""


def _mixture_data():
  # Documents shorter than a window: windows span several of them.
  sources = {"a": _source(_docs(50, seed=3, prefix="A", max_len=30)),
             "b": _source(_docs(50, seed=4, prefix="B", max_len=30))}
  return streaming.make_streaming_datasets(
      mixture="a:0.6,b:0.4", sources=sources, seq_len=16, batch_size=4, seed=7,
      process_index=0, process_count=1)


def test_resume_after_sigkill_gives_the_same_batches(tmp_path):
  out, ckpt = str(tmp_path / "batches"), str(tmp_path / "ckpt")
  script = _RESUME_SCRIPT.format(root=ROOT, ckpt=ckpt, out=out)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  give_up = time.time() + HANG_GUARD_S
  while not os.path.exists(out + ".ready") and proc.poll() is None and time.time() < give_up:
    time.sleep(0.2)
  if proc.poll() is not None:
    pytest.fail(f"the run died (exit {proc.returncode}): {proc.communicate()[1][-3000:]}")
  proc.send_signal(signal.SIGKILL)  # after the checkpoint at step 3 and 3 more batches
  proc.wait()
  with open(out) as f:
    killed = [line.split()[1:] for line in f]
  it = _mixture_data().train_iter()
  step, _, _ = Checkpointer(ckpt, keep=2).restore(
      {"w": jax.ShapeDtypeStruct((2,), np.float32)}, data_iterator=it)
  assert step == 3
  resumed = [[b["inputs"].tobytes().hex(), b["source"].tobytes().hex()]
             for b in (next(it) for _ in range(3))]
  assert resumed == killed[3:6]
  fresh = _mixture_data().train_iter()
  assert [[b["inputs"].tobytes().hex(), b["source"].tobytes().hex()]
          for b in (next(fresh) for _ in range(6))] == killed


def test_state_mid_document_restores_each_later_batch():
  # Resume from every step of the first few: documents span windows both ways.
  # Long and short (some empty) documents: the buffer holds one or several.
  data = _stream(_docs(60, seed=6, max_len=20) + ["x" * 500], batch_size=1)
  it = data.train_iter()
  ref = [next(it) for _ in range(80)]
  it = data.train_iter()
  for k in range(79):
    state = it.get_state()
    again = data.train_iter()
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["inputs"], ref[k]["inputs"])
    next(it)
  other = _stream(_docs(20, seed=6), seed=1).train_iter()
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(state)


def test_pretokenized_shards_give_the_same_batches(tmp_path):
  docs = _docs(30, seed=8)
  meta = streaming.write_pretokenized("toy", TOK, str(tmp_path), records_per_shard=7,
                                      source=_source(docs))
  assert meta["records"] == {"train": 30, "validation": 6}
  assert len([f for f in os.listdir(tmp_path) if f.startswith("train.")]) == 5
  text = _stream(docs).train_iter()
  tokens = streaming.make_streaming_datasets(
      f"tokens:{tmp_path}", seq_len=16, batch_size=4, seed=0, process_index=0,
      process_count=1).train_iter()
  for _ in range(10):
    np.testing.assert_array_equal(next(text)["inputs"], next(tokens)["inputs"])


def test_eval_reads_a_fixed_prefix_of_documents_by_bytes():
  import grain
  docs = _docs(60, seed=9)
  data = _stream(docs, eval_batch_size=4)
  eval_docs = _source(docs).eval
  order = [int(i) for i in grain.MapDataset.range(len(eval_docs)).shuffle(
      seed=pipeline.EVAL_ORDER_SEED)]
  # Two eval steps: the first 2 * 4 * 16 = 128 bytes of the documents in the fixed
  # order (the last one cut, no EOS after it).
  text = b""
  want = []
  for i in order:
    doc = eval_docs[i].encode()
    if len(text) + len(doc) >= 128:
      cut = doc[: 128 - len(text)].decode("utf-8", errors="ignore").encode()
      want += list(cut)
      break
    text += doc
    want += list(doc) + [TOK.eos_id]
  batches = list(data.eval_iter(num_steps=2))
  got = data._eval_data(data.sources[0], 2).eval_tokens  # pylint: disable=protected-access
  assert got.tolist() == want
  assert sum(float(b["weights"].sum()) for b in batches) == len(want) - 1
  assert sum(float(b["target_bytes"].sum()) for b in batches) == sum(
      1 for t in want[1:] if t < 256)
  # The same batches on every call (and for every run: no seed enters).
  again = list(_stream(docs, eval_batch_size=4, seed=99).eval_iter(num_steps=2))
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  # No steps: every eval document once.
  full = data._eval_data(data.sources[0], None).eval_tokens  # pylint: disable=protected-access
  assert sorted(TOK.decode(p) for p in np.split(full, np.flatnonzero(full == TOK.eos_id) + 1)[:-1]
                ) == sorted(eval_docs)


def test_grain_workers_give_the_same_batches():
  data = _stream(_docs(40, seed=10))
  ref = data.train_iter()
  with_workers = _stream(_docs(40, seed=10), num_workers=1).train_iter()
  for _ in range(5):
    np.testing.assert_array_equal(next(ref)["inputs"], next(with_workers)["inputs"])
  state = with_workers.get_state()
  again = _stream(_docs(40, seed=10), num_workers=1).train_iter()
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"], next(ref)["inputs"])
  with pytest.raises(ValueError, match="different pipeline"):
    _stream(_docs(40, seed=10)).train_iter().set_state(state)


def _script(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_tokenizer_and_pretokenize_commands(tmp_path, capsys):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, doc in enumerate(_docs(20, seed=11)):
    (corpus / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
  source = f"text:{corpus}/*.txt"
  out = tmp_path / "bpe"
  assert _script("train_tokenizer").main([f"--source={source}", "--vocab_size=300",
                                          f"--out={out}"]) == 0
  from moe_jax.data.tokenizer import make_tokenizer
  tok = make_tokenizer(f"hf:{out / 'tokenizer.json'}")
  assert tok.vocab_size == 300 and tok.decode(tok.encode("日 é ok")) == "日 é ok"
  shards = tmp_path / "shards"
  assert _script("pretokenize").main([f"--source={source}", f"--out={shards}",
                                      f"--tokenizer=hf:{out / 'tokenizer.json'}"]) == 0
  assert f"tokens:{shards}" in capsys.readouterr().out
  kw = dict(seq_len=16, batch_size=4, seed=0, process_index=0, process_count=1,
            tokenizer=tok)
  a = streaming.make_streaming_datasets(source, **kw).train_iter()
  b = streaming.make_streaming_datasets(f"tokens:{shards}", **kw).train_iter()
  for _ in range(5):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
  # Shards of another vocabulary are refused in one line.
  from moe_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="was tokenized with"):
    streaming.make_streaming_datasets(f"tokens:{shards}", seq_len=16, batch_size=4,
                                      process_index=0, process_count=1)
  assert _script("train_tokenizer").main([f"--source={source}", "--vocab_size=10",
                                          f"--out={out}"]) == 1
