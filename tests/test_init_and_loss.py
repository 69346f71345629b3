"""Init scales reach exactly the weights they name; sum vs mean of the per-layer losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.training import build, run_state, train
from moe_jax.training.config import default_config, set_keys


def _config(**overrides):
  c = default_config()
  c.batch_size, c.data.seq_len, c.seed = 2, 8, 0
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 4, 16, 2, 32
  c.model.moe_every = 2  # MoE blocks 1 and 3
  c.model.position = "learned"  # so the positions table exists too
  c.moe.num_experts = 4
  c.grad_clip = 0.0
  set_keys(c, overrides)
  return c


def _params(config) -> dict[str, np.ndarray]:
  model = build.make_model(config)
  flat = nnx.state(model, nnx.Param).flat_state()
  return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def _kind(name: str) -> str:
  if "/router/" in name:
    return "router"
  if "/experts/" in name:
    return "experts"
  if name.endswith("scale") and "norm" in name:
    return "norm"
  return "model"


@pytest.mark.parametrize("key,scaled", [
    ("model.init_scale", {"model", "experts", "router"}),  # the whole model
    ("moe.init_scale", {"experts"}),
    ("moe.router_init_scale", {"router"}),
])
def test_each_init_scale_reaches_exactly_the_weights_it_names(key, scaled):
  # Variance x4 is std x2, drawn from the same keys: each named weight is exactly twice
  # the base draw, every other weight is unchanged (norm gains always start at 1).
  base_config = _config()
  base = _params(base_config)
  node = base_config
  for part in key.split("."):
    node = node[part]
  value = 4.0 * node  # four times the default, whatever the default is
  got = _params(_config(**{key: value}))
  assert set(got) == set(base)
  kinds = {_kind(n) for n in base}
  assert kinds == {"model", "experts", "router", "norm"}
  for name in base:
    factor = 2.0 if _kind(name) in scaled else 1.0
    np.testing.assert_allclose(got[name], factor * base[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  # "model" covers attention, dense FFNs, embedding, positions and the output layer.
  names = [n for n in base if _kind(n) == "model"]
  for part in ("embedding", "positions", "unembed", "attn", "ffn/wi"):
    assert any(part in n for n in names), (part, names)


def test_moe_scales_are_relative_to_the_model_scale():
  c = _config(**{"model.init_scale": 0.1, "moe.init_scale": 1.0,
                 "moe.router_init_scale": 0.5})
  moe = build.moe_config(c)
  assert (moe.model_init_scale, moe.init_scale, moe.router_init_scale) == (0.1, 1.0, 0.5)
  # The layer draws its experts at 0.1 * 1.0 and its router at 0.1 * 0.5.
  layer = MoeLayer(moe, rngs=nnx.Rngs(0))
  router = MoeLayer(dataclasses.replace(moe, model_init_scale=1.0, init_scale=0.1,
                                        router_init_scale=0.05), rngs=nnx.Rngs(0))
  assert jnp.array_equal(layer.router.kernel.value, router.router.kernel.value)
  assert jnp.array_equal(layer.experts.wo.value, router.experts.wo.value)


def _grads(config):
  """The update of one plain-SGD step (lr 1): minus the gradient of the loss."""
  model = build.make_model(config)
  tx = optax.sgd(1.0)
  _, params, _ = run_state.split_model(model)
  state = run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (2, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  before = jax.tree.map(np.asarray, params)  # the step donates the state
  new, metrics = train.make_train_step(model, tx, config)(state, batch)
  step = jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, before)
  return jax.tree.leaves(step), jax.device_get(metrics)


def test_sum_reduction_is_the_mean_times_the_number_of_moe_blocks():
  # Two MoE blocks: loss = CE + c_aux * (aux_1 + aux_2) + c_z * (z_1 + z_2) for "sum",
  # CE + c_aux * (aux_1 + aux_2) / 2 + ... for "mean". So the MoE part of the gradient
  # under "sum" is exactly twice that under "mean", and "sum" equals "mean" with both
  # coefficients doubled.
  coefs = {"moe.aux_loss_coef": 0.5, "moe.z_loss_coef": 0.05}
  ce_only, m0 = _grads(_config(**{"moe.aux_loss_coef": 0.0, "moe.z_loss_coef": 0.0}))
  summed, m_sum = _grads(_config(**coefs, **{"moe.loss_reduction": "sum"}))
  mean, m_mean = _grads(_config(**coefs, **{"moe.loss_reduction": "mean"}))
  doubled, _ = _grads(_config(**{"moe.aux_loss_coef": 1.0, "moe.z_loss_coef": 0.1,
                                 "moe.loss_reduction": "mean"}))
  moe_part_sum = [s - c for s, c in zip(summed, ce_only)]
  moe_part_mean = [m - c for m, c in zip(mean, ce_only)]
  assert max(np.abs(p).max() for p in moe_part_mean) > 1e-6  # the test has teeth
  for s, m in zip(moe_part_sum, moe_part_mean):
    np.testing.assert_allclose(s, 2 * m, rtol=1e-3, atol=2e-7)  # float32 cancellation
  for s, d in zip(summed, doubled):
    np.testing.assert_allclose(s, d, rtol=1e-5, atol=1e-8)
  # The reported losses are the unscaled layer means whatever the reduction.
  for key in ("loss", "aux_loss", "z_loss"):
    assert m_sum[key] == pytest.approx(m_mean[key]) == pytest.approx(m0[key])
