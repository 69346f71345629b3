"""Shared command-line plumbing of the experiment scripts (flags, clean errors)."""

import importlib
import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def fail(message: str) -> None:
  """Prints ``message`` (one line per problem) to stderr and exits 1."""
  print(message, file=sys.stderr, flush=True)
  sys.exit(1)


def _load_config_or_fail(path: str):
  """Checks the --config file before absl tries (its errors come with tracebacks)."""
  config_path = path.split(":", 1)[0]
  if not os.path.isfile(config_path):
    fail(f"--config={path!r}: no such config file; pick one of experiments/configs/*.py.")


def run_main(main, *, needs_config: bool, extra_flags=None) -> None:
  """Parses flags and calls ``main(config, workdir)`` with clean error handling."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      _load_config_or_fail(arg[len("--config="):])
  if needs_config:
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                    lock_config=True)
  flags.DEFINE_string("workdir", None, "Work directory (metrics, checkpoints).")
  if extra_flags:
    extra_flags(flags)
  flags.mark_flag_as_required("workdir")
  if needs_config:
    flags.mark_flag_as_required("config")

  def _main(argv):
    if len(argv) > 1:
      fail(f"Unexpected arguments: {' '.join(argv[1:])}.")
    from moe_jax.errors import (  # pylint: disable=import-outside-toplevel
        CheckpointError, ConfigError, TrainingError)
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS["verbosity"].present:
      absl_logging.set_verbosity(absl_logging.WARNING)
    try:
      main(flags.FLAGS.config if needs_config else None, flags.FLAGS.workdir)
    except (ConfigError, CheckpointError, TrainingError) as e:
      fail(str(e))

  def _parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f"Bad flag: {e}")
    except Exception as e:  # pylint: disable=broad-except
      # ml_collections reports an unknown --config.KEY as AttributeError/KeyError.
      msg = str(e).strip("'\"") or type(e).__name__
      fail(f"Bad flag ({type(e).__name__}: {msg}); check the --config.* overrides "
           "against the config file.")

  app.run(_main, flags_parser=_parse)


# The config files of experiments/train.py, also the rows of the comparison grids.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


# Flags that every comparison grid shares (each overrides its preset when given).
GRID_FLAGS = (
    ("integer", "steps", "Training steps per run."),
    ("integer", "seeds", "Seeds per row (0, 1, ...)."),
    ("integer", "num_experts", "Experts per MoE block."),
    ("integer", "num_layers", "Blocks of the base models."),
    ("integer", "d_model", "Model width."),
    ("integer", "num_heads", "Attention heads."),
    ("integer", "d_ff", "FFN hidden units per token (the dense FFN's width)."),
    ("integer", "seq_len", "Tokens per example."),
    ("integer", "batch_size", "Global batch size."),
    ("float", "learning_rate", "Peak learning rate."),
    ("integer", "warmup_steps", "Linear warmup steps."),
    ("integer", "eval_every", "Steps between evaluations."),
    ("integer", "eval_steps", "Batches per evaluation (0: the whole validation split)."),
    ("integer", "final_eval_steps",
     "Batches of the final evaluation (0: the whole validation split)."),
    ("integer", "log_every", "Steps between train metric lines."),
    ("integer", "checkpoint_every", "Steps between checkpoints."),
    ("string", "dataset", "Dataset name (default: the embedded corpus)."),
    ("float", "threshold", "Quality threshold as an eval loss in nats/token (a negative "
     "value is read as a quality, -loss); default: the dense row's final eval loss."),
)


def define_grid_flags(flags, script: str, presets_help: str) -> tuple[str, ...]:
  """Defines ``--preset``, ``--workdir`` and :data:`GRID_FLAGS` (all default None, so
  the preset decides); returns the names of the overriding flags."""
  flags.DEFINE_enum("preset", "cpu_small", ["smoke", "cpu_small", "base"], presets_help)
  flags.DEFINE_string("workdir", None, f"Output directory (default /tmp/{script}_PRESET).")
  for kind, name, help_ in GRID_FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, None, help_)
  return tuple(name for _, name, _ in GRID_FLAGS)


def run_grid_command(script: str, resolve_settings, run_comparison, flag_values,
             overrides: tuple[str, ...], **settings_kwargs) -> None:
  """The body of a grid script's ``main``: settings from the preset and the flags,
  then the grid in ``--workdir``; a bad value or a failed run exits with one line."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  from moe_jax.errors import ConfigError, TrainingError  # pylint: disable=import-outside-toplevel
  if not flag_values["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    settings = resolve_settings(flag_values.preset, **settings_kwargs,
                                **{k: getattr(flag_values, k) for k in overrides})
  except ValueError as e:
    sys.exit(str(e))
  workdir = flag_values.workdir or f"/tmp/{script}_{flag_values.preset}"
  # The settings, without where the outputs went.
  command = f"python experiments/{script}.py " + " ".join(
      shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--workdir"))
  try:
    run_comparison(settings, workdir, command=command.strip())
  except (ConfigError, TrainingError) as e:
    sys.exit(str(e))


def grid_main(script: str, module: str, overrides: tuple[str, ...], **settings_kwargs):
  """The absl ``main`` of a grid script: no positional arguments, then
  :func:`run_grid_command` with ``moe_jax.compare.MODULE``'s ``resolve_settings`` and
  ``run_comparison`` (imported once the flags are parsed) and ``settings_kwargs``."""

  def main(argv):
    if len(argv) > 1:
      sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}.")
    from absl import flags  # pylint: disable=import-outside-toplevel
    grid = importlib.import_module(f"moe_jax.compare.{module}")
    run_grid_command(script, grid.resolve_settings, grid.run_comparison, flags.FLAGS,
                     overrides, **settings_kwargs)

  return main
