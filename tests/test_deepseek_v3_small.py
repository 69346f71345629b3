"""experiments/configs/deepseek_v3_small.py: DeepSeek-V3's architecture at CPU size.

Its MoE and active FFN FLOPs are deepseek_small's and dense_small's; shrunk further
(width 32, 2 blocks, the same keys otherwise), it trains, resumes exactly after
SIGKILL, gives one device's losses on a 2 x 4 data x expert mesh, and decodes with
its latent cache as its full forward does."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moe_jax.inference import decode
from moe_jax.training import run_state, train
from moe_jax.training.config import set_keys
from moe_jax.training.checkpoint import Checkpointer
from tests.test_train import CONFIGS, HANG_GUARD_S, jit_cache, read_metrics  # pylint: disable=unused-import

pytestmark = pytest.mark.xdist_group("deepseek_v3_small")

# deepseek_v3_small shrunk: 2 blocks (dense, then MoE) of width 32, 8 experts in 4
# groups, a 16-wide latent; MLA, YaRN and MTP stay on.
SHRINK = {"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
          "model.d_ff": 64, "moe.num_experts": 8, "moe.d_ff": 16, "moe.top_k": 2,
          "mla.q_lora_rank": 16, "mla.kv_lora_rank": 16, "mla.qk_nope_head_dim": 8,
          "mla.qk_rope_head_dim": 8, "mla.v_head_dim": 8, "data.seq_len": 32,
          "model.rope_original_max_len": 32, "batch_size": 8, "steps": 6,
          "log_every": 1, "eval_every": 6, "eval_steps": 1, "checkpoint_every": 3,
          "warmup_steps": 1, "sample.length": 0, "progress_bar": False}


def _config(**overrides):
  config = _load("deepseek_v3_small")
  set_keys(config, {**SHRINK, **overrides})
  return config


def test_it_is_deepseek_small_with_mla_yarn_and_mtp_at_dense_ffn_flops():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moe_jax.compare import router_rows  # pylint: disable=import-outside-toplevel
  from moe_jax.models import sizes  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel

  def params(config):
    return sizes.count_params(nnx.eval_shape(lambda: build.make_model(config)))

  v3, ds = _load("deepseek_v3_small"), _load("deepseek_small")
  assert params(v3)["mtp"] > 0
  v3.model.mtp_depth = 0
  # The same MoE as deepseek_small: the same experts and routers in the same blocks.
  assert (params(v3)["experts"], params(v3)["router"]) == (params(ds)["experts"],
                                                           params(ds)["router"])
  # Per block, a token's FFN costs what dense_small's does (3 routed + 1 shared expert
  # of width 256: 1024 hidden units).
  assert (router_rows.ffn_flops_per_token(_load("deepseek_v3_small"))
          == router_rows.ffn_flops_per_token(_load("dense_small")))


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"config_{name}", os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _train_cmd(workdir):
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          f"--config={os.path.join(CONFIGS, 'deepseek_v3_small.py')}",
          f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in SHRINK.items()]]



ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_resumes_exactly_after_sigkill(tmp_path, jit_cache):
  full, killed = tmp_path / "full", tmp_path / "killed"
  done = subprocess.run(_train_cmd(full), capture_output=True, text=True, env=jit_cache,
                        timeout=HANG_GUARD_S, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  proc = subprocess.Popen(_train_cmd(killed), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=jit_cache)
  give_up = time.time() + HANG_GUARD_S
  checkpoints = os.path.join(killed, "checkpoints")
  while time.time() < give_up and proc.poll() is None and not (
      os.path.isdir(checkpoints)
      and Checkpointer(checkpoints, keep=3).all_steps()):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=HANG_GUARD_S)
  again = subprocess.run(_train_cmd(killed), capture_output=True, text=True,
                         env=jit_cache, timeout=HANG_GUARD_S, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  want = {r["step"]: r for r in read_metrics(str(full), "train")}
  got = {r["step"]: r for r in read_metrics(str(killed), "train")}
  assert sorted(got) == sorted(want) == list(range(1, 7))
  for step in range(4, 7):  # trained after the resume
    for key in ("loss", "mtp_loss", "mtp_loss/depth_1"):
      assert got[step][key] == want[step][key], (step, key)


def test_mesh_equals_one_device_and_decodes(tmp_path):
  single, meshed = str(tmp_path / "single"), str(tmp_path / "mesh")
  steps = {"steps": 3, "checkpoint_every": 3, "eval_every": 3}
  train.train_and_evaluate(_config(**steps), single)
  train.train_and_evaluate(_config(**steps, **{"mesh.data": 2, "mesh.expert": 4}),
                           meshed)
  for key in ("loss", "mtp_loss"):
    np.testing.assert_allclose([r[key] for r in read_metrics(meshed, "train")],
                               [r[key] for r in read_metrics(single, "train")],
                               rtol=2e-5)
  model, _, _ = run_state.load_model(single)
  prompts = [[5, 6, 7, 8], [9, 10, 11]]
  cached = decode.generate(model, prompts, 12, max_len=32, temperature=0.0)
  for prompt, new in zip(prompts, cached):
    plain = decode.generate_uncached(model, prompt, 12, temperature=0.0, window=32)
    assert new == plain
