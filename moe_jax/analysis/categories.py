"""Per-byte categories of a play script, and how much a category tells about the expert.

Character classes, closed word classes of Early Modern English, script roles and
speakers, plus the (category, expert) count table and its mutual information.
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np


def _as_text(data: str | bytes | np.ndarray | Sequence[int]) -> str:
  """One character per byte (latin-1), so that string indices are token positions."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  if not isinstance(data, bytes):
    ids = np.asarray(data).ravel()
    data = bytes(int(i) if 0 <= i < 256 else 0 for i in ids)
  return data.decode("latin-1")


CHAR_CLASSES = ("vowel", "consonant", "capital", "space", "newline", "punctuation",
                "digit", "other")


def char_labels(data: str | bytes | np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """Character class of each byte: i32[N] indices into :data:`CHAR_CLASSES`.

  ``data`` is text (UTF-8 encoded first) or byte token ids (ids >= 256, the special
  tokens, count as ``other``).
  """
  text = _as_text(data)
  table = {}
  for ch in "aeiouy":
    table[ch] = 0
  for ch in "bcdfghjklmnpqrstvwxz":
    table[ch] = 1
  for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    table[ch] = 2
  table[" "] = 3
  table["\n"] = 4
  for ch in ".,;:!?'\"-()[]&":
    table[ch] = 5
  for ch in "0123456789":
    table[ch] = 6
  labels = np.fromiter((table.get(ch, 7) for ch in text), np.int32, len(text))
  return labels, CHAR_CLASSES


# Closed word classes of Early Modern English, small and by hand; any other word is
# "other word". Each byte of a word gets the word's class; the bytes between words get
# "space" or "punctuation".
WORD_CLASS_LISTS: dict[str, frozenset[str]] = {
    "pronoun": frozenset(
        "i me my mine myself we us our ours you your yours thou thee thy thine ye he "
        "him his himself she her hers it its itself they them their theirs who whom "
        "whose this these that those".split()),
    "article": frozenset("a an the".split()),
    "preposition": frozenset(
        "of to in on at by for with from into upon unto about against before after "
        "under over through between without within among o'er".split()),
    "conjunction": frozenset(
        "and or but nor if than as though although while whilst when where yet so "
        "because since unless till until".split()),
    "auxiliary": frozenset(
        "is am are was were be been being art hath have has had doth do does did "
        "shall shalt will wilt would wouldst should shouldst can canst could couldst "
        "may mayst might must".split()),
    "negation": frozenset("not no nay never none".split()),
}
WORD_CLASSES = tuple(WORD_CLASS_LISTS) + ("other word", "space", "punctuation")
_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def word_class_labels(data: str | bytes | np.ndarray
                      ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Word class of each byte: i32[N] indices into :data:`WORD_CLASSES`.

  Words are runs of letters (with inner apostrophes); their class comes from
  :data:`WORD_CLASS_LISTS`, case-insensitively. Whitespace is ``space``, anything
  else between words is ``punctuation``.
  """
  text = _as_text(data)
  index = {name: i for i, name in enumerate(WORD_CLASSES)}
  labels = np.array([index["space"] if ch.isspace() else index["punctuation"]
                     for ch in text], np.int32)
  for m in _WORD_RE.finditer(text):
    word = m.group(0).lower()
    cls = next((name for name, words in WORD_CLASS_LISTS.items() if word in words),
               "other word")
    labels[m.start():m.end()] = index[cls]
  return labels, WORD_CLASSES


SCRIPT_ROLES = ("speech", "speaker name", "stage direction", "heading", "blank")
_DIRECTION_RE = re.compile(r"^\s*(\[|Enter\b|Exit\b|Exeunt\b|Re-enter\b|Manet\b|"
                           r"Flourish\b|Alarum|Sennet\b|Trumpets?\b|Music\b)")
_HEADING_RE = re.compile(r"^\s*(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b")


_LOWER_NAME_WORDS = frozenset("of the and de la le du to".split())
_DIRECTION_WORD_RE = re.compile(r"\b(Enter|Exit|Exeunt|Re-enter)\b")


def _is_speaker_line(line: str) -> bool:
  """``MACBETH``, ``First Witch``, ``KING HENRY V``, ``Duke of Venice``: short,
  capitalised words, no final punctuation, not a direction or heading."""
  line = line.strip()
  words = line.split()
  return (0 < len(line) <= 40 and len(words) <= 5 and line[-1].isalnum()
          and all(w[0].isupper() or w in _LOWER_NAME_WORDS for w in words)
          and words[0][0].isupper() and not _DIRECTION_RE.match(line)
          and not _HEADING_RE.match(line))


def _is_direction_line(line: str) -> bool:
  return bool(_DIRECTION_RE.match(line) or _DIRECTION_WORD_RE.search(line))


def _script_lines(text: str):
  """(start, end, role, speaker) per line; ``speaker`` is the speech's speaker.

  A speech is a paragraph of two or more lines whose first line is a speaker's name;
  its other lines are speech, except lines that look like directions (``[Aside]``).
  A speech interrupted by a stage direction goes on, without the name, in the next
  paragraph of two or more lines. Other paragraphs are stage directions, except
  ACT/SCENE headings, which also end the current speech.
  """
  lines = []
  start = 0
  for line in text.split("\n"):
    end = min(start + len(line) + 1, len(text))  # with its newline
    lines.append((start, end, line))
    start = end
  out = []
  speaker = None
  i = 0
  while i < len(lines):
    if not lines[i][2].strip():
      out.append((lines[i][0], lines[i][1], "blank", None))
      i += 1
      continue
    j = i
    while j < len(lines) and lines[j][2].strip():
      j += 1
    para = lines[i:j]
    first = para[0][2]
    if _HEADING_RE.match(first):
      speaker, in_speech = None, False
    elif len(para) >= 2 and _is_speaker_line(first):
      speaker, in_speech = first.strip(), True
      out.append((para[0][0], para[0][1], "speaker name", speaker))
      para = para[1:]
    else:  # a speech going on after a direction, or a direction
      in_speech = (speaker is not None and len(para) >= 2
                   and not _is_direction_line(first))
    for s, e, line in para:
      if in_speech:
        role = "stage direction" if _DIRECTION_RE.match(line) else "speech"
      else:
        role = "heading" if _HEADING_RE.match(line) else "stage direction"
      out.append((s, e, role, speaker if in_speech else None))
    i = j
  return out


def script_role_labels(data: str | bytes | np.ndarray
                       ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Role of each byte in the play script: i32[N] indices into :data:`SCRIPT_ROLES`.

  The corpus writes a speech as a paragraph whose first line is the speaker's name
  (``MACBETH``, ``First Witch``); paragraphs that are not speeches are stage
  directions, except ``ACT`` / ``SCENE`` headings. The newline ending a line belongs
  to that line. ``data`` should start at a paragraph boundary (a speech cut off at the
  start would be read as a direction).
  """
  text = _as_text(data)
  index = {name: i for i, name in enumerate(SCRIPT_ROLES)}
  labels = np.full(len(text), index["blank"], np.int32)
  for start, end, role, _ in _script_lines(text):
    labels[start:end] = index[role]
  return labels, SCRIPT_ROLES


def speaker_labels(data: str | bytes | np.ndarray, *, top: int = 8
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Speaker of each byte of speech: i32[N] indices into the returned names.

  The ``top`` speakers with the most bytes of speech get their own label; the other
  speakers share ``"others"``, and bytes that are not speech (names, directions,
  headings, blank lines) get -1.
  """
  text = _as_text(data)
  spans = [(s, e, who) for s, e, role, who in _script_lines(text) if role == "speech"]
  volume = collections.Counter()
  for s, e, who in spans:
    volume[who] += e - s
  names = tuple(who for who, _ in volume.most_common(top))
  index = {who: i for i, who in enumerate(names)}
  others = len(names)
  labels = np.full(len(text), -1, np.int32)
  for s, e, who in spans:
    labels[s:e] = index.get(who, others)
  if len(volume) > len(names):
    names = names + ("others",)
  return labels, names


def token_labels(byte_labels: np.ndarray, ids: np.ndarray | Sequence[int], tokenizer
                 ) -> np.ndarray:
  """Per-token labels of a subword tokenizer's ids, from per-byte labels: i32[T].

  ``byte_labels`` i32[N] labels the UTF-8 bytes of ``tokenizer.decode(ids)`` (e.g.
  ``char_labels(tokenizer.decode(ids))[0]``); each token takes the label of its first
  byte. A token that decodes to nothing (a special id) gets -1, which
  :func:`routing_table` skips. With the byte tokenizer on ASCII text this is
  ``byte_labels`` itself. A token's first byte is found by decoding the ids before it, so inside
  a character split over several tokens (a byte-level tokenizer on non-ASCII text) it
  may be off by the replacement character's bytes.
  """
  byte_labels = np.asarray(byte_labels).ravel()
  ids = np.asarray(ids).ravel()
  out = np.full(ids.size, -1, np.int32)
  if not byte_labels.size:
    return out
  start = 0
  for t in range(ids.size):
    end = len(tokenizer.decode(ids[:t + 1]).encode("utf-8"))
    if end > start:
      out[t] = byte_labels[min(start, byte_labels.size - 1)]
    start = max(start, end)
  return out


def routing_table(labels: np.ndarray, experts: np.ndarray, num_labels: int,
                  num_experts: int, *, weights: np.ndarray | None = None
                  ) -> np.ndarray:
  """Counts of (label, expert) pairs: f64[num_labels, num_experts].

  Args:
    labels: int[...] category per token; negative labels are skipped.
    experts: int[...] expert per token, same shape (e.g. ``LayerRouting.top1``).
    num_labels, num_experts: the table's shape.
    weights: optional per-token weights (e.g. ``~dropped``).

  Divide each row by its sum for "where does category c go", each column by its sum
  for "what does expert e see".
  """
  labels = np.asarray(labels).ravel()
  experts = np.asarray(experts).ravel()
  if labels.shape != experts.shape:
    raise ValueError(f"labels and experts must have the same size, got {labels.size} "
                     f"and {experts.size}.")
  w = np.ones(labels.shape) if weights is None else np.asarray(weights, float).ravel()
  table = np.zeros((num_labels, num_experts))
  ok = labels >= 0
  np.add.at(table, (labels[ok], experts[ok]), w[ok])
  return table


def normalize_rows(table: np.ndarray) -> np.ndarray:
  """Each row divided by its sum (rows of zeros stay zero)."""
  table = np.asarray(table, float)
  sums = table.sum(axis=-1, keepdims=True)
  return np.divide(table, sums, out=np.zeros_like(table), where=sums > 0)


def mutual_information(table: np.ndarray, *, normalize: bool = False) -> float:
  """I(label; expert) in nats from a count table ``[num_labels, num_experts]``.

  With ``normalize`` it is divided by the entropy of the expert marginal H(expert):
  the share of the uncertainty about a token's expert that its label removes (0: the
  label says nothing, 1: it decides the expert).
  """
  p = np.asarray(table, float)
  total = p.sum()
  if total <= 0:
    return 0.0
  p = p / total
  pl = p.sum(axis=1, keepdims=True)
  pe = p.sum(axis=0, keepdims=True)
  nz = p > 0
  mi = float(np.sum(p[nz] * np.log(p[nz] / (pl @ pe)[nz])))
  if not normalize:
    return mi
  pe = pe[pe > 0]
  h = float(-np.sum(pe * np.log(pe)))
  return mi / h if h > 0 else 0.0
