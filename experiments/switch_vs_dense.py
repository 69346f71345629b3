r"""Switch vs dense at the README's defaults, one ablation per row, paired by seed.

  python experiments/switch_vs_dense.py --workdir=DIR                       # default, 3 seeds
  python experiments/switch_vs_dense.py --workdir=DIR --variants=default,cf_2 --seeds=1

Trains experiments/configs/switch_small.py and dense_small.py under each variant of
moe_jax.compare.switch_vs_dense.VARIANTS (a variant that changes only MoE settings reuses
the default dense runs), then writes DIR/report.md, results.csv and margins.png.
Re-running the same command skips finished runs and resumes unfinished ones.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

import cli  # pylint: disable=wrong-import-position

cli.define_grid_flags(flags, "switch_vs_dense", None, shared=False)
flags.DEFINE_list("variants", None, "Rows: names of VARIANTS in "
                  "moe_jax/compare/switch_vs_dense.py (default: default).")
flags.DEFINE_integer("seeds", None, "Seeds per model (0, 1, ...; default 3).")
flags.DEFINE_integer("steps", None, "Training steps per run (default: the configs').")
flags.DEFINE_bool("report_only", None, "Write the report of the finished runs; train "
                  "nothing.")
flags.DEFINE_string("switch_config", None,
                    "Config file of the Switch model (default switch_small).")
flags.DEFINE_string("dense_config", None,
                    "Config file of the dense model (default dense_small).")


if __name__ == "__main__":
  app.run(cli.grid_main("switch_vs_dense", "switch_vs_dense", (
      "variants", "seeds", "steps", "report_only", "switch_config", "dense_config"),
      configs_dir=cli.CONFIGS_DIR))
