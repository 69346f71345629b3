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
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # pylint: disable=wrong-import-position

flags.DEFINE_enum("preset", "cpu_small", ["smoke", "cpu_small", "base"],
                  "Grid size: smoke (seconds), cpu_small (2-core CPU, <= 45 min), base.")
flags.DEFINE_string("workdir", None,
                    "Output directory (default /tmp/switch_vs_top2_PRESET).")
flags.DEFINE_integer("steps", None, "Training steps per run.")
flags.DEFINE_integer("seeds", None, "Seeds per model (0, 1, ...).")
flags.DEFINE_list("capacity_factors", None, "Train capacity factors of the MoE rows.")
flags.DEFINE_list("families", None, "Rows to run: dense,dense_large,top2,switch.")
flags.DEFINE_integer("num_experts", None, "Experts per MoE block.")
flags.DEFINE_integer("num_layers", None, "Blocks of the base models.")
flags.DEFINE_integer("large_layers", None, "Blocks of the dense-large model.")
flags.DEFINE_integer("d_model", None, "Model width.")
flags.DEFINE_integer("num_heads", None, "Attention heads.")
flags.DEFINE_integer("d_ff", None, "FFN / expert hidden width.")
flags.DEFINE_integer("group_size", None, "MoE routing group size.")
flags.DEFINE_integer("seq_len", None, "Tokens per example.")
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.")
flags.DEFINE_integer("eval_every", None, "Steps between evaluations.")
flags.DEFINE_integer("eval_steps", None,
                     "Batches per evaluation (0: the whole validation split).")
flags.DEFINE_integer("final_eval_steps", None,
                     "Batches of the final evaluation (0: the whole validation split).")
flags.DEFINE_integer("log_every", None, "Steps between train metric lines.")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
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
flags.DEFINE_string("dataset", None, "Dataset name (default: the embedded corpus).")
flags.DEFINE_float("threshold", None, "Quality threshold as an eval loss in nats/token "
                   "(a negative value is read as a quality, -loss); default: the dense "
                   "baseline's final eval loss.")

FLAGS = flags.FLAGS
OVERRIDES = ("steps", "seeds", "capacity_factors", "families", "num_experts",
             "num_layers", "large_layers", "d_model", "num_heads", "d_ff", "group_size",
             "seq_len", "batch_size", "learning_rate", "warmup_steps", "eval_every",
             "eval_steps", "final_eval_steps", "log_every", "checkpoint_every",
             "eval_capacity_factor", "aux_loss_coef", "z_loss_coef", "dataset", "threshold",
             "init_scale", "expert_init_scale", "router_init_scale", "loss_reduction",
             "normalize_gates")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from moe_jax import compare  # pylint: disable=import-outside-toplevel
  from moe_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from moe_jax.train import TrainingError  # pylint: disable=import-outside-toplevel
  try:
    settings = compare.resolve_settings(
        FLAGS.preset, **{k: getattr(FLAGS, k) for k in OVERRIDES})
  except ValueError as e:
    sys.exit(str(e))
  workdir = FLAGS.workdir or f"/tmp/switch_vs_top2_{FLAGS.preset}"
  # The settings, without where the outputs went.
  command = "python experiments/switch_vs_top2.py " + " ".join(
      shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--workdir"))
  try:
    compare.run_comparison(settings, workdir, command=command.strip())
  except (ConfigError, TrainingError) as e:
    sys.exit(str(e))


if __name__ == "__main__":
  app.run(main)
