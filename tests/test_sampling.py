"""Sampling frequencies of moe_jax.inference.decode.sample_logits against the
distribution it promises: ``softmax(logits / T)`` cut to the top k, then to the smallest
set whose mass reaches top_p, renormalised.

Each case draws N tokens with fixed keys (one row per draw, vectorised) and requires
every token's frequency within 5 standard deviations of its probability, and tokens
outside the cut never to be drawn. The logits are spread so that T and 1/T give
distributions many deviations apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.inference import decode

LOGITS = np.array([1.5, -0.5, 2.5, 0.0, 1.0, -1.5, 0.6, -3.0], np.float32)
N = 4000
CUTS = [(0, 1.0), (5, 1.0), (0, 0.8), (4, 0.9)]  # (top_k, top_p)


def reference(logits, temperature, top_k, top_p):
  """f64[V]: the probabilities sample_logits must draw from (no ties in LOGITS)."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros(z.size, bool)
  keep[order[:top_k if top_k > 0 else z.size]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    sorted_p = p[order]
    before = np.cumsum(sorted_p) - sorted_p  # mass ranked above each token
    nucleus = np.zeros(z.size, bool)
    nucleus[order[(before < top_p) & (sorted_p > 0)]] = True
    nucleus[order[0]] = True
    p = np.where(nucleus, p, 0.0)
    p /= p.sum()
  return p


def frequencies(temperature, top_k, top_p, seed):
  keys = jax.random.split(jax.random.key(seed), N)
  rows = jnp.broadcast_to(jnp.asarray(LOGITS), (N, LOGITS.size))
  # One row per draw: categorical draws each row independently from one key, and
  # vmapping over keys gives N independent keys as well.
  tokens = jax.jit(jax.vmap(lambda key, row: decode.sample_logits(
      row[None], key, temperature, top_k, top_p)[0]))(keys, rows)
  return np.bincount(np.asarray(tokens), minlength=LOGITS.size) / N


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("top_k,top_p", CUTS)
def test_sampling_frequencies_match_the_cut_distribution(temperature, top_k, top_p):
  p = reference(LOGITS, temperature, top_k, top_p)
  freq = frequencies(np.float32(temperature), np.int32(top_k), np.float32(top_p),
                     seed=int(temperature * 10) + 100 * top_k + int(top_p * 10))
  assert np.all(freq[p == 0] == 0), (freq, p)
  bound = 5 * np.sqrt(p * (1 - p) / N)
  assert np.all(np.abs(freq - p) <= bound + 1e-12), (freq, p, bound)


def test_temperature_and_its_inverse_are_far_apart():
  """The cases above can tell T from 1/T (a temperature that multiplies instead of
  dividing): for each cut, some token's probabilities at T = 0.5 and T = 2 differ by
  more than 10 of the bound's deviations."""
  for k, p in CUTS:
    pa, pb = reference(LOGITS, 0.5, k, p), reference(LOGITS, 2.0, k, p)
    sigma = np.sqrt(np.maximum(pa * (1 - pa), pb * (1 - pb)) / N)
    assert np.max(np.abs(pa - pb) / np.maximum(sigma, 1e-12)) > 10, (k, p)


def test_the_reference_by_hand():
  # probs 0.4, 0.3, 0.2, 0.1 at T = 1: top_p 0.5 keeps the first two (mass above
  # the second is 0.4 < 0.5, above the third 0.7), renormalised to 4/7, 3/7.
  logits = np.log([0.3, 0.4, 0.1, 0.2])
  np.testing.assert_allclose(reference(logits, 1.0, 0, 0.5), [3 / 7, 4 / 7, 0, 0])
  np.testing.assert_allclose(reference(logits, 1.0, 3, 1.0), [1 / 3, 4 / 9, 0, 2 / 9])
  # T = 2 takes square roots of the probabilities before renormalising.
  sq = np.sqrt([0.3, 0.4, 0.1, 0.2])
  np.testing.assert_allclose(reference(logits, 2.0, 0, 1.0), sq / sq.sum())
