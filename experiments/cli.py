"""Shared command-line plumbing of the experiment scripts (flags, clean errors)."""

import os
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
    from moe_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
    from moe_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
    from moe_jax.train import TrainingError  # pylint: disable=import-outside-toplevel
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
