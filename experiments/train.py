r"""Trains a model from a config file; re-running on the same workdir resumes.

  python experiments/train.py --config=experiments/configs/switch_small.py \
      --workdir=/tmp/switch_small [--config.steps=2000 --config.moe.top_k=2 ...]
  # The first 60 steps of the 600-step schedule, then stop as a preemption would:
  python experiments/train.py --config=experiments/configs/jamba_small.py \
      --workdir=/tmp/jamba_small --stop_at_step=60

Exits 0 when done or after SIGTERM (a checkpoint is saved first); on a bad config, a
bad work directory, an unreadable checkpoint or a non-finite loss it prints one line per
problem (no traceback) and exits 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import run_main  # pylint: disable=wrong-import-position


def _flags(flags):
  flags.DEFINE_integer(
      "stop_at_step", None, "Stop after this step as a preemption would (checkpoint "
      "saved, exit 0; re-running without it resumes). The schedule, the evals and the "
      "data order stay those of --config.steps.", lower_bound=1)


def main(config, workdir):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from moe_jax.training import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(config, workdir, stop_at_step=flags.FLAGS.stop_at_step)


if __name__ == "__main__":
  run_main(main, needs_config=True, extra_flags=_flags)
