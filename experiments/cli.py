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


def run_main(main, *, needs_config: bool, extra_flags=None,
             needs_workdir: bool = True) -> None:
  """Parses flags and calls ``main(config, workdir)`` with clean error handling
  (``workdir`` None when the command has no ``--workdir``)."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      _load_config_or_fail(arg[len("--config="):])
  if needs_config:
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                    lock_config=True)
  if needs_workdir:
    flags.DEFINE_string("workdir", None, "Work directory (metrics, checkpoints).")
  if extra_flags:
    extra_flags(flags)
  if needs_workdir:
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
      main(flags.FLAGS.config if needs_config else None,
           flags.FLAGS.workdir if needs_workdir else None)
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


# Flags that the Switch-vs-top-2 and router grids share (each overrides its preset
# when given).
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
# Flags of the command line that are not settings of the grid's report.
NOT_IN_COMMAND = ("--workdir", "--report_only")


def define_grid_flags(flags, script: str, presets_help: str | None, *,
                      shared: bool = True) -> tuple[str, ...]:
  """Defines ``--preset`` (unless ``presets_help`` is None: a grid with one preset,
  ``default``, whose ``--workdir`` is then required), ``--workdir`` and, with
  ``shared``, :data:`GRID_FLAGS`; returns the names of the flags it defined that
  override settings. Every such flag defaults to None, so the preset decides."""
  if presets_help is None:
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  else:
    # A string, not an enum: an unknown preset gets the grid's one-line error.
    flags.DEFINE_string("preset", "cpu_small", presets_help)
    flags.DEFINE_string("workdir", None,
                        f"Output directory (default /tmp/{script}_PRESET).")
  if not shared:
    return ()
  for kind, name, help_ in GRID_FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, None, help_)
  return tuple(name for _, name, _ in GRID_FLAGS)


def grid_main(script: str, module: str, overrides: tuple[str, ...], *,
              renamed: dict[str, str] | None = None, **settings_kwargs):
  """The absl ``main`` of every grid script (``experiments/SCRIPT.py``).

  Once the flags are parsed: ``moe_jax.compare.MODULE``'s ``resolve_settings`` of the
  preset (``--preset``, or ``default``) with ``settings_kwargs`` and each flag of
  ``overrides`` (a setting of the same name; ``renamed`` maps setting -> flag where
  they differ), then its ``run_comparison`` in ``--workdir``. Positional arguments,
  a bad value or a failed run exit with one line.
  """

  def main(argv):
    if len(argv) > 1:
      sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}.")
    from absl import flags  # pylint: disable=import-outside-toplevel
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    from moe_jax.errors import ConfigError, TrainingError  # pylint: disable=import-outside-toplevel
    fv = flags.FLAGS
    if not fv["verbosity"].present:
      absl_logging.set_verbosity(absl_logging.WARNING)
    grid = importlib.import_module(f"moe_jax.compare.{module}")
    preset = fv.preset if "preset" in fv else "default"
    names = {**{k: k for k in overrides}, **(renamed or {})}
    try:
      settings = grid.resolve_settings(preset, **settings_kwargs,
                                       **{k: getattr(fv, f) for k, f in names.items()})
    except ValueError as e:
      sys.exit(str(e))
    workdir = fv.workdir or f"/tmp/{script}_{preset}"
    # The settings, without where the outputs went.
    command = f"python experiments/{script}.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if not a.startswith(NOT_IN_COMMAND))
    try:
      grid.run_comparison(settings, workdir, command=command.strip())
    except (ConfigError, TrainingError) as e:
      sys.exit(str(e))

  return main
