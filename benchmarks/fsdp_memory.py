r"""Per-device memory of one compiled train step with and without FSDP (``mesh.fsdp``).

Compiles (does not run) the jitted train step of a config on 8 CPU devices for each
mesh below and prints XLA's memory analysis of the compiled step, per device:
``args`` (the device's shards of the parameters, optimizer state and batch),
``temp`` (temporaries: activations kept for the backward pass, gathered weights,
gradients, workspace), ``out`` and the peak XLA reports. A compile-only bound from the
CPU compiler, not a measurement on hardware: no timing, the same on any load.

  python benchmarks/fsdp_memory.py
  python benchmarks/fsdp_memory.py --config=mixtral_small --config_overrides=batch_size=32
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import jax
import numpy as np

import configs as config_files  # benchmarks/configs.py
from moe_jax.models import param_sharding
from moe_jax.parallel import sharding
from moe_jax.training import build, train
from moe_jax.training.config import check_config

_CONFIG = flags.DEFINE_string("config", "switch_small",
                              "Config of experiments/configs/.")
_OVERRIDES = flags.DEFINE_list("config_overrides", [],
                               "KEY=VALUE overrides, e.g. batch_size=32.")
# (row label, (data, fsdp, expert, model), model.remat) of each row.
SETTINGS = (
    ("data=8 (fsdp=1)", (8, 1, 1, 1), "none"),
    ("fsdp=8", (1, 8, 1, 1), "none"),
    ("fsdp=8, remat=full", (1, 8, 1, 1), "full"),
    ("fsdp=2 x expert=4", (1, 2, 4, 1), "none"),
)


def memory(config, axes) -> dict[str, int]:
  """The memory analysis of ``config``'s compiled train step on the mesh ``axes``."""
  data, fsdp, expert, model_axis = axes
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.expert, config.mesh.model = expert, model_axis
  check_config(config, num_devices=jax.device_count())
  model = build.make_model(config)
  mesh = sharding.make_mesh(data, expert, model_axis, fsdp=fsdp)
  param_sharding.shard_model(model, mesh)
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, mesh, config.seed)
  tokens = np.zeros((config.batch_size, config.data.seq_len), np.int32)
  batch = sharding.shard_batch({"inputs": tokens, "targets": tokens}, mesh)
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  m = step.lower(state, batch).compile().memory_analysis()
  return {"args": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
          "out": int(m.output_size_in_bytes),
          "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0),
          "params": sum(x.nbytes for x in jax.tree.leaves(state.params))}


def main(argv):
  del argv
  if jax.device_count() < 8:
    raise app.UsageError(f"needs 8 devices, found {jax.device_count()}.")
  rows = []
  for label, axes, remat in SETTINGS:
    config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
    config.model.remat = remat
    rows.append((label, memory(config, axes)))
  config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
  print(f"{_CONFIG.value}: batch {config.batch_size} x {config.data.seq_len}, "
        f"{rows[0][1]['params'] / 2**20:.1f} MiB of parameters, 8 "
        f"{jax.devices()[0].platform} devices (compile only, per device)\n")
  base = rows[0][1]
  print("| mesh | args MiB | temp MiB | out MiB | peak MiB | args+temp vs data=8 |")
  print("|---|---|---|---|---|---|")
  for label, m in rows:
    total = (m["args"] + m["temp"]) / (base["args"] + base["temp"])
    peak = f"{m['peak'] / 2**20:.1f}" if m["peak"] else "-"
    print(f"| {label} | {m['args'] / 2**20:.1f} | {m['temp'] / 2**20:.1f} | "
          f"{m['out'] / 2**20:.1f} | {peak} | {total:.2f}x |")


if __name__ == "__main__":
  app.run(main)
