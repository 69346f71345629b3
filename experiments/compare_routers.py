r"""Every router on one budget, for causal and masked language modelling, one command.

  python experiments/compare_routers.py --preset=cpu_small --workdir=DIR
  python experiments/compare_routers.py --preset=smoke --workdir=/tmp/routers_smoke
  python experiments/compare_routers.py --objective=masked_lm --rows=switch,expert_choice_cf2

Trains every row (dense, Switch, GShard top-2, Mixtral top-2 dropless, DeepSeek with bias
balancing and with an aux loss, noisy top-2; on masked LM also expert choice at cf 1.0
and 2.0, and Switch with and without Batch Prioritized Routing at cf 1.0) at equal
active FFN FLOPs per token, for each objective and seed, in WORKDIR/runs/NAME, then
writes WORKDIR/report.md, results.csv and plots. Re-running the same command skips
finished runs and resumes unfinished ones. See docs/compare_routers.md and
moe_jax/compare/routers.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

import cli  # pylint: disable=wrong-import-position

GRID_OVERRIDES = cli.define_grid_flags(
    flags, "compare_routers", "Grid size: smoke (CI, seconds), cpu_small (2-core CPU, "
    "<= 60 min), base (accelerator).")
flags.DEFINE_enum("objective", "both", ["causal_lm", "masked_lm", "both"],
                  "Objectives to run.")
flags.DEFINE_list("rows", None, "Rows to run (default: the preset's); see "
                  "moe_jax/compare/router_rows.py ROWS.")


if __name__ == "__main__":
  app.run(cli.grid_main("compare_routers", "routers", GRID_OVERRIDES + ("rows",),
                        renamed={"objectives": "objective"},
                        configs_dir=cli.CONFIGS_DIR))
