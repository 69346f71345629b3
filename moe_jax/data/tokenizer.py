"""Tokenizers behind one small interface, chosen by the ``data.tokenizer`` config key.

Every tokenizer has ``encode(text, *, add_bos=False, add_eos=False) -> np.int32[N]``,
``decode(ids) -> str`` (special ids skipped), ``vocab_size``, ``pad_id``, ``bos_id``
(None when the tokenizer has none), ``eos_id``, ``special_ids`` and ``spec`` (the
``data.tokenizer`` value that rebuilds it, a path made absolute). Specials never come
out of ``encode`` of plain text, even text that spells one (``"<|endoftext|>"``).

* :class:`ByteTokenizer` (``"byte"``, the default): ids ``0..255`` are the raw bytes
  of the UTF-8 encoding; the special tokens follow. A byte vocabulary needs no
  training, no files and no external library, never produces an unknown token, and
  handles any script: the right default for a research codebase whose built-in
  corpus is a few megabytes of English.
* :class:`HfTokenizer` (``"hf:PATH"``): a Hugging Face ``tokenizer.json``, through
  the ``tokenizers`` package.
* :class:`SentencePieceTokenizer` (``"spm:PATH"``): a SentencePiece model.

:func:`make_tokenizer` builds any of them from its spec; a relative ``PATH`` is read
from ``base_dir``, the run's work directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from moe_jax.errors import ConfigError

__all__ = [
    "DEFAULT_TOKENIZER",
    "ByteTokenizer",
    "HfTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab_fits",
    "make_tokenizer",
    "resolve_tokenizer_path",
]

#: The ``data.tokenizer`` of configs that do not set it.
DEFAULT_TOKENIZER = "byte"

_NUM_BYTES = 256


class ByteTokenizer:
    """Maps text to UTF-8 byte ids, with PAD, BOS, EOS (and MASK) after the bytes.

    Args:
      mask_token: Include :attr:`mask_id` in the vocabulary (masked language
        modelling, ``model.objective="masked_lm"``); without it the vocabulary
        stays the 259 ids every causal-LM checkpoint was trained with.

    Attributes:
      pad_id: Padding id (256). Never produced by :meth:`encode`.
      bos_id: Beginning-of-sequence id (257), for prompting generation.
      eos_id: End-of-sequence id (258); the pipeline puts one after every
        document, so models learn where documents end.
      mask_id: The MASK id (259) that masked-LM inputs carry in place of the
        bytes to predict (BERT's ``[MASK]``). Never produced by :meth:`encode`.
    """

    pad_id: int = _NUM_BYTES
    bos_id: int = _NUM_BYTES + 1
    eos_id: int = _NUM_BYTES + 2
    mask_id: int = _NUM_BYTES + 3

    def __init__(self, *, mask_token: bool = False):
        self.mask_token = mask_token

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes plus 3 specials (259), plus MASK (260) with
        ``mask_token``."""
        return _NUM_BYTES + 3 + int(self.mask_token)

    @property
    def special_ids(self) -> tuple[int, ...]:
        ids = (self.pad_id, self.bos_id, self.eos_id)
        return ids + (self.mask_id,) if self.mask_token else ids

    def encode(
        self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> np.ndarray:
        """Encodes text (or already UTF-8 encoded bytes) to an ``int32`` array.

        Args:
          text: A string, or bytes taken as UTF-8 as-is (TFDS yields bytes, and
            skipping a decode/encode round trip keeps malformed input intact).
          add_bos: Prepend :attr:`bos_id`.
          add_eos: Append :attr:`eos_id`.

        Returns:
          A 1-D ``np.int32`` array of token ids.
        """
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        if add_bos or add_eos:
            parts = [ids]
            if add_bos:
                parts.insert(0, np.array([self.bos_id], np.int32))
            if add_eos:
                parts.append(np.array([self.eos_id], np.int32))
            ids = np.concatenate(parts)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ids to a string.

        Special and out-of-range ids are skipped, so model samples and padded
        batches decode directly. Byte sequences that are not valid UTF-8 (a
        sample cut mid-character, say) become U+FFFD rather than raising.
        """
        ids = np.asarray(ids).reshape(-1)
        byte_ids = ids[(ids >= 0) & (ids < _NUM_BYTES)].astype(np.uint8)
        return byte_ids.tobytes().decode("utf-8", errors="replace")

    @property
    def spec(self) -> str:
        """The ``data.tokenizer`` value: ``"byte"``."""
        return DEFAULT_TOKENIZER

    def __repr__(self) -> str:
        return (f"ByteTokenizer(vocab_size={self.vocab_size}"
                + (", mask_token=True)" if self.mask_token else ")"))


# --------------------------------------------------------------------------
# Subword tokenizers and the spec that picks one.
# --------------------------------------------------------------------------

_SCHEMES = {"hf": "a Hugging Face tokenizer.json", "spm": "a SentencePiece model"}
_FIX = ("use 'byte', 'hf:PATH' (a Hugging Face tokenizer.json) or 'spm:PATH' "
        "(a SentencePiece .model); a relative PATH is read from the run's work directory")

# Hugging Face tokenizers name their specials in tokenizer_config.json; without one,
# the first of these among the vocabulary's tokens is the special (GPT-2/NeoX,
# Llama 3, Llama/Mistral, Gemma, DeepSeek, BERT spellings).
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>",
             "<\uff5cend\u2581of\u2581sentence\uff5c>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>",
             "<\uff5cbegin\u2581of\u2581sentence\uff5c>")
PAD_NAMES = ("<pad>", "<|padding|>", "<|pad|>", "[PAD]")


def _with_specials(ids: np.ndarray, bos: int | None, eos: int, *, add_bos: bool,
                   add_eos: bool, name: str) -> np.ndarray:
    if add_bos and bos is None:
        raise ValueError(f"{name} has no BOS token; encode with add_bos=False.")
    parts = ([np.array([bos], np.int32)] if add_bos else []) + [ids] + (
        [np.array([eos], np.int32)] if add_eos else [])
    return np.concatenate(parts) if len(parts) > 1 else ids


def _as_str(text: str | bytes) -> str:
    return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")


def _kept_ids(ids, vocab_size: int, special: frozenset[int]) -> list[int]:
    """The ids of ``ids`` that decode: in range and not special."""
    flat = np.asarray(ids).reshape(-1)
    return [int(i) for i in flat if 0 <= i < vocab_size and int(i) not in special]


class _FileTokenizer:
    """What the tokenizers read from a file share: the path, the vocabulary size, the
    special ids found at construction (``_vocab_size``, ``_special``, ``bos_id``,
    ``eos_id``) and what follows from them. Subclasses set ``scheme`` and implement
    ``_encode_ids``, ``_decode_ids`` and ``_encode_batch_ids``."""

    scheme: str = ""
    path: str
    bos_id: int | None
    eos_id: int
    _vocab_size: int
    _special: frozenset[int]

    @property
    def vocab_size(self) -> int:
        """Number of ids (the largest id + 1)."""
        return self._vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._special))

    @property
    def spec(self) -> str:
        return f"{self.scheme}:{self.path}"

    def encode(self, text: str | bytes, *, add_bos: bool = False,
               add_eos: bool = False) -> np.ndarray:
        """Encodes text (bytes are read as UTF-8) to a 1-D ``np.int32`` array."""
        ids = np.asarray(self._encode_ids(_as_str(text)), np.int32)
        return _with_specials(ids, self.bos_id, self.eos_id, add_bos=add_bos,
                              add_eos=add_eos, name=repr(self))

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """:meth:`encode` of each text (no BOS/EOS)."""
        return [np.asarray(ids, np.int32)
                for ids in self._encode_batch_ids([_as_str(t) for t in texts])]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ids to a string, skipping special and out-of-range ids."""
        return self._decode_ids(_kept_ids(ids, self._vocab_size, self._special))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class HfTokenizer(_FileTokenizer):
    """A Hugging Face ``tokenizer.json`` (``data.tokenizer="hf:PATH"``).

    Specials: a ``tokenizer_config.json`` next to the file decides each of
    ``eos_token``, ``bos_token`` and ``pad_token`` it sets (null: none); otherwise
    EOS is the first of :data:`EOS_NAMES`, BOS of :data:`BOS_NAMES` and PAD of
    :data:`PAD_NAMES` in the vocabulary. The tokenizer needs an EOS (the pipeline
    puts one after every document); PAD falls back to EOS; a missing BOS is None
    and ``encode(..., add_bos=True)`` then raises. ``special_ids`` are the added
    tokens marked special plus these three.

    ``encode`` never produces a special id from text: a document that spells
    ``<|endoftext|>`` is encoded as those characters (``encode_special_tokens``),
    and the post-processor's template is not applied. Text round-trips exactly
    through a byte-level tokenizer (GPT-2, Llama 3, Qwen, OLMoE) or one with byte
    fallback; others may map unknown characters to their UNK token.

    Args:
      path: The ``tokenizer.json``.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
        self.path = os.path.abspath(path)
        self._tok = Tokenizer.from_file(self.path)
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        named = _hf_config_specials(os.path.join(os.path.dirname(self.path),
                                                 "tokenizer_config.json"))

        def find(key: str, names: tuple[str, ...]) -> int | None:
            if key in named:
                return vocab.get(named[key]) if named[key] is not None else None
            return next((vocab[n] for n in names if n in vocab), None)

        eos = find("eos_token", EOS_NAMES)
        if eos is None:
            raise ConfigError([f"data.tokenizer='hf:{path}' has no end-of-text token "
                               f"(none of {', '.join(EOS_NAMES)}); put a "
                               "tokenizer_config.json with its eos_token next to it."])
        self.eos_id: int = eos
        self.bos_id: int | None = find("bos_token", BOS_NAMES)
        pad = find("pad_token", PAD_NAMES)
        self.pad_id: int = eos if pad is None else pad
        added = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._special = frozenset(added | {self.eos_id, self.pad_id}
                                  | ({self.bos_id} if self.bos_id is not None else set()))

    scheme = "hf"

    def _encode_ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _hf_config_specials(path: str) -> dict[str, str | None]:
    """``{key: token or None}`` of the special keys ``tokenizer_config.json`` sets."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    out = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        if key in cfg:
            v = cfg[key]
            out[key] = v.get("content") if isinstance(v, dict) else v
    return out


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model (``data.tokenizer="spm:PATH"``).

    PAD, BOS and EOS are the model's own (``pad_id``/``bos_id``/``eos_id`` of its
    trainer); the model needs an EOS, PAD falls back to EOS, and a model without BOS
    has ``bos_id=None``. ``special_ids`` are its control symbols (never produced from
    text) plus these three. Text round-trips exactly only through a model trained
    with ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``
    and ``byte_fallback=True`` (otherwise unknown characters decode as " \u2047 ").

    Args:
      path: The ``.model`` file.
    """

    def __init__(self, path: str):
        import sentencepiece  # pylint: disable=import-outside-toplevel
        self.path = os.path.abspath(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self._vocab_size = int(self._sp.get_piece_size())
        if self._sp.eos_id() < 0:
            raise ConfigError([f"data.tokenizer='spm:{path}' has no EOS piece; train it "
                               "with eos_id >= 0."])
        self.eos_id: int = int(self._sp.eos_id())
        self.bos_id: int | None = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.pad_id: int = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        control = {i for i in range(self._vocab_size) if self._sp.is_control(i)}
        self._special = frozenset(control | {self.eos_id, self.pad_id}
                                  | ({self.bos_id} if self.bos_id is not None else set()))

    scheme = "spm"

    def _encode_ids(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def _encode_batch_ids(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


Tokenizer = ByteTokenizer | HfTokenizer | SentencePieceTokenizer


def resolve_tokenizer_path(spec: str, *, base_dir: str | None = None
                           ) -> tuple[str, str | None]:
    """``(scheme, absolute path)`` of a ``data.tokenizer`` value (``("byte", None)``).

    A relative path is joined to ``base_dir`` (the run's work directory; None: the
    current directory). Raises a one-line :class:`ConfigError` on an unknown scheme
    or a missing file.
    """
    if spec == DEFAULT_TOKENIZER:
        return DEFAULT_TOKENIZER, None
    scheme, sep, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or scheme not in _SCHEMES or not path:
        raise ConfigError([f"data.tokenizer={spec!r} is unknown; {_FIX}."])
    path = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))
    if not os.path.isfile(path):
        raise ConfigError([f"data.tokenizer={spec!r}: {path} does not exist; point it "
                           f"at {_SCHEMES[scheme]} ({_FIX})."])
    return scheme, path


def make_tokenizer(spec: str = DEFAULT_TOKENIZER, *, base_dir: str | None = None,
                   mask_token: bool = False) -> Tokenizer:
    """The tokenizer of a ``data.tokenizer`` value.

    Args:
      spec: ``"byte"``, ``"hf:PATH"`` (a ``tokenizer.json``) or ``"spm:PATH"`` (a
        SentencePiece model).
      base_dir: Where a relative ``PATH`` is read from: the run's work directory
        (None: the current directory). An absolute path is used as is.
      mask_token: The byte tokenizer with its MASK id (masked language modelling);
        subword tokenizers have none here.

    Raises:
      ConfigError: One line naming the value and the fix: an unknown scheme, a
        missing or unreadable file, ``mask_token`` with a subword tokenizer.
    """
    scheme, path = resolve_tokenizer_path(spec, base_dir=base_dir)
    if scheme == DEFAULT_TOKENIZER:
        return ByteTokenizer(mask_token=mask_token)
    if mask_token:
        raise ConfigError([f"data.tokenizer={spec!r} with model.objective='masked_lm': "
                           "masked LM uses the byte tokenizer's MASK id; use "
                           "data.tokenizer='byte'."])
    cls = HfTokenizer if scheme == "hf" else SentencePieceTokenizer
    try:
        return cls(path)
    except ConfigError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError([f"data.tokenizer={spec!r}: {path} is not {_SCHEMES[scheme]} "
                           f"({why}); {_FIX}."]) from None


def check_vocab_fits(tokenizer: Tokenizer, rows: int, what: str) -> None:
    """Raises a one-line :class:`ConfigError` when an embedding of ``rows`` rows (of
    ``what``, e.g. ``"--workdir='/runs/a'"``) is too small for ``tokenizer``'s ids."""
    if rows < tokenizer.vocab_size:
        raise ConfigError([f"{what} has an embedding of {rows} rows, fewer than the "
                           f"{tokenizer.vocab_size} ids of data.tokenizer="
                           f"{tokenizer.spec!r}; use the tokenizer the model was "
                           f"trained with, or a model with data.vocab_size >= "
                           f"{tokenizer.vocab_size}."])
