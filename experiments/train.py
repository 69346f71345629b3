r"""Trains a model from a config file; re-running on the same workdir resumes.

  python experiments/train.py --config=experiments/configs/switch_small.py \
      --workdir=/tmp/switch_small [--config.steps=2000 --config.moe.top_k=2 ...]

Exits 0 when done or after SIGTERM (a checkpoint is saved first); on a bad config, a
bad work directory, an unreadable checkpoint or a non-finite loss it prints one line per
problem (no traceback) and exits 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import run_main  # pylint: disable=wrong-import-position


def main(config, workdir):
  from moe_jax import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  run_main(main, needs_config=True)
