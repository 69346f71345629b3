"""LoRA against weights built by hand (moe_jax/layers/lora_adapters.py,
moe_jax/peft/lora.py).

For every target shape (attention's query/key/value ``[M, N, D]`` and out
``[N, D, M]``, the router ``[M, E]``, the stacked experts ``[E, M, H]``/``[E, H, M]``,
the shared experts and the dense FFN) the adapted weight is computed in numpy from
the raw factors as ``W + (alpha / r) * reshape(A @ B, W.shape)``, without going
through :func:`moe_jax.layers.lora_adapters.weight`, and loaded into a model without
adapters; the two models' logits must agree.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import lora_adapters
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.peft import lora as peft_lora
from moe_jax.models.transformer import Transformer
from moe_jax.models.model_config import TransformerConfig

ALL_TARGETS = ("router", "experts", "shared_experts", "attention", "dense_ffn")
M, H, E, HS, V = 32, 24, 4, 48, 40
RANK, ALPHA = 4, 6.0  # scale 1.5: neither 1 nor alpha


def tiny_model(dispatch):
  """Block 0: attention + dense FFN; block 1: attention + MoE (top-2 of 4 SwiGLU
  experts and a shared expert); C = S at evaluation, so nothing is dropped."""
  moe = MoeConfig(d_model=M, d_ff=H, num_experts=E, top_k=2, group_size=16,
                  dispatch=dispatch, num_shared_experts=1, activation="swiglu",
                  eval_capacity_factor=float(E),
                  capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
  cfg = TransformerConfig(vocab_size=V, num_layers=2, d_model=M, num_heads=2,
                          d_ff=HS, moe_every=2, moe=moe, activation="swiglu")
  return Transformer(cfg, rngs=nnx.Rngs(0))


def adapted_model(dispatch):
  model = tiny_model(dispatch)
  assert peft_lora.add_lora(model, ALL_TARGETS, rank=RANK, alpha=ALPHA) == 18
  key = jax.random.key(7)
  for i, (_, _, _, ad) in enumerate(lora_adapters.adapters(model)):
    b = ad.lora_b
    b.set_value(0.5 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype))
  return model


def hand_merged(adapted, dispatch):
  """A model without adapters holding ``W + (alpha / r) * reshape(A @ B)`` in numpy,
  and the shapes of the weights it changed."""
  plain = tiny_model(dispatch)
  owners = dict(nnx.iter_graph(plain))
  shapes = set()
  for path, owner, name, ad in lora_adapters.adapters(adapted):
    w = np.asarray(getattr(owner, name)[...], np.float64)
    a = np.asarray(ad.lora_a[...], np.float64)  # [*batch, K, r]
    b = np.asarray(ad.lora_b[...], np.float64)  # [*batch, r, N]
    assert a.shape[-1] == RANK and b.shape[-2] == RANK
    merged = w + (ALPHA / RANK) * np.matmul(a, b).reshape(w.shape)
    target = getattr(owners[path], name)
    np.testing.assert_array_equal(np.asarray(target[...]), w)  # same base weights
    target.set_value(merged.astype(np.float32))
    shapes.add((type(owner).__name__, name, w.shape))
  return plain, shapes


@nnx.jit
def _logits(model, tokens):
  return model(tokens, deterministic=True)[0]


def logits_of(model, tokens):
  return np.asarray(_logits(model, tokens))


@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_adapted_logits_equal_a_model_with_hand_merged_weights(dispatch):
  adapted = adapted_model(dispatch)
  plain, shapes = hand_merged(adapted, dispatch)
  nh, hd = 2, M // 2
  assert shapes == {
      ("Attention", "query", (M, nh, hd)), ("Attention", "key", (M, nh, hd)),
      ("Attention", "value", (M, nh, hd)), ("Attention", "out", (nh, hd, M)),
      ("Router", "kernel", (M, E)),
      ("Experts", "wi", (E, M, H)), ("Experts", "wi_gate", (E, M, H)),
      ("Experts", "wo", (E, H, M)),
      ("DenseFfn", "wi", (M, H)), ("DenseFfn", "wi_gate", (M, H)),
      ("DenseFfn", "wo", (H, M)),  # the shared expert (width 1 * H)
      ("DenseFfn", "wi", (M, HS)), ("DenseFfn", "wi_gate", (M, HS)),
      ("DenseFfn", "wo", (HS, M)),  # block 0's dense FFN
  }
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V)
  got, want = logits_of(adapted, tokens), logits_of(plain, tokens)
  base = logits_of(tiny_model(dispatch), tokens)
  assert np.max(np.abs(want - base)) > 0.1  # the adapters change the outputs
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_each_target_alone_matches_its_hand_merged_weights():
  """One target at a time, so an error in one shape cannot hide behind another's
  larger update."""
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, V)
  base = logits_of(tiny_model("indices"), tokens)
  for target in ALL_TARGETS:
    adapted = tiny_model("indices")
    peft_lora.add_lora(adapted, (target,), rank=RANK, alpha=ALPHA)
    for i, (_, _, _, ad) in enumerate(lora_adapters.adapters(adapted)):
      b = ad.lora_b
      b.set_value(0.5 * jax.random.normal(jax.random.key(10 + i), b.shape, b.dtype))
    plain, _ = hand_merged(adapted, "indices")
    got, want = logits_of(adapted, tokens), logits_of(plain, tokens)
    assert np.max(np.abs(want - base)) > 1e-3, target
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=target)

