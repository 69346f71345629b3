r"""Training tokens/s of switch_small and top2_small against dense_small.

All models are built and compiled in one process, then their jitted train steps run
interleaved (dense, switch, top2, dense, ...) on the same fixed batch, so machine noise
hits every model alike. Reports the median step time, tokens/s and the ratio to dense.
Data loading is left out: this measures the model step.

``--forms=2d,einsum`` builds every config twice: with the model's projections as they
are (2-D matmuls on token rows, ``moe_jax/layers/projection.py``) and as the N-D einsums
they were before (``benchmarks/einsum_forms.py``). All six steps are interleaved, each
form's ratio is against the dense model of the same form, and ``einsum / 2d`` is the
per-round step-time ratio of the two forms of one config (> 1: the 2-D form is faster).

  python benchmarks/train_throughput.py
  python benchmarks/train_throughput.py --repeats=20 --config_overrides=moe.dispatch=einsum
  python benchmarks/train_throughput.py --forms=2d,einsum --repeats=20
  python benchmarks/train_throughput.py --configs=mod_small,mode_small  # + dense_small
"""

from __future__ import annotations

import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import configs as config_files  # benchmarks/configs.py
import einsum_forms  # benchmarks/einsum_forms.py
import harness  # benchmarks/harness.py
from moe_jax.training import build as build_lib, run_state, train as train_lib
from moe_jax.models.sizes import flops_per_token

CONFIGS = ("dense_small", "switch_small", "top2_small")

_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS),
                             "Configs of experiments/configs/ to measure; dense_small "
                             "(the 'vs dense' column) is always added, e.g. "
                             "--configs=mod_small,mode_small.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed interleaved rounds.")
_OVERRIDES = flags.DEFINE_list(
    "config_overrides", [], "KEY=VALUE overrides applied to every config, e.g. "
    "batch_size=32,data.seq_len=256,moe.dispatch=einsum.")
_JSON = flags.DEFINE_string("json", None, "Write the rows as JSON to this file.")
FORMS = ("2d", "einsum")
_FORMS = flags.DEFINE_list(
    "forms", ["2d"], "Projection forms to build each config with: 2d (the model's) "
    "and/or einsum (the former N-D einsums).")
flags.register_validator(
    "forms", lambda v: bool(v) and set(v) <= set(FORMS),
    message=f"--forms takes a comma-separated subset of {','.join(FORMS)}.")


def load_config(name: str):
  return config_files.load_config(name, _OVERRIDES.value)


def build(config):
  """A compiled train step and its state for ``config``, on one device."""
  model = build_lib.make_model(config)
  tx, _ = build_lib.make_optimizer(config)
  _, params, _ = run_state.split_model(model)
  state = run_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(config.seed)))
  step = train_lib.make_train_step(model, tx, config)
  b, l = config.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(b, l + 1), dtype=np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  state, metrics = step(state, batch)  # compile
  jax.block_until_ready(metrics)
  flops = flops_per_token(model, l)
  return {"step": step, "state": state, "batch": batch, "tokens": b * l,
          "flops": flops}


def main(argv):
  del argv
  forms = list(dict.fromkeys(_FORMS.value))
  names = list(dict.fromkeys(["dense_small", *_CONFIGS.value]))
  runs = {}
  for form in forms:
    for name in names:
      if form == "einsum":
        with einsum_forms.einsum_forms():  # build() compiles inside
          runs[name, form] = build(load_config(name))
      else:
        runs[name, form] = build(load_config(name))
  times = harness.interleaved_step_times(runs, _REPEATS.value)
  print(f"# backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"jax={jax.__version__} repeats={_REPEATS.value} "
        f"overrides={','.join(_OVERRIDES.value) or 'none'}")
  print(f"{'config':>14} {'form':>6} | {'step ms':>8} {'tokens/s':>9} {'vs dense':>8} "
        f"{'einsum/2d':>9} | {'active GFLOP/tok':>16}")
  rows = []
  for (name, form), run in runs.items():
    med = statistics.median(times[name, form])
    # Per-round ratios, then the median: robust to drift across rounds.
    ratio = statistics.median(
        d / t for d, t in zip(times["dense_small", form], times[name, form]))
    row = dict(config=name, form=form, step_ms=med * 1e3,
               tokens_per_sec=run["tokens"] / med, throughput_vs_dense=ratio,
               active_flops=run["flops"]["active"])
    vs_2d = ""
    if form == "einsum" and (name, "2d") in runs:
      row["einsum_over_2d"] = statistics.median(
          e / t for e, t in zip(times[name, "einsum"], times[name, "2d"]))
      vs_2d = f"{row['einsum_over_2d']:.2f}"
    print(f"{name:>14} {form:>6} | {med * 1e3:8.1f} {run['tokens'] / med:9.0f} "
          f"{ratio:8.2f} {vs_2d:>9} | {run['flops']['active'] / 1e9:16.4f}")
    rows.append(row)
  harness.write_results(dict(backend=jax.default_backend(), jax=jax.__version__,
                             repeats=_REPEATS.value, overrides=list(_OVERRIDES.value),
                             rows=rows), json_path=_JSON.value)


if __name__ == "__main__":
  app.run(main)
