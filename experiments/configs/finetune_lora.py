"""Fine-tuning a pretrained run on the python_stdlib corpus (docs/peft.md).

  python experiments/finetune.py --config=experiments/configs/finetune_lora.py \
      --init_from=/tmp/switch_small --workdir=/tmp/switch_small_lora

LoRA (rank 8, alpha 16) on the routed experts by default; ``finetune.method`` picks
``lora`` | ``esft`` | ``full`` and ``finetune.targets`` the modules. Only training keys
live here: the model is the base run's (its ``config.json``), and every key not set
here (optimizer, clip, ...) is the base run's too.
"""

import ml_collections
from ml_collections import config_dict

from moe_jax.peft.finetune import default_finetune_config


def get_config():
  c = ml_collections.ConfigDict()
  c.finetune = default_finetune_config()
  c.steps = 500
  c.learning_rate = 1e-3
  c.warmup_steps = 20
  c.weight_decay = 0.0
  c.batch_size = 32
  c.log_every = 25
  c.eval_every = 100
  c.eval_steps = 20
  c.checkpoint_every = 100
  c.progress_bar = False
  c.data = ml_collections.ConfigDict()
  c.data.name = "python_stdlib"
  c.data.data_dir = config_dict.placeholder(str)
  return c
