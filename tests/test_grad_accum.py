"""``grad_accum_steps``: the global batch in microbatches, one optimizer update.

With per-group balance statistics the accumulated step is the full-batch step (float
tolerance); with ``moe.balance_scope="batch"`` each microbatch pools its own tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import param_sharding
from moe_jax.parallel import sharding
from moe_jax.training import build, train
from moe_jax.errors import ConfigError
from moe_jax.training.config import check_config
from moe_jax.training.losses import training_loss
from tests.test_train import _zoo_config, tiny_config

STEPS = 5
# No random draws (tiny_config has no jitter or dropout): microbatch j draws from
# fold_in(step key, j), so with noise the two steps would draw differently.
CONFIGS = {
    # Switch, per-group balance loss, groups of two sequences (64 tokens).
    "switch": {},
    # DeepSeek-V3 routing with a fast-moving selection bias.
    "deepseek": {"moe.top_k": 2, "moe.score_fn": "sigmoid", "moe.z_loss_coef": 0.0,
                 "moe.bias_update_rate": 0.01, "moe.balance_choices": "all",
                 "moe.group_size": 32},
    # Expert choice on padded batches: its experts_per_token (a mean over valid tokens)
    # weighs the microbatches by their real tokens (metric_schema); one group of 64
    # tokens per microbatch.
    "expert_choice": {"moe.router": "expert_choice", "moe.capacity_factor": 1.3,
                      "moe.allow_noncausal_routing": True},
    # Masked LM: each microbatch has its own count of picked (scored) tokens.
    "masked_lm": {"model.objective": "masked_lm"},
}
# Batches with padding (rows of 8 to 32 real tokens), so the microbatches score
# different numbers of tokens.
PADDED = ("masked_lm", "padded", "expert_choice")
CONFIGS["padded"] = {}


def _batches(config, steps, padded=False):
  rng = np.random.default_rng(0)
  rows, length = config.batch_size, config.data.seq_len
  for _ in range(steps):
    t = rng.integers(0, 256, (rows, length + 1), np.int32)
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:]}
    if padded:
      real = rng.integers(8, length + 1, (rows, 1))
      batch["weights"] = (np.arange(length)[None] < real).astype(np.float32)
    yield batch


def _run(config, steps=STEPS, mesh=None, padded=False):
  """(metrics per step, final state) of ``steps`` train steps on fixed batches."""
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  if mesh is None:
    state, _ = train.init_train_state(model, tx, None, config.seed)
    step = train.make_train_step(model, tx, config)
    put = lambda b: jax.tree.map(jnp.asarray, b)  # noqa: E731
  else:
    param_sharding.shard_model(model, mesh)
    state, state_sharding = train.init_train_state(model, tx, mesh, config.seed)
    step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
    put = lambda b: sharding.shard_batch(b, mesh)  # noqa: E731
  metrics = []
  for batch in _batches(config, steps, padded):
    state, m = step(state, put(batch))
    metrics.append(jax.tree.map(np.asarray, m))
  return metrics, state


def _assert_same_run(a, b, atol=1e-5):
  (ma, sa), (mb, sb) = a, b
  for step, (x, y) in enumerate(zip(ma, mb)):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_allclose(y[k], x[k], rtol=0, atol=atol, err_msg=f"{k} {step}")
  # Adam's update divides by sqrt(v): parameters move by the learning rate even
  # where the gradients are tiny, so rounding differences show relative to the value.
  jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=atol, atol=atol),
               sa.params, sb.params)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_accumulated_steps_equal_full_batch_steps(name):
  base = {"batch_size": 8, "sample.length": 0, **CONFIGS[name]}
  padded = name in PADDED
  full = _run(tiny_config(**base), padded=padded)
  accumulated = _run(tiny_config(**base, grad_accum_steps=4), padded=padded)
  _assert_same_run(full, accumulated)
  if name == "deepseek":
    # Bit for bit: the update is rate * sign(mean(c) - c), and the choice counts are
    # whole numbers, which float32 sums exactly in any order (microbatches or not),
    # as long as every token routes alike.
    bias = [s.model_state["blocks"][1]["ffn"]["selection_bias"]
            for s in (full[1], accumulated[1])]
    assert np.any(np.asarray(bias[0]) != 0)
    assert np.asarray(bias[0]).tobytes() == np.asarray(bias[1]).tobytes()


def test_accumulated_mixture_of_depths_equals_full_batch():
  make = lambda **kw: _zoo_config("mod_small", **{  # noqa: E731
      "model.moe_every": 2, "moe.group_size": 0, "model.mod_capacity": 0.25,
      "batch_size": 8, **kw})
  _assert_same_run(_run(make()), _run(make(grad_accum_steps=4)))


def test_accumulated_steps_equal_full_batch_steps_on_a_mesh():
  # data=2 x expert=4: 32 rows, 4 per device, 1 per device in each of 4 microbatches;
  # one routing group per sequence, 4 experts over the 4 expert shards.
  base = {"batch_size": 32, "moe.group_size": 32, "sample.length": 0,
          "mesh.data": 2, "mesh.expert": 4}
  mesh = sharding.make_mesh(2, 4, 1)
  full = _run(tiny_config(**base), steps=3, mesh=mesh)
  accumulated = _run(tiny_config(**base, grad_accum_steps=4), steps=3, mesh=mesh)
  _assert_same_run(full, accumulated)


def test_batch_scope_pools_each_microbatch_on_its_own():
  """moe.balance_scope="batch" under accumulation: the step's aux loss is the mean of
  the microbatches' pooled losses, not the loss pooled over the global batch."""
  config = tiny_config(**{"batch_size": 8, "grad_accum_steps": 4,
                          "moe.balance_scope": "batch", "moe.group_size": 32,
                          "sample.length": 0})
  model = build.make_model(config)
  batch = jax.tree.map(jnp.asarray, next(_batches(config, 1)))
  loss = training_loss(config)
  aux = lambda b: float(loss(model, b)[1][0]["aux_loss"])  # noqa: E731
  micro = train.split_microbatches(batch, 4)
  per_micro = [aux(jax.tree.map(lambda x, j=j: x[j], micro)) for j in range(4)]
  metrics, _ = _run(config, steps=1)
  assert float(metrics[0]["aux_loss"]) == pytest.approx(np.mean(per_micro), abs=1e-6)
  assert abs(float(metrics[0]["aux_loss"]) - aux(batch)) > 1e-3


