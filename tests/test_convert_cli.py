"""experiments/convert.py end to end: a Hugging Face directory into a run and back,
bit for bit with its tokenizer, and its failures as one line without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_jax.interop import safetensors_io
from tests.subprocess_env import cpu_env, program_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "olmoe")

pytestmark = pytest.mark.xdist_group("hf_interop")


def _convert(*args, devices=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "convert.py"),
                         *args], capture_output=True, text=True, env=cpu_env(devices),
                        cwd=ROOT, timeout=600, check=False)


def test_into_a_run_and_back_is_bit_exact(tmp_path):
  run, out = tmp_path / "run", tmp_path / "out"
  done = _convert(f"--from_hf={FIXTURE}", f"--workdir={run}")
  assert done.returncode == 0, done.stderr[-2000:]
  for name in ("config.json", "model_info.json", "tokenizer.json", "checkpoints"):
    assert (run / name).exists(), name
  assert '"tokenizer": "hf:tokenizer.json"' in (run / "config.json").read_text()
  done = _convert(f"--to_hf={out}", f"--workdir={run}")
  assert done.returncode == 0, done.stderr[-2000:]
  before, after = safetensors_io.Checkpoint(FIXTURE), safetensors_io.Checkpoint(str(out))
  assert sorted(before.names) == sorted(after.names)
  for name in before.names:
    assert before.read(name).tobytes() == after.read(name).tobytes(), name
  assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
  # Converting into the same run again would overwrite it: refused.
  again = _convert(f"--from_hf={FIXTURE}", f"--workdir={run}")
  assert again.returncode == 1
  assert program_lines(again.stderr) == [
      f"--workdir={str(run)!r} already holds a run; convert into a new directory (or "
      "delete that one)."]


def test_pickle_weights_fail_in_one_line(tmp_path):
  src = tmp_path / "pickled"
  src.mkdir()
  (src / "config.json").write_text(open(os.path.join(FIXTURE, "config.json")).read())
  (src / "pytorch_model.bin").write_bytes(b"never unpickled")
  done = _convert(f"--from_hf={src}", f"--workdir={tmp_path / 'run'}")
  assert done.returncode == 1
  lines = program_lines(done.stderr)
  assert len(lines) == 1 and "pickle-based" in lines[0], done.stderr[-2000:]
  assert "Traceback" not in done.stderr


def test_converted_on_a_mesh_exports_on_one_device(tmp_path):
  """--mesh=2,1,4,1 on 8 devices places the experts over 4 and writes the run from
  the shards; the export, read back onto one device, is the checkpoint bit for bit."""
  source = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2_moe")
  run, out = tmp_path / "run", tmp_path / "out"
  done = _convert(f"--from_hf={source}", f"--workdir={run}", "--mesh=2,1,4,1",
                  devices=8)
  assert done.returncode == 0, done.stderr[-2000:]
  assert '"expert": 4' in (run / "config.json").read_text()
  done = _convert(f"--to_hf={out}", f"--workdir={run}")
  assert done.returncode == 0, done.stderr[-2000:]
  before, after = safetensors_io.Checkpoint(source), safetensors_io.Checkpoint(str(out))
  assert sorted(before.names) == sorted(after.names)
  for name in before.names:
    assert before.read(name).tobytes() == after.read(name).tobytes(), name


@pytest.mark.parametrize("mesh, says", [
    ("2,x,1,1", "must be four integers DATA,FSDP,EXPERT,MODEL"),
    ("3,1,1,1", "the product of the axes must be the 8 devices")])
def test_a_bad_mesh_fails_in_one_line(tmp_path, mesh, says):
  done = _convert(f"--from_hf={FIXTURE}", f"--workdir={tmp_path / 'run'}",
                  f"--mesh={mesh}", devices=8)
  assert done.returncode == 1
  lines = program_lines(done.stderr)
  assert len(lines) == 1 and says in lines[0], done.stderr[-2000:]
  assert not (tmp_path / "run").exists()
