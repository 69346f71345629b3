"""Byte-level UTF-8 tokenizer.

Ids ``0..255`` are the raw bytes of the UTF-8 encoding; the special tokens
follow. A byte vocabulary needs no training, no files and no external library,
never produces an unknown token, and handles any script: the right default for
a research codebase whose built-in corpus is a few megabytes of English.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ByteTokenizer"]

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

    def __repr__(self) -> str:
        return (f"ByteTokenizer(vocab_size={self.vocab_size}"
                + (", mask_token=True)" if self.mask_token else ")"))
