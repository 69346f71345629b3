r"""Switch vs dense at the README's defaults, one ablation per row, paired by seed.

  python experiments/switch_vs_dense.py --workdir=DIR                       # default, 3 seeds
  python experiments/switch_vs_dense.py --workdir=DIR --variants=default,cf_2 --seeds=1

Trains experiments/configs/switch_small.py and dense_small.py under each variant of
moe_jax.compare.switch_vs_dense.VARIANTS (a variant that changes only MoE settings reuses
the default dense runs), then writes DIR/report.md, results.csv and margins.png.
Re-running the same command skips finished runs and resumes unfinished ones.
"""

import importlib.util
import os
import pathlib
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # pylint: disable=wrong-import-position

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"

flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.DEFINE_list("variants", ["default"], "Rows: names of VARIANTS in "
                  "moe_jax/compare/switch_vs_dense.py.")
flags.DEFINE_integer("seeds", 3, "Seeds per model (0, 1, ...).", lower_bound=1)
flags.DEFINE_integer("steps", None, "Training steps per run (default: the configs').",
                     lower_bound=1)
flags.DEFINE_bool("report_only", False, "Write the report of the finished runs; train "
                  "nothing.")
flags.DEFINE_string("switch_config", "switch_small", "Config file of the Switch model.")
flags.DEFINE_string("dense_config", "dense_small", "Config file of the dense model.")

FLAGS = flags.FLAGS


def _load(name: str):
  path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    sys.exit(f"no config {name!r} in experiments/configs; pick one of "
             f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.py')))}.")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  if len(argv) > 1:
    sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from moe_jax.compare import switch_vs_dense  # pylint: disable=import-outside-toplevel
  from moe_jax.training.config import validate_config  # pylint: disable=import-outside-toplevel
  from moe_jax.errors import ConfigError, TrainingError  # pylint: disable=import-outside-toplevel
  base = {"switch": _load(FLAGS.switch_config), "dense": _load(FLAGS.dense_config)}
  try:
    runs = switch_vs_dense.build_grid(base, FLAGS.variants, FLAGS.seeds,
                                      steps=FLAGS.steps)
  except ValueError as e:
    sys.exit(str(e))
  for run in runs:  # every config checked before anything compiles
    errors = validate_config(run.config)
    if errors:
      sys.exit(f"{run.name}: " + "; ".join(errors))
  command = "python experiments/switch_vs_dense.py " + " ".join(
      shlex.quote(a) for a in sys.argv[1:]
      if not a.startswith(("--workdir", "--report_only")))
  try:
    switch_vs_dense.run_ablation(base, FLAGS.variants, FLAGS.seeds, FLAGS.workdir,
                                 steps=FLAGS.steps, command=command.strip(),
                                 train=not FLAGS.report_only)
  except (ConfigError, TrainingError) as e:
    sys.exit(str(e))


if __name__ == "__main__":
  app.run(main)
