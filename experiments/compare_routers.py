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
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # pylint: disable=wrong-import-position

flags.DEFINE_enum("preset", "cpu_small", ["smoke", "cpu_small", "base"],
                  "Grid size: smoke (CI, seconds), cpu_small (2-core CPU, <= 60 min), "
                  "base (accelerator).")
flags.DEFINE_string("workdir", None,
                    "Output directory (default /tmp/compare_routers_PRESET).")
flags.DEFINE_enum("objective", "both", ["causal_lm", "masked_lm", "both"],
                  "Objectives to run.")
flags.DEFINE_list("rows", None, "Rows to run (default: the preset's); see "
                  "moe_jax/compare/routers.py ROWS.")
flags.DEFINE_integer("steps", None, "Training steps per run.")
flags.DEFINE_integer("seeds", None, "Seeds per row (0, 1, ...).")
flags.DEFINE_integer("num_experts", None,
                     "Routed experts of a top-1 row (others scale to equal FLOPs).")
flags.DEFINE_integer("num_layers", None, "Blocks.")
flags.DEFINE_integer("d_model", None, "Model width.")
flags.DEFINE_integer("num_heads", None, "Attention heads.")
flags.DEFINE_integer("d_ff", None, "FFN hidden units per token (the dense FFN's width).")
flags.DEFINE_integer("seq_len", None, "Tokens per example.")
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.")
flags.DEFINE_integer("eval_every", None, "Steps between evaluations.")
flags.DEFINE_integer("eval_steps", None, "Batches per evaluation (0: the whole split).")
flags.DEFINE_integer("final_eval_steps", None,
                     "Batches of the final evaluation (0: the whole split).")
flags.DEFINE_integer("log_every", None, "Steps between train metric lines.")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
flags.DEFINE_string("dataset", None, "Dataset name (default: the embedded corpus).")
flags.DEFINE_float("threshold", None, "Quality threshold as an eval loss (a negative "
                   "value is read as -loss); default: the dense row's final eval loss.")

FLAGS = flags.FLAGS
OVERRIDES = ("rows", "steps", "seeds", "num_experts", "num_layers", "d_model",
             "num_heads", "d_ff", "seq_len", "batch_size", "learning_rate",
             "warmup_steps", "eval_every", "eval_steps", "final_eval_steps", "log_every",
             "checkpoint_every", "dataset", "threshold")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from moe_jax.compare import routers  # pylint: disable=import-outside-toplevel
  from moe_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from moe_jax.train import TrainingError  # pylint: disable=import-outside-toplevel
  try:
    settings = routers.resolve_settings(
        FLAGS.preset, objectives=FLAGS.objective,
        **{k: getattr(FLAGS, k) for k in OVERRIDES})
  except ValueError as e:
    sys.exit(str(e))
  workdir = FLAGS.workdir or f"/tmp/compare_routers_{FLAGS.preset}"
  command = "python experiments/compare_routers.py " + " ".join(
      shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--workdir"))
  try:
    routers.run_comparison(settings, workdir, command=command.strip())
  except (ConfigError, TrainingError) as e:
    sys.exit(str(e))


if __name__ == "__main__":
  app.run(main)
