r"""Temporary memory of one compiled train step under ``model.remat`` and
``grad_accum_steps``.

Compiles (does not run) the jitted train step of a config for every setting and prints
XLA's memory analysis of it, per device: ``temp`` (temporaries: activations kept for
the backward pass, gradients, workspace), ``args`` (parameters, optimizer state,
batch) and ``out``; and ``residuals``, what JAX's differentiation keeps from the
forward pass for the backward pass (the leaves of ``jax.vjp``'s closure of the
training loss of one microbatch, weights and batch included; traced, not run). The
residuals are what ``model.remat`` chooses; whether the compiled step's peak follows
is the backend's scheduling (docs/benchmarks.md). Compile-only: no timing, the same
on any load.

  python benchmarks/remat_memory.py
  python benchmarks/remat_memory.py --config=jamba_small --config_overrides=batch_size=32
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import configs as config_files  # benchmarks/configs.py
from moe_jax.models import model_config
from moe_jax.training import build, run_state, train
from moe_jax.training.config import check_config
from moe_jax.training.losses import training_loss

_CONFIG = flags.DEFINE_string("config", "switch_small",
                              "Config of experiments/configs/.")
_OVERRIDES = flags.DEFINE_list("config_overrides", [],
                               "KEY=VALUE overrides, e.g. batch_size=32.")
# (model.remat, grad_accum_steps) of each row. "dots_saveable" is not a config value:
# a row for comparison that saves every matmul, batch dimensions or not.
SETTINGS = (("none", 1), ("dots", 1), ("dots_saveable", 1), ("full", 1), ("none", 4),
            ("full", 4))
model_config.REMAT_POLICIES.setdefault("dots_saveable",
                                       jax.checkpoint_policies.dots_saveable)


def residual_bytes(model, config, batch) -> int:
  """Bytes of what the backward pass of the training loss keeps (``jax.vjp``'s
  residuals, shapes only) on ``batch``."""
  graphdef, params, rest = run_state.split_model(model)
  loss = training_loss(config)

  def f(p):
    m = run_state.merge_model(graphdef, p, rest, None)
    run_state.reseed(m, jax.random.key(0))
    return loss(m, batch)[0]

  leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(f, p)[1]), params)
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def memory(config) -> dict[str, int]:
  """The memory analysis of ``config``'s compiled train step on one device."""
  checked = config.copy_and_resolve_references()
  if checked.model.remat == "dots_saveable":  # not a config value
    checked.model.remat = "dots"
  check_config(checked, num_devices=1)
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, seed=config.seed)
  tokens = np.zeros((config.batch_size, config.data.seq_len), np.int32)
  batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(tokens)}
  m = train.make_train_step(model, tx, config, state_sharding=state_sharding).lower(
      state, batch).compile().memory_analysis()
  micro = jax.tree.map(lambda x: x[:config.batch_size // config.grad_accum_steps],
                       batch)
  return {"temp": int(m.temp_size_in_bytes), "args": int(m.argument_size_in_bytes),
          "out": int(m.output_size_in_bytes),
          "residuals": residual_bytes(model, config, micro)}


def main(argv):
  del argv
  rows = []
  for remat, accum in SETTINGS:
    config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
    config.model.remat, config.grad_accum_steps = remat, accum
    rows.append((remat, accum, memory(config)))
  config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
  base = rows[0][2]["temp"]
  print(f"{_CONFIG.value}: batch {config.batch_size} x {config.data.seq_len}, "
        f"{jax.devices()[0].platform}, one device (compile only)\n")
  print("| model.remat | grad_accum_steps | temp MiB | vs none, 1 | residuals MiB "
        "(one microbatch) | args MiB | out MiB |")
  print("|---|---|---|---|---|---|---|")
  for remat, accum, m in rows:
    print(f"| {remat} | {accum} | {m['temp'] / 2**20:.1f} | {m['temp'] / base:.2f}x | "
          f"{m['residuals'] / 2**20:.1f} | {m['args'] / 2**20:.1f} | "
          f"{m['out'] / 2**20:.1f} |")


if __name__ == "__main__":
  app.run(main)
