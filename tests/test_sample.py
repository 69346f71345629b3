"""experiments/sample.py end to end: cached sampling from a tiny checkpoint, batches
from --prompts_file, and one-line errors for bad values."""

import os
import subprocess
import sys

import pytest

from moe_jax.training import train
from tests.test_train import HANG_GUARD_S, tiny_config
from tests.subprocess_env import program_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "experiments", "sample.py")

# Its tests share a module-scoped run: one pytest-xdist worker runs them all, so the run
# is made once (--dist loadgroup in pytest.ini).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sample_workdir")]


def _sample(*flags):
  return subprocess.run([sys.executable, SAMPLE, *flags], capture_output=True,
                        text=True, timeout=HANG_GUARD_S, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sample_run"))
  train.train_and_evaluate(tiny_config(steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1,
                                       log_every=1, **{"sample.length": 0}), workdir)
  return workdir


def test_prompts_file_is_decoded_as_one_batch(workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("KING:\nROMEO:\\nO\n\n", encoding="utf-8")
  out = _sample(f"--workdir={workdir}", f"--prompts_file={prompts}", "--length=40",
                "--temperature=0", "--max_len=16")
  assert out.returncode == 0, out.stderr
  samples = out.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
  assert len(samples) == 3
  assert samples[0].startswith("KING:") and samples[1].startswith("ROMEO:\nO")
  # Greedy, so the batch row equals the same prompt decoded alone.
  alone = _sample(f"--workdir={workdir}", "--prompt=KING:", "--length=40",
                  "--temperature=0", "--max_len=16")
  assert alone.returncode == 0, alone.stderr
  assert alone.stdout.rstrip("\n") == samples[0]


@pytest.mark.parametrize("flag,message", [
    ("--max_len=1", "--max_len=1 must be >= 2"),
    ("--top_p=0", "--top_p=0.0 must be in (0, 1]"),
    ("--length=0", "--length=0 must be >= 1"),
    ("--prompts_file=/nonexistent/prompts.txt", "cannot be read"),
])
def test_bad_values_get_one_line(workdir, flag, message):
  out = _sample(f"--workdir={workdir}", flag)
  assert out.returncode == 1
  assert message in out.stderr and "Traceback" not in out.stderr
  assert len(program_lines(out.stderr)) == 1, out.stderr


def test_learned_positions_refuse_a_longer_cache(tmp_path):
  workdir = str(tmp_path / "learned")
  train.train_and_evaluate(tiny_config(steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1,
                                       log_every=1, **{"sample.length": 0,
                                                       "model.position": "learned"}),
                           workdir)
  out = _sample(f"--workdir={workdir}", "--max_len=64")
  assert out.returncode == 1
  assert "--max_len=64: max_len=64 exceeds the model's 32 learned positions" in out.stderr
  assert "Traceback" not in out.stderr
