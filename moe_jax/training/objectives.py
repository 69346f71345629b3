"""Training objectives: what a batch of text becomes, what the model sees, what is scored.

Each objective is one :class:`Objective` in :data:`OBJECTIVES`, chosen by
``model.objective``; the training step and the evaluation loop call its hooks and never
ask which one they have.

| ``model.objective`` | attention | inputs | scored targets |
|---|---|---|---|
| ``"causal_lm"`` | causal | the window's first L bytes | the next byte at every position |
| ``"masked_lm"`` | bidirectional | the L bytes, 15% picked and corrupted | the picked bytes only |

Masked LM follows BERT (Devlin et al. 2019, Sec. 3.1 and appendix A.1): of each
sequence's ``n`` real tokens, ``round(0.15 * n)`` (at least 1) are picked uniformly at
random among its bytes, as BERT's ``create_pretraining_data`` picks a fixed count per
sequence (HF's collator draws each token independently instead). Special tokens (PAD,
BOS, EOS, MASK: every id past the 256 bytes) are never picked, as BERT never picks
[CLS] or [SEP]; ``n`` counts them, as BERT's ``len(tokens)`` does, and a sequence with
fewer bytes than the count has all its bytes picked. Of the picked tokens 80% become
the tokenizer's MASK id, 10% a uniformly random byte and 10% stay unchanged, each drawn
independently per token; the loss and the eval loss cover the picked tokens only. The
sequence is the window's targets (``window[1:]``), so eval padding lines up with the
batch's ``weights``.

Masking is a pure function of a key. Training draws it from ``fold_in(key(seed), step)``
(the key of the step's other randomness, see :mod:`moe_jax.training.train`) folded with
:data:`MASK_SALT`, so a resumed run masks exactly as an uninterrupted one; evaluation
draws batch ``i``'s mask from ``fold_in(key(EVAL_MASK_SEED), i)``, so every run, seed and
step scores the same picked tokens of the same eval batches.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EVAL_MASK_SEED", "MASK_SALT", "OBJECTIVES", "Objective", "bert_mask",
           "get_objective", "mask_batch", "pick_counts"]

# BERT's rates: the share of tokens picked, and of those the share masked / randomised.
PICK_RATE = 0.15
MASK_SHARE = 0.8
RANDOM_SHARE = 0.1
NUM_BYTES = 256

# Folded into the step's key for masking; distinct from the model's RNG stream indices.
MASK_SALT = zlib.crc32(b"masked_lm") & 0x7FFFFFFF
EVAL_MASK_SEED = 0


def pick_counts(max_len: int, pick_rate: float = PICK_RATE) -> np.ndarray:
  """i32[max_len + 1]: how many of ``n`` real tokens BERT picks, ``max(1,
  round(pick_rate * n))`` for ``n > 0`` (Python's round: float64, half to even), 0 for
  ``n = 0``."""
  return np.array([max(1, round(pick_rate * n)) if n else 0 for n in range(max_len + 1)],
                  np.int32)


def bert_mask(key: jax.Array, tokens: jax.Array, valid: jax.Array, *, mask_id: int,
              pick_rate: float = PICK_RATE) -> tuple[jax.Array, jax.Array]:
  """BERT's corruption of ``tokens`` i32[B, L]; ``valid`` bool[B, L] marks real tokens.

  Returns ``(inputs i32[B, L], picked bool[B, L])``: ``round(pick_rate * n)`` of each
  row's ``n`` real tokens are picked (at least 1 when ``n > 0``; round half to even, as
  Python's ``round`` in BERT's script), among its real bytes only: special ids (``>=
  256``: PAD, BOS, EOS, MASK) are never picked, and a row with fewer real bytes than
  that count has all of them picked. Each picked token becomes ``mask_id`` with
  probability 0.8, a uniform random byte with probability 0.1, and stays with
  probability 0.1. Padding and special tokens are never changed.
  """
  k_pick, k_kind, k_byte = jax.random.split(key, 3)
  valid = valid.astype(jnp.bool_)
  n = jnp.sum(valid, axis=-1)
  candidate = valid & (tokens >= 0) & (tokens < NUM_BYTES)
  # Python's float64 round, exactly, for every possible n (float32 differs, e.g. at
  # n = 190), looked up since n <= L is static; at most the row's candidates.
  count = jnp.minimum(jnp.asarray(pick_counts(tokens.shape[-1], pick_rate))[n],
                      jnp.sum(candidate, axis=-1))
  # The `count` lowest uniform scores among the candidates: a uniform random subset.
  scores = jnp.where(candidate, jax.random.uniform(k_pick, tokens.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  picked = rank < count[:, None].astype(rank.dtype)
  u = jax.random.uniform(k_kind, tokens.shape)
  random_bytes = jax.random.randint(k_byte, tokens.shape, 0, NUM_BYTES, tokens.dtype)
  inputs = jnp.where(picked & (u < MASK_SHARE), jnp.asarray(mask_id, tokens.dtype),
                     jnp.where(picked & (u < MASK_SHARE + RANDOM_SHARE), random_bytes,
                               tokens))
  return inputs, picked


def mask_batch(batch: dict, key: jax.Array, *, mask_id: int) -> dict:
  """A masked-LM batch from an LM batch (``{"inputs", "targets"[, "weights"]}``).

  The text is ``targets``; its real tokens are those of weight > 0 (all without
  ``weights``). Returns ``inputs`` (corrupted), ``targets`` (the text), ``weights``
  (1.0 on picked tokens: what the loss scores) and ``token_mask`` (the real tokens:
  what attention and the MoE layers see).
  """
  tokens = batch["targets"]
  valid = (batch["weights"] > 0 if "weights" in batch
           else jnp.ones(tokens.shape, jnp.bool_))
  inputs, picked = bert_mask(key, tokens, valid, mask_id=mask_id)
  return {"inputs": inputs, "targets": tokens, "weights": picked.astype(jnp.float32),
          "token_mask": valid}


@dataclasses.dataclass(frozen=True)
class Objective:
  """One entry of :data:`OBJECTIVES`.

  Attributes:
    name: the ``model.objective`` value.
    causal: attention is causal and the model generates left to right (sampling);
      False: bidirectional attention, no sampling.
    noncausal_routing: routers that see the whole group (expert choice, Batch
      Prioritized Routing) are allowed without ``moe.allow_noncausal_routing``.
    mask_token: the model's vocabulary includes the tokenizer's MASK id.
    train_batch: ``(batch, step_key) -> batch``, inside the jitted train step;
      ``step_key`` is the step's key ``fold_in(key(seed), step)``.
    eval_batches: ``batches -> batches``, the eval stream (batch ``i`` masked by its
      index, so every evaluation scores the same tokens).
    description: one line for messages and reports.
  """

  name: str
  causal: bool
  noncausal_routing: bool
  mask_token: bool
  train_batch: Callable[[dict, jax.Array], dict]
  eval_batches: Callable[[Iterable[dict]], Iterator[dict]]
  description: str

  def tokenizer(self):
    """The :class:`~moe_jax.data.ByteTokenizer` whose ids the model embeds."""
    # Imported here: moe_jax.data pulls in TFDS, which config validation does not need.
    from moe_jax.data.tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel
    return ByteTokenizer(mask_token=self.mask_token)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer().vocab_size


def _identity_batch(batch: dict, key: jax.Array) -> dict:
  del key
  return batch


def _identity_stream(batches: Iterable[dict]) -> Iterator[dict]:
  yield from batches


def _mask_id() -> int:
  return OBJECTIVES["masked_lm"].tokenizer().mask_id


def _masked_train_batch(batch: dict, key: jax.Array) -> dict:
  return mask_batch(batch, jax.random.fold_in(key, MASK_SALT), mask_id=_mask_id())


@jax.jit
def _masked_eval_batch(batch: dict, index: jax.Array) -> dict:
  key = jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), index)
  return mask_batch(batch, key, mask_id=_mask_id())


def _masked_eval_batches(batches: Iterable[dict]) -> Iterator[dict]:
  for i, batch in enumerate(batches):
    yield _masked_eval_batch(batch, jnp.asarray(i, jnp.uint32))


OBJECTIVES: dict[str, Objective] = {
    "causal_lm": Objective(
        name="causal_lm", causal=True, noncausal_routing=False, mask_token=False,
        train_batch=_identity_batch, eval_batches=_identity_stream,
        description="causal LM: next-token prediction at every position"),
    "masked_lm": Objective(
        name="masked_lm", causal=False, noncausal_routing=True, mask_token=True,
        train_batch=_masked_train_batch, eval_batches=_masked_eval_batches,
        description="masked LM: bidirectional attention, 15% of the bytes picked "
        "(BERT's 80/10/10 rule), loss on the picked bytes"),
}


def get_objective(config) -> Objective:
  """The objective of an experiment config (``model.objective``; older configs without
  the key are causal LM)."""
  return OBJECTIVES[config.model.get("objective", "causal_lm")]