def test_split_microbatches_keeps_each_microbatch_spread_over_the_devices():
  rows = jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)
  # Two devices hold rows 0-3 and 4-7; each microbatch takes two rows of each.
  got = train.split_microbatches({"x": rows}, 2, shards=2)["x"]
  assert got.shape == (2, 4, 3)
  np.testing.assert_array_equal(got[:, :, 0], [[0, 1, 4, 5], [2, 3, 6, 7]])
  np.testing.assert_array_equal(train.split_microbatches({"x": rows}, 4)["x"][:, :, 0],
                                [[0, 1], [2, 3], [4, 5], [6, 7]])


@pytest.mark.parametrize("overrides, words", [
    ({"grad_accum_steps": 0}, "grad_accum_steps=0 must be a positive integer"),
    ({"grad_accum_steps": -2}, "grad_accum_steps=-2 must be a positive integer"),
    ({"grad_accum_steps": 3}, r"divides the per-device batch \(batch_size / "
     r"\(mesh.data\*mesh.fsdp\*mesh.expert\) = 4\)"),
    ({"batch_size": 8, "mesh.data": 2, "mesh.expert": 2, "grad_accum_steps": 4},
     r"per-device batch .* = 2\)"),
    # Microbatches of one 32-token row per device, groups of 64 tokens.
    ({"batch_size": 8, "grad_accum_steps": 8, "moe.group_size": 64},
     r"grad_accum_steps=8 leaves 32 tokens per device in a microbatch, not a multiple "
     r"of the 64-token routing groups"),
])
def test_grad_accum_steps_is_validated(overrides, words):
  with pytest.raises(ConfigError, match=words):
    check_config(tiny_config(**overrides), num_devices=8)


def test_valid_grad_accum_steps_pass():
  for overrides in ({"grad_accum_steps": 1},
                    {"grad_accum_steps": 4, "moe.group_size": 32},
                    {"batch_size": 16, "mesh.data": 2, "mesh.expert": 2,
                     "grad_accum_steps": 2, "moe.group_size": 32}):
    check_config(tiny_config(**overrides), num_devices=8)


def test_training_run_logs_the_global_batch_with_accumulation(tmp_path):
  """train_and_evaluate end to end (data, metrics.jsonl, eval): the train lines of an
  accumulated run with every block rematerialised are the plain run's."""
  from moe_jax.training.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  overrides = {"steps": 4, "log_every": 1, "eval_every": 4, "eval_steps": 1,
               "checkpoint_every": 4, "sample.length": 0}
  train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "plain"))
  train.train_and_evaluate(tiny_config(**overrides, grad_accum_steps=2,
                                       **{"model.remat": "full"}),
                           str(tmp_path / "accumulated"))
  plain, accumulated = (read_metrics(str(tmp_path / d), "train")
                        for d in ("plain", "accumulated"))
  assert len(plain) == len(accumulated) == 4
  for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in accumulated], [r[key] for r in plain],
                               rtol=0, atol=1e-5, err_msg=key)
