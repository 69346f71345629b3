r"""Memory of one compiled train step per ``model.param_dtype`` and ``moment_dtype``.

Compiles (does not run) the jitted train step of a config on one device for each pair
and prints XLA's memory analysis of it: ``args`` (parameters, optimizer state, batch),
``temp`` (temporaries: activations kept for the backward pass, gradients, workspace)
and ``out``; beside them the bytes of the parameters and of the optimizer state as
built (what ``args`` holds besides the batch). Compile-only: no timing, the same on any
load.

  python benchmarks/mixed_precision_memory.py
  python benchmarks/mixed_precision_memory.py --config=jamba_small --config_overrides=model.dtype=bfloat16
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import configs as config_files  # benchmarks/configs.py
from moe_jax.training import build, run_state, train
from moe_jax.training.config import check_config

_CONFIG = flags.DEFINE_string("config", "switch_small",
                              "Config of experiments/configs/.")
_OVERRIDES = flags.DEFINE_list("config_overrides", [],
                               "KEY=VALUE overrides, e.g. model.dtype=bfloat16.")
# (model.param_dtype, moment_dtype) of each row.
SETTINGS = (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"))


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory(config) -> dict[str, int]:
  """The memory analysis of ``config``'s compiled train step on one device, and the
  bytes of its parameters and optimizer state."""
  check_config(config, num_devices=1)
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  _, params, _ = run_state.split_model(model)
  state = run_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(config.seed)),
      model_state=run_state.model_state(model))
  tokens = np.zeros((config.batch_size, config.data.seq_len), np.int32)
  batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(tokens)}
  m = train.make_train_step(model, tx, config).lower(state, batch).compile(
      ).memory_analysis()
  return {"args": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
          "out": int(m.output_size_in_bytes), "params": _bytes(params),
          "opt_state": _bytes(state.opt_state)}


def main(argv):
  del argv
  rows = []
  for param_dtype, moment_dtype in SETTINGS:
    config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
    config.model.param_dtype, config.moment_dtype = param_dtype, moment_dtype
    rows.append((param_dtype, moment_dtype, memory(config)))
  config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
  base = rows[0][2]
  print(f"{_CONFIG.value}: batch {config.batch_size} x {config.data.seq_len}, "
        f"model.dtype {config.model.dtype}, optimizer {config.optimizer}, "
        f"{jax.devices()[0].platform}, one device (compile only)\n")
  print("| model.param_dtype | moment_dtype | params MiB | optimizer state MiB | "
        "args MiB | vs f32/f32 | temp MiB | vs f32/f32 | out MiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  mib = 2 ** 20
  for param_dtype, moment_dtype, m in rows:
    print(f"| {param_dtype} | {moment_dtype} | {m['params'] / mib:.1f} | "
          f"{m['opt_state'] / mib:.1f} | {m['args'] / mib:.1f} | "
          f"{m['args'] / base['args']:.2f}x | {m['temp'] / mib:.1f} | "
          f"{m['temp'] / base['temp']:.2f}x | {m['out'] / mib:.1f} |")


if __name__ == "__main__":
  app.run(main)
