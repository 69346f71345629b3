r"""Compiles a config's train step (or its serving steps) for a TPU or GPU topology on
this host, with no accelerator, and reports memory, FLOPs, collectives and a roofline.

  python experiments/plan.py --config=experiments/configs/switch_small.py \
      --target=v5e:2x2 [--config.mesh.expert=4 ...] [--json=/tmp/plan.json]
  python experiments/plan.py --config=experiments/configs/mixtral_small.py \
      --target=h100:1x8 --mode=serve --serve_batch=8 --serve_len=2048

--target is CHIP:TOPOLOGY: v4, v5e, v5p or v6e with a TPU topology (v5e:2x2,
v5e:16x16, v5p:4x4x4), or h100 / h200 with HOSTSxGPUS (h100:1x8, h100:4x8). The mesh
is the config's; mesh.data grows to fill the target's devices when the config's mesh
is smaller. Needs libtpu for TPU targets and the CUDA plugin for GPU targets
(``pip install 'jax[tpu,cuda12-local]==<jax version>'``; used only to compile).

Exits 1 with one line when the config is bad, the compiler refuses the step, the step
does not fit the chip's HBM, or a compiler is missing.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cli import fail, run_main  # pylint: disable=wrong-import-position


def _flags(flags):
  flags.DEFINE_string("target", None, "CHIP:TOPOLOGY, e.g. v5e:2x2, v5p:4x4x4, h100:1x8.",
                      required=True)
  flags.DEFINE_integer("slices", 1, "Slices of the topology (TPU multi-slice; GPU "
                       "clusters).")
  flags.DEFINE_string("mode", "train", "train (the train step) or serve (prefill and "
                      "one decode step with the KV cache).")
  flags.DEFINE_integer("serve_batch", 8, "Rows of the KV cache (--mode=serve).")
  flags.DEFINE_integer("serve_len", 0, "Context of the KV cache (--mode=serve; 0: "
                       "data.seq_len).")
  flags.DEFINE_integer("serve_chunk", 0, "Prefill chunk per row (--mode=serve): the "
                       "prefill compiled is one chunk against the full cache; 0: the "
                       "whole context at once.")
  flags.DEFINE_string("json", None, "Write the plan as JSON to this path.")


def main(config, workdir):
  del workdir
  from absl import flags  # pylint: disable=import-outside-toplevel
  from moe_jax.planner import compile as planner  # pylint: disable=import-outside-toplevel
  from moe_jax.planner.memory_report import describe  # pylint: disable=import-outside-toplevel
  from moe_jax.planner.table import format_plan  # pylint: disable=import-outside-toplevel
  from moe_jax.planner.targets import make_target, parse_target  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS
  parse_target(fv.target, fv.slices)  # a bad spec fails before anything loads
  if fv.mode not in planner.MODES:
    fail(f"--mode={fv.mode!r} is unknown; use train or serve.")
  target = make_target(fv.target, fv.slices)
  result = planner.plan(config, target, mode=fv.mode, serve_batch=fv.serve_batch,
                        serve_len=fv.serve_len, serve_chunk=fv.serve_chunk)
  print(format_plan(result), flush=True)
  if fv.json:
    os.makedirs(os.path.dirname(os.path.abspath(fv.json)), exist_ok=True)
    with open(fv.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  if not result["fits"]:
    b = result["bytes_per_device"]
    largest = result.get("largest_buffers")
    largest = f"; its largest buffer is {describe(largest[0])}" if largest else ""
    fail(f"{fv.target}: the step's peak {b['peak'] / 2**30:.2f} GiB exceeds the chip's "
         f"{b['hbm'] / 2**30:.2f} GiB HBM per device by "
         f"{(b['peak'] - b['hbm']) / 2**30:.2f} GiB{largest}; shard it over more "
         "devices (--config.mesh.fsdp), recompute activations (--config.model.remat="
         "full), tile attention (--config.model.attention_kernel=blocked), chunk the "
         "loss (--config.loss_chunk) or lower --config.batch_size.")


if __name__ == "__main__":
  run_main(main, needs_config=True, extra_flags=_flags, needs_workdir=False)
