"""Expert dropout (``moe.expert_dropout``) on one device and on a mesh.

The layer is built so that the mask can be read off its output: every expert is the
identity (``wi = wo = I``, M = H, relu) and the inputs are positive, so a top-1 token's
output is ``g * x`` in evaluation and ``g * x * mask / (1 - p)`` in training (the
routing is the same: no jitter, and C = S in both). The ratio of the two is therefore
the mask over the token's hidden units, scaled: exactly 0 or 1 / (1 - p).

Every batch row holds the same tokens, so rows (groups, devices) that drew the same
mask would give the same output.
"""

import numpy as np
import pytest
from flax import nnx

from moe_jax.parallel import sharding
from moe_jax.models import param_sharding
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.layers.moe_layer import MoeLayer

P_DROP = 0.3
M, E, B, L = 16, 8, 8, 16  # one group of 16 tokens per batch row


def identity_layer(dispatch, mesh=None):
  cfg = MoeConfig(d_model=M, d_ff=M, num_experts=E, top_k=1, group_size=L,
                  dispatch=dispatch, activation="relu", expert_dropout=P_DROP,
                  capacity_factor=float(E), eval_capacity_factor=float(E),
                  init_scale=0.1, router_init_scale=0.1,
                  # Dropless with the worst-case buffer: nothing dropped, as indices.
                  **({"ragged_buffer_factor": -1.0} if dispatch == "dropless" else {}))
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  eye = np.broadcast_to(np.eye(M, dtype=np.float32), (E, M, M))
  layer.experts.wi[...] = eye
  layer.experts.wo[...] = eye
  layer.router.kernel[...] = np.random.default_rng(1).normal(size=(M, E)).astype(
      np.float32)
  return layer if mesh is None else param_sharding.shard_model(layer, mesh)


_call = nnx.jit(lambda layer, x, det: layer(x, deterministic=det)[0], static_argnums=2)


def masks(layer, mesh=None):
  """(ratio f32[B, L, M] of training to evaluation output, y_eval)."""
  row = np.random.default_rng(2).uniform(0.5, 1.5, size=(L, M)).astype(np.float32)
  x = np.broadcast_to(row, (B, L, M)).copy()
  if mesh is not None:
    x = sharding.shard_batch({"x": x}, mesh)["x"]
  y_eval = np.asarray(_call(layer, x, True))
  y_train = np.asarray(_call(layer, x, False))
  # Evaluation is the identity expert times the top-1 gate, the largest softmax
  # probability of x @ kernel: no unit dropped, nothing rescaled.
  logits = row.astype(np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  gate = (probs / probs.sum(-1, keepdims=True)).max(-1)  # [L]
  np.testing.assert_allclose(y_eval, np.broadcast_to(gate[:, None] * row, x.shape),
                             rtol=1e-5)
  return y_train / y_eval, y_eval


def check_masks(ratio):
  dropped = ratio == 0
  # Survivors are scaled by exactly 1 / (1 - p).
  np.testing.assert_allclose(ratio[~dropped], 1 / (1 - P_DROP), rtol=1e-5)
  # The dropped share is p within 5 standard deviations (B*L*M = 2048 units).
  n = dropped.size
  assert abs(dropped.mean() - P_DROP) < 5 * np.sqrt(P_DROP * (1 - P_DROP) / n)
  # Rows with the same tokens drew different masks: independent masks agree on
  # p^2 + (1-p)^2 = 58% of 256 units (sd 3%); the same mask would agree on all.
  rows = dropped.reshape(B, L * M)
  for a in range(B):
    for b in range(a + 1, B):
      assert np.mean(rows[a] == rows[b]) < 0.8, (a, b)
  # Units of one token differ too (not one coin per token).
  assert 0 < dropped.reshape(B * L, M).mean(axis=1).std()


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "dropless"])
def test_expert_dropout_on_one_device(dispatch):
  ratio, _ = masks(identity_layer(dispatch))
  check_masks(ratio)


@pytest.mark.parametrize("dispatch", ["indices", "dropless"])
def test_expert_dropout_on_a_data_x_expert_mesh(dispatch):
  # 2 x 4 mesh: batch row i (one group) on device i, experts 2x, 2x+1 on expert shard
  # x. Dropless folds each device's mesh position into the key: without it, the two
  # data replicas of an expert shard receive the same rows and would draw the same
  # mask, so rows i and i + 4 would agree everywhere.
  mesh = sharding.make_mesh(2, 4)
  ratio, y_eval = masks(identity_layer(dispatch, mesh), mesh)
  check_masks(ratio)
  # Evaluation on the mesh is the evaluation of one device.
  _, y_single = masks(identity_layer(dispatch))
  np.testing.assert_allclose(y_eval, y_single, rtol=1e-6, atol=0)


def test_evaluation_ignores_the_rate():
  x = np.random.default_rng(3).uniform(0.5, 1.5, size=(2, L, M)).astype(np.float32)
  with_rate = identity_layer("dropless")
  cfg = MoeConfig(**{**with_rate.cfg.__dict__, "expert_dropout": 0.0})
  without = MoeLayer(cfg, rngs=nnx.Rngs(0))
  nnx.update(without, nnx.state(with_rate, nnx.Param))
  np.testing.assert_array_equal(np.asarray(_call(with_rate, x, True)),
                                np.asarray(_call(without, x, True)))
  # And two evaluation calls are the same (no mask drawn).
  np.testing.assert_array_equal(np.asarray(_call(with_rate, x, True)),
                                np.asarray(_call(with_rate, x, True)))
