r"""Fine-tunes a pretrained run with LoRA, ESFT or in full; re-running resumes.

  python experiments/finetune.py --config=experiments/configs/finetune_lora.py \
      --init_from=/tmp/switch_small --workdir=/tmp/switch_small_lora \
      [--config.finetune.method=esft --config.finetune.targets="('router',)"]

Exits 0 when done or after SIGTERM (a checkpoint is saved first); on a bad config, an
--init_from without a checkpoint, a target the model lacks, an unreadable checkpoint or
a non-finite loss it prints one line per problem and exits 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import run_main  # pylint: disable=wrong-import-position


def _flags(flags):
  flags.DEFINE_string("init_from", None, "Work directory of the pretraining run.")


def main(config, workdir):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from moe_jax.peft import finetune  # pylint: disable=import-outside-toplevel
  finetune.finetune(config, flags.FLAGS.init_from, workdir)


if __name__ == "__main__":
  run_main(main, needs_config=True, extra_flags=_flags)
