"""Cached decoding up to the last cache slot and across a window slide, against the
full forward pass (moe_jax.inference.decode).

tests/test_decode.py compares rows of at most 13 tokens with a cache of 24, so the last
slots are never written there. Here rows fill the cache exactly (``max_len`` tokens,
the last one at slot ``max_len - 1``) and then slide; every logit is compared with a
full forward pass of the tokens the row holds, and greedy generation with a window
that slides is compared with a host loop over full forward passes.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.inference import decode
from tests.test_decode import MODELS, make_model

MAX_LEN = 8


@functools.lru_cache(maxsize=None)
def _model(name):
  return make_model(MODELS[name])


@functools.lru_cache(maxsize=None)
def _full_forward(model):
  """f32[V] logits at column ``last`` of one right-padded row of ``MAX_LEN`` tokens
  (causal, and the TINY models drop no token, so the padding changes nothing)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_at(tokens, last):
    logits, _ = nnx.merge(graphdef, state)(tokens[None], deterministic=True)
    return logits[0, last]

  def fn(row):
    assert 1 <= len(row) <= MAX_LEN
    buf = np.zeros(MAX_LEN, np.int32)
    buf[:len(row)] = row
    return np.asarray(logits_at(buf, len(row) - 1))

  return fn


def _rows_logits(model, row):
  """f32[len(row), V]: the full forward pass's logits at every position of ``row``."""
  full = _full_forward(model)
  return np.stack([full(row[:i + 1]) for i in range(len(row))])


@pytest.mark.parametrize("name", ["dense", "top2"])
def test_teacher_forcing_to_the_last_slot_and_across_a_slide(name):
  model = _model(name)
  full = _full_forward(model)
  # Row 0: a 3-token prompt and 5 forced tokens fill all 8 slots, the last at
  # position 7. Row 1: 1 + 5 tokens, so it is still at position 6 when row 0 slides.
  prompts = [[5, 6, 7], [9]]
  forced = [[1, 2, 3, 4, 40], [11, 12, 13, 14, 15]]
  decoder = decode.Decoder(model, batch_size=2, max_len=MAX_LEN, prefill_len=3)
  logits, _ = decoder.prefill(prompts, all_logits=True)
  logits = np.asarray(logits)
  for b, prompt in enumerate(prompts):
    np.testing.assert_allclose(logits[b, :len(prompt)],
                               _rows_logits(model, prompt), atol=1e-5, rtol=0)
  rows = [list(p) for p in prompts]
  for t in range(5):
    step, _, _ = decoder.step(np.array([f[t] for f in forced]))
    for b in range(2):
      rows[b].append(forced[b][t])
      np.testing.assert_allclose(np.asarray(step[b]), full(rows[b]), atol=1e-5, rtol=0,
                                 err_msg=f"row {b} at position {len(rows[b]) - 1}")
  assert len(rows[0]) == MAX_LEN  # the step above wrote the last slot
  # Row 0 is full: it alone is re-prefilled from its last 3 tokens (as generate does
  # with min(prefill_len, max_len // 2) = 3) at positions 0-2, and both rows step on.
  # Row 0's logits are now those of a fresh prefill of the kept tokens; row 1 (not
  # reset) keeps its own cache and reaches its last slot too.
  kept = rows[0][-3:]
  slide = np.array([True, False])
  logits, _ = decoder.prefill([kept, None], all_logits=True, rows=slide)
  np.testing.assert_allclose(np.asarray(logits)[0, :3], _rows_logits(model, kept),
                             atol=1e-5, rtol=0)
  rows[0] = list(kept)
  for t, tokens in enumerate([[21, 16], [22, 17]]):
    step, _, _ = decoder.step(np.array(tokens))
    for b in range(2):
      rows[b].append(tokens[b])
      np.testing.assert_allclose(np.asarray(step[b]), full(rows[b]), atol=1e-5, rtol=0,
                                 err_msg=f"after the slide, row {b}, step {t}")
  assert len(rows[1]) == MAX_LEN


def test_a_full_prompt_prefills_every_slot():
  model = _model("top2")
  prompt = [3, 1, 4, 1, 5, 9, 2, 6]  # max_len tokens: prefill writes slot 7
  decoder = decode.Decoder(model, batch_size=1, max_len=MAX_LEN)
  logits, _ = decoder.prefill([prompt], all_logits=True)
  np.testing.assert_allclose(np.asarray(logits)[0], _rows_logits(model, prompt),
                             atol=1e-5, rtol=0)


def _greedy_reference(model, prompt, n, keep):
  """Greedy tokens from full forward passes over the row as generate keeps it: a row
  whose next token would sit at position ``MAX_LEN`` restarts from its last ``keep``
  tokens. Also returns the smallest gap between the two largest logits (the argmax
  must not be a near-tie for the comparison to be meaningful)."""
  full = _full_forward(model)
  row, out, margin = list(prompt), [], np.inf
  for _ in range(n):
    logits = full(row)
    top2 = np.sort(logits)[-2:]
    margin = min(margin, top2[1] - top2[0])
    token = int(np.argmax(logits))
    out.append(token)
    row.append(token)
    if len(row) > MAX_LEN:
      row = row[-keep:]
  return out, margin


def test_greedy_generation_across_slides_equals_full_forward_passes():
  # Replaces a test that compared the decoder with itself: the reference here never
  # touches the cache. max_len 8 with prefill_len 8 keeps min(8, 8 // 2) = 4 tokens
  # at a slide; 14 new tokens after a 6-token prompt slide three times.
  model = _model("top2")
  prompt, other = [3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8, 1]
  expected, margin = _greedy_reference(model, prompt, 14, keep=4)
  expected_other, margin_other = _greedy_reference(model, other, 14, keep=4)
  assert min(margin, margin_other) > 1e-3  # no near-tie: cached logits agree to 1e-5
  decoder = decode.Decoder(model, batch_size=1, max_len=MAX_LEN)
  assert decoder.generate([prompt], 14, temperature=0.0)[0] == expected
  # Rows slide on their own: next to a longer prompt (which slides earlier), each row
  # still decodes as the reference does alone.
  batched = decode.Decoder(model, batch_size=2, max_len=MAX_LEN)
  assert batched.generate([other, prompt], 14, temperature=0.0) == [expected_other,
                                                                     expected]
