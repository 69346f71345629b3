r"""Step time of a config with each memory / compile feature on and off, as ratios
measured in one process: FSDP (``mesh.fsdp=8`` against ``mesh.data=8``), ``model.remat``
("full", "dots" against "none") and ``model.scan_layers``.

Runs on 8 CPU devices (forced host devices, as the tests do). Every setting is
compiled and warmed up first; then the settings take turns, ``--rounds`` rounds of
``--steps`` timed steps each, and each setting's time is its median step. The
ratios to the baseline (``data=8``, no remat, unrolled) are what to read: the
seconds are one process's wall clock on a CPU that other work may share, and 8 fake
devices on a few cores run one after another, so a collective costs a copy, not a
network transfer.

  python benchmarks/feature_cost.py
  python benchmarks/feature_cost.py --config=jamba_small --rounds=5
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import time

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
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of timed steps per setting.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per setting and round.")
# (row label, (data, fsdp), model.remat, model.scan_layers); the first is the baseline.
SETTINGS = (
    ("baseline: data=8, remat=none, unrolled", (8, 1), "none", False),
    ("fsdp=8", (1, 8), "none", False),
    ("remat=full", (8, 1), "full", False),
    ("remat=dots", (8, 1), "dots", False),
    ("scan_layers", (8, 1), "none", True),
    ("scan_layers + remat=full", (8, 1), "full", True),
)


def make_step(config, axes):
  """A compiled, warmed-up ``run()`` of one train step of ``config`` on ``axes``."""
  data, fsdp = axes
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.model = (
      data, fsdp, 1, 1)
  check_config(config, num_devices=jax.device_count())
  model = build.make_model(config)
  mesh = sharding.make_mesh(data, 1, 1, fsdp=fsdp)
  param_sharding.shard_model(model, mesh)
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, mesh, config.seed)
  tokens = np.random.default_rng(0).integers(
      0, 256, (config.batch_size, config.data.seq_len + 1), np.int32)
  batch = sharding.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                               mesh)
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  for _ in range(2):  # compile, then one warm step
    run()
  return run


def main(argv):
  del argv
  runs = []
  for _, axes, remat, scan in SETTINGS:
    config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
    config.model.remat, config.model.scan_layers = remat, scan
    runs.append(make_step(config, axes))
  times = [[] for _ in SETTINGS]
  for _ in range(_ROUNDS.value):
    for i, run in enumerate(runs):
      for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        run()
        times[i].append(time.perf_counter() - t0)
  median = [float(np.median(t)) for t in times]
  config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
  print(f"{_CONFIG.value}: {config.model.num_layers} blocks, batch {config.batch_size} x "
        f"{config.data.seq_len}, 8 fake CPU devices, median of {_ROUNDS.value} x "
        f"{_STEPS.value} steps per setting, one process (read the ratios)\n")
  print("| setting | step s | vs baseline |")
  print("|---|---|---|")
  for (label, *_), t in zip(SETTINGS, median):
    print(f"| {label} | {t:.3f} | {t / median[0]:.2f}x |")


if __name__ == "__main__":
  app.run(main)
