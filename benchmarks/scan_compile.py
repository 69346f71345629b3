r"""Compile time and compiled memory of one train step, blocks unrolled against scanned
(``model.scan_layers``).

Builds a deep model (32 blocks by default: switch_small's widths, a dense + MoE pair
repeated 16 times), then for each setting lowers and compiles its jitted train step on
one device and prints the trace + lowering time, the compile time, the number of
lines of the lowered program, and XLA's memory analysis of the compiled step
(``temp``, ``args``, ``out``, the reported peak). The times are wall-clock seconds of
one process on a possibly shared CPU: read them as a ratio between the two rows of one
run, not as absolute numbers. Nothing is run.

  python benchmarks/scan_compile.py
  python benchmarks/scan_compile.py --config=jamba_small --config_overrides=model.num_layers=32
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import configs as config_files  # benchmarks/configs.py
from moe_jax.training import build, train
from moe_jax.training.config import check_config

_CONFIG = flags.DEFINE_string("config", "switch_small",
                              "Config of experiments/configs/.")
_OVERRIDES = flags.DEFINE_list("config_overrides", ["model.num_layers=32"],
                               "KEY=VALUE overrides, e.g. model.num_layers=64.")


def measure(config) -> dict[str, float]:
  """Lowering and compile seconds and the memory analysis of one train step."""
  check_config(config, num_devices=1)
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, seed=config.seed)
  tokens = np.zeros((config.batch_size, config.data.seq_len), np.int32)
  batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(tokens)}
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  return {"lower": t1 - t0, "compile": t2 - t1,
          "hlo_lines": len(lowered.as_text().splitlines()),
          "temp": int(m.temp_size_in_bytes), "args": int(m.argument_size_in_bytes),
          "out": int(m.output_size_in_bytes),
          "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}


def main(argv):
  del argv
  rows = []
  for scan in (False, True):
    config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
    config.model.scan_layers = scan
    rows.append((scan, measure(config)))
  config = config_files.load_config(_CONFIG.value, _OVERRIDES.value)
  base = rows[0][1]
  print(f"{_CONFIG.value}: {config.model.num_layers} blocks, batch {config.batch_size} x "
        f"{config.data.seq_len}, {jax.devices()[0].platform}, one device; times are "
        "one process's wall clock (compare the rows, not the seconds)\n")
  print("| model.scan_layers | trace+lower s | compile s | compile vs unrolled | "
        "lowered lines | temp MiB | args MiB | out MiB | peak MiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
  for scan, m in rows:
    print(f"| {scan} | {m['lower']:.2f} | {m['compile']:.2f} | "
          f"{m['compile'] / base['compile']:.2f}x | {m['hlo_lines']} | {mib(m['temp'])} | "
          f"{mib(m['args'])} | {mib(m['out'])} | {mib(m['peak'])} |")


if __name__ == "__main__":
  app.run(main)
