r"""Switch vs top-2 MoE vs dense: the grid of Switch Transformer Table 1, one command.

  python experiments/switch_vs_top2.py                      # --preset=cpu_small
  python experiments/switch_vs_top2.py --preset=smoke --workdir=/tmp/svt_smoke
  python experiments/switch_vs_top2.py --preset=base --workdir=runs/svt_base --dataset=NAME

Trains dense, dense-large (2x FLOPs), top-2 and top-1 (Switch) models at each train
capacity factor, for each seed, in WORKDIR/runs/NAME, then writes WORKDIR/report.md,
results.csv and plots. Re-running the same command skips finished runs and resumes
unfinished ones. See docs/switch_vs_top2.md and
moe_jax/compare/switch_vs_top2.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

import cli  # pylint: disable=wrong-import-position

GRID_OVERRIDES = cli.define_grid_flags(
    flags, "switch_vs_top2",
    "Grid size: smoke (seconds), cpu_small (2-core CPU, <= 45 min), base.")
flags.DEFINE_list("capacity_factors", None, "Train capacity factors of the MoE rows.")
flags.DEFINE_list("families", None, "Rows to run: dense,dense_large,top2,switch.")
flags.DEFINE_integer("large_layers", None, "Blocks of the dense-large model.")
flags.DEFINE_integer("group_size", None, "MoE routing group size.")
flags.DEFINE_float("eval_capacity_factor", None, "Eval capacity factor of all MoE rows.")
flags.DEFINE_float("aux_loss_coef", None, "Load-balancing loss coefficient.")
flags.DEFINE_float("z_loss_coef", None, "Router z-loss coefficient.")
flags.DEFINE_float("init_scale", None,
                   "Model-wide init scale of every weight, every row alike (default 1.0; "
                   "Switch: 0.1).")
flags.DEFINE_float("expert_init_scale", None,
                   "Init scale of the experts, relative to --init_scale (default 1.0).")
flags.DEFINE_float("router_init_scale", None,
                   "Init scale of the router, relative to --init_scale (default 1.0).")
flags.DEFINE_enum("loss_reduction", None, ["sum", "mean"],
                  "Per-layer aux/z losses summed (Switch) or averaged over MoE blocks.")
flags.DEFINE_bool("normalize_gates", None,
                  "Renormalise top-2 gates to sum to 1 (default true, GShard).")

OVERRIDES = GRID_OVERRIDES + (
    "capacity_factors", "families", "large_layers", "group_size", "eval_capacity_factor",
    "aux_loss_coef", "z_loss_coef", "init_scale", "expert_init_scale",
    "router_init_scale", "loss_reduction", "normalize_gates")


if __name__ == "__main__":
  app.run(cli.grid_main("switch_vs_top2", "switch_vs_top2", OVERRIDES))
