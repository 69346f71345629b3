"""How many bytes of the original UTF-8 text each token id stands for.

:func:`token_byte_lengths` gives a table ``int32[V]`` per tokenizer; an eval batch
carries ``target_bytes = table[targets]`` so that ``eval_bits_per_byte`` is the CE of
the text targets divided by the UTF-8 bytes they decode to, whatever the tokenizer:

* the byte tokenizer: 1 for the 256 byte ids, 0 for the specials;
* a byte-level BPE (GPT-2 style, ``tokenizers`` with a ``ByteLevel`` decoder): the
  bytes its vocabulary string maps back to through GPT-2's byte-to-character table,
  exact for every id; added (non-special) tokens count their content's UTF-8 bytes;
* other Hugging Face tokenizers: ``<0xNN>`` byte-fallback pieces count 1, a piece
  counts its string with the metaspace ``\u2581`` as one space (WordPiece's ``##``
  dropped);
* SentencePiece: byte pieces 1, control and unknown pieces 0, other pieces their
  string with ``\u2581`` as a space (the dummy-prefix space a decode strips from the
  start of a text is counted: at most one byte per document too many).

Special ids always count 0 bytes, and the eval counts only targets of non-zero bytes
in the numerator too, so EOS separators are left out on both sides.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from moe_jax.data.tokenizer import ByteTokenizer, HfTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = ["token_byte_lengths"]

_METASPACE = "\u2581"


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
  """GPT-2's printable character for each byte, inverted: ``{char: byte}``."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def _piece_bytes(piece: str) -> int:
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    return 1
  return len(piece.replace(_METASPACE, " ").encode("utf-8"))


def _hf_table(tok: HfTokenizer) -> np.ndarray:
  inner = tok._tok  # pylint: disable=protected-access
  spec = json.loads(inner.to_str())
  decoder = spec.get("decoder") or {}
  kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
  byte_level = "ByteLevel" in kinds
  wordpiece = "WordPiece" in kinds
  chars = _byte_level_chars()
  added = inner.get_added_tokens_decoder()
  special = set(tok.special_ids)
  table = np.zeros(tok.vocab_size, np.int32)
  for i in range(tok.vocab_size):
    if i in special:
      continue
    piece = inner.id_to_token(i)
    if piece is None:
      continue
    if i in added:
      table[i] = len(added[i].content.encode("utf-8"))
    elif byte_level:
      table[i] = sum(1 if c in chars else len(c.encode("utf-8")) for c in piece)
    elif wordpiece and piece.startswith("##"):
      table[i] = len(piece[2:].encode("utf-8"))
    else:
      table[i] = _piece_bytes(piece)
  return table


def _spm_table(tok: SentencePieceTokenizer) -> np.ndarray:
  sp = tok._sp  # pylint: disable=protected-access
  special = set(tok.special_ids)
  table = np.zeros(tok.vocab_size, np.int32)
  for i in range(tok.vocab_size):
    if i in special or sp.is_control(i) or sp.is_unknown(i):
      continue
    table[i] = 1 if sp.is_byte(i) else _piece_bytes(sp.id_to_piece(i))
  return table


@functools.lru_cache(maxsize=8)
def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """``int32[V]``: the UTF-8 bytes of original text that each id stands for (0 for
  the special ids). See the module docstring for each tokenizer kind. Cached per
  tokenizer object; do not write to it."""
  if isinstance(tokenizer, ByteTokenizer):
    table = np.zeros(tokenizer.vocab_size, np.int32)
    table[:256] = 1
    return table
  if isinstance(tokenizer, HfTokenizer):
    return _hf_table(tokenizer)
  if isinstance(tokenizer, SentencePieceTokenizer):
    return _spm_table(tokenizer)
  raise TypeError(f"No byte table for {tokenizer!r}.")
