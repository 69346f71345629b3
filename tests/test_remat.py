"""``model.remat``: every block recomputed in the backward pass ("full") or keeping only
its matmuls without batch dimensions ("dots") trains exactly as keeping everything
("none"), random draws included, and keeps less for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.training import build, run_state, train
from moe_jax.errors import ConfigError
from moe_jax.training.config import check_config
from moe_jax.training.losses import training_loss
from tests.test_train import _zoo_config, tiny_config

REMATS = ("none", "full", "dots")
# Every random draw of a training step: Switch jitter, dropout on both branches,
# expert dropout and GShard's random second expert (the "routing" stream).
NOISE = {"moe.jitter_noise": 0.1, "model.dropout": 0.1, "moe.expert_dropout": 0.1,
         "moe.top_k": 2, "moe.second_policy": "random"}
STEPS = 12


def _config(name, remat):
  if name == "switch":
    return tiny_config(**NOISE, **{"model.remat": remat, "sample.length": 0})
  if name == "jamba":  # block 0 attention with a dense FFN, block 1 Mamba with MoE
    return _zoo_config("jamba_small", **{
        "model.attn_layer_period": 2, "model.attn_layer_offset": 0,
        "mamba.chunk_size": 8, "model.remat": remat, "model.dropout": 0.1,
        "moe.jitter_noise": 0.1})
  # Mixture-of-Depths: block 1 is routed and holds the MoE layer.
  return _zoo_config("mod_small", **{"model.remat": remat, "model.moe_every": 2,
                                     "moe.group_size": 0, "model.mod_capacity": 0.25,
                                     "model.dropout": 0.1, "moe.jitter_noise": 0.1})


def _batches(config, steps):
  rng = np.random.default_rng(0)
  for _ in range(steps):
    t = rng.integers(0, 256, (config.batch_size, config.data.seq_len + 1), np.int32)
    yield {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])}


def _run(config, steps=STEPS):
  """``(f32[steps, 2] loss and aux loss per step, final state)`` on one device."""
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  state, _ = train.init_train_state(model, tx, None, config.seed)
  step = train.make_train_step(model, tx, config)
  out = []
  for batch in _batches(config, steps):
    state, metrics = step(state, batch)
    out.append((float(metrics["loss"]), float(metrics["aux_loss"])))
  return np.array(out), state


def _losses(config, steps=STEPS):
  return _run(config, steps)[0]


def _loss_fn(config):
  """The differentiated training loss of ``config``'s model at its initial params."""
  model = build.make_model(config)
  graphdef, params, rest = run_state.split_model(model)
  loss = training_loss(config)
  batch = next(_batches(config, 1))

  def f(p):
    m = run_state.merge_model(graphdef, p, rest, None)
    run_state.reseed(m, jax.random.key(3))
    return loss(m, batch)[0]

  return f, params


@pytest.mark.parametrize("name", ["switch", "jamba", "mod"])
def test_remat_trains_as_without_it_random_draws_included(name):
  """``"full"`` over 12 steps; ``"dots"`` goes through the same ``nnx.remat`` (the
  policy differs), and its gradients are checked below."""
  want = _losses(_config(name, "none"))
  assert np.all(np.isfinite(want)) and np.all(want[:, 1] > 0)
  np.testing.assert_allclose(_losses(_config(name, "full")), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["switch", "jamba", "mod"])
def test_remat_gives_the_same_gradients(name):
  grads = {}
  for remat in REMATS:
    f, params = _loss_fn(_config(name, remat))
    grads[remat] = jax.jit(jax.value_and_grad(f))(params)
  for remat in ("full", "dots"):
    assert float(grads[remat][0]) == pytest.approx(float(grads["none"][0]), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads[remat][1], grads["none"][1])


def _residual_bytes(config):
  """Bytes the backward pass keeps from the forward pass: the residuals in
  ``jax.vjp``'s closure (traced, shapes only)."""
  f, params = _loss_fn(config)
  leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(f, p)[1]), params)
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def test_remat_keeps_less_for_the_backward_pass():
  """A deterministic property of the differentiated program (not of a backend's
  schedule): "full" keeps each block's input only, "dots" also its projections'
  outputs, "none" every intermediate (attention probabilities included)."""
  size = {"model.num_layers": 4, "data.seq_len": 64, "moe.group_size": 0}
  got = {r: _residual_bytes(tiny_config(**size, **{"model.remat": r})) for r in REMATS}
  assert got["full"] < got["dots"] < got["none"]
  assert got["full"] < 0.25 * got["none"], got
  # The rematerialised step is a different program: every block is recomputed.
  f_none, params = _loss_fn(tiny_config(**size))
  f_full, _ = _loss_fn(tiny_config(**size, **{"model.remat": "full"}))
  count = lambda f: str(jax.make_jaxpr(jax.grad(f))(params)).count("remat")  # noqa
  assert count(f_none) == 0 and count(f_full) == 4
  # ... and the recomputation survives compilation: the compiled gradient has more
  # matmuls (XLA:CPU's temporary memory does not drop, see docs/benchmarks.md).
  dots = lambda f: jax.jit(jax.grad(f)).lower(params).compile().as_text().count(  # noqa
      " dot(")
  assert dots(f_full) > dots(f_none)


def test_remat_key_is_validated():
  config = tiny_config(**{"model.remat": "everything"})
  with pytest.raises(ConfigError, match=r"model.remat='everything' is unknown; use "
                     r"'none', 'full'"):
    check_config(config, num_devices=1)
  for remat in REMATS:
    check_config(tiny_config(**{"model.remat": remat}), num_devices=1)
