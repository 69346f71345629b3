"""A converted model as a moe_jax run directory, and back.

:func:`write_run` writes what ``experiments/train.py`` leaves in its work directory
(``config.json``, ``model_info.json`` and a checkpoint at step 0 with a fresh optimizer
state), so that ``sample.py --workdir``, ``finetune.py --init_from`` and the analysis
read a converted checkpoint as they read a trained one. :func:`read_run` loads a run's
model for export, with a fine-tuning run's LoRA adapters folded into its weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.training.build import make_optimizer, model_info
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.training.run_state import to_checkpoint


def write_run(model: nnx.Module, config, workdir: str, *, mesh=None) -> str:
  """Writes ``model`` and its LM ``config`` as a run in ``workdir`` (created) and
  returns its absolute path. ``mesh``: the mesh ``model`` is placed on (the optimizer
  state follows its parameters, and every process writes its own shards); None: one
  device.

  Raises:
    ConfigError: ``workdir`` already holds a run (its config.json or checkpoints),
      which this would overwrite.
  """
  from moe_jax.training.steps import init_train_state  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(os.path.join(workdir, "config.json")) or os.path.exists(
      os.path.join(workdir, "checkpoints")):
    raise ConfigError([f"--workdir={workdir!r} already holds a run; convert into a new "
                       "directory (or delete that one)."])
  os.makedirs(workdir, exist_ok=True)
  tx, _ = make_optimizer(config)
  state, _ = init_train_state(model, tx, mesh, seed=config.seed)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  try:
    checkpointer.save(0, to_checkpoint(state), meta={"converted": True})
  finally:
    checkpointer.close()
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "model_info.json"), "w", encoding="utf-8") as f:
      json.dump(model_info(model, config.data.seq_len), f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
  return workdir


def read_run(workdir: str) -> tuple[nnx.Module, Any, int]:
  """``(model, config, step)`` of the latest checkpoint of a training or fine-tuning
  run, unscanned, with LoRA adapters merged into the weights they adapt."""
  from moe_jax.peft import finetune  # pylint: disable=import-outside-toplevel
  from moe_jax.training import run_state  # pylint: disable=import-outside-toplevel
  if finetune.is_finetune_run(workdir):
    model, config, step = finetune.load_model(workdir, merge=True)
  else:
    model, config, step = run_state.load_model(workdir)
  return model.unrolled(), config, step
