"""The README's multi-device commands run as printed on the 8 fake CPU devices.

The commands are read from README.md, not copied here, so an edit to the README is
what gets run. Only the length of the run is cut (appended ``--config.steps=2`` and
friends) and the work directory is a temporary one; the config and the mesh are the
README's, and so is the batch except in the two-process run (whose printed batch is
checked by the config validation instead).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.multiprocess import run_two_processes
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.steps=2", "--config.warmup_steps=1", "--config.log_every=1",
         "--config.eval_every=2", "--config.eval_steps=1", "--config.checkpoint_every=2",
         "--config.sample.length=0", "--config.progress_bar=False"]


def readme_commands() -> list[list[str]]:
  """Every ``python experiments/train.py`` command in README.md's bash blocks."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith("python experiments/train.py"):
        commands.append(shlex.split(line))
  return commands


def _with_workdir(argv, workdir):
  return [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in argv]


def _env(devices):
  return cpu_env(devices, PYTHONPATH=ROOT)


def _eval_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [l for l in map(json.loads, f) if l["split"] == "eval"]


def test_readme_lists_the_mesh_commands():
  mesh = [c for c in readme_commands() if any(a.startswith("--config.mesh.") for a in c)]
  single = [c for c in mesh if "--config.distributed=True" not in c]
  multi = [c for c in mesh if "--config.distributed=True" in c]
  assert single and multi, readme_commands()


@pytest.mark.slow
def test_single_host_mesh_command_runs_as_printed(tmp_path):
  commands = [c for c in readme_commands()
              if any(a.startswith("--config.mesh.") for a in c)
              and "--config.distributed=True" not in c]
  for i, argv in enumerate(commands):
    workdir = tmp_path / f"run{i}"
    argv = [sys.executable] + _with_workdir(argv, workdir)[1:] + SHORT
    out = subprocess.run(argv, cwd=ROOT, env=_env(8), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, (argv, out.stdout[-2000:], out.stderr[-3000:])
    assert _eval_lines(workdir)[-1]["step"] == 2


def _printed_config(argv):
  """The config a README command builds, parsed as experiments/train.py parses it: its
  ``--config`` file and ``--config.*`` overrides through ml_collections' config flag,
  on a flag set of its own (the other flags, such as ``--workdir``, are left out)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  args = [argv[0]]
  for a in argv[1:]:
    if a.startswith("--config="):  # the README's path is relative to the repo root
      a = "--config=" + os.path.join(ROOT, a[len("--config="):])
    if a.startswith("--config"):
      args.append(a)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                  flag_values=values, lock_config=True, sys_argv=args)
  values(args)
  return values.config


def test_multi_host_command_config_is_valid_as_printed():
  # The recipe's own batch (256 over 2 processes x 8 devices) passes every check the
  # train CLI makes before compiling; the two-process run below uses a smaller batch.
  from moe_jax.training.config import validate_config  # pylint: disable=import-outside-toplevel

  argv = next(c for c in readme_commands() if "--config.distributed=True" in c)
  config = _printed_config(argv)
  assert config.batch_size == 256 and config.distributed
  assert validate_config(config, num_devices=16, process_count=2) == []
  config.batch_size = 100  # and the check is live: 100 rows do not split over 16
  errors = validate_config(config, num_devices=16, process_count=2)
  assert len(errors) == 1 and "global batch size 100" in errors[0], errors


@pytest.mark.slow
def test_multi_host_command_runs_as_printed_on_two_processes(tmp_path):
  # The GPU-cluster recipe (2 nodes x 8 devices) as two local processes with 8 fake
  # devices each; the coordinator is on the loopback address instead of 10.0.0.1.
  # Its batch of 256 rows is cut to 32 (2 per device), like its steps: on two CPU
  # cores the full batch makes the test about 1.5x as long, and the test above checks
  # that the printed batch is valid on this mesh.
  argv = next(c for c in readme_commands() if "--config.distributed=True" in c)
  def launch(pid, port, attempt):
    env = _env(8)
    env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(pid)})
    cmd = [sys.executable] + _with_workdir(argv, tmp_path / f"multi{attempt}")[1:] + [
        "--config.steps=1", "--config.warmup_steps=0", "--config.log_every=1",
        "--config.eval_every=1", "--config.eval_steps=1", "--config.checkpoint_every=1",
        "--config.sample.length=0", "--config.progress_bar=False",
        "--config.batch_size=32"]
    return cmd, env, ROOT

  attempt, runs = run_two_processes(launch)
  for returncode, out in runs:
    assert returncode == 0, out[-3000:]
  assert [l["step"] for l in _eval_lines(tmp_path / f"multi{attempt}")] == [1]
