"""Fine-tuning runs (moe_jax/peft/finetune.py, experiments/finetune.py) on tiny models."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax.training.config import set_keys
from moe_jax.layers import lora_adapters
from moe_jax.training import run_state, train
from moe_jax.errors import ConfigError
from moe_jax.training.metrics import read_metrics
from moe_jax.peft import finetune
from tests.test_train import _bias_config, jit_cache, tiny_config  # noqa: F401  (fixture)
from tests.subprocess_env import program_lines

# Its tests share a module-scoped run: one pytest-xdist worker runs them all, so the
# run is made once (--dist loadgroup in pytest.ini).
pytestmark = [pytest.mark.xdist_group("finetune_base_run")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "finetune_lora.py")


def ft_config(**overrides):
  spec = importlib.util.spec_from_file_location("finetune_lora", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  small = {"steps": 6, "log_every": 2, "eval_every": 3, "eval_steps": 1,
           "checkpoint_every": 3, "batch_size": 4, "warmup_steps": 1,
           "finetune.rank": 2, "finetune.alpha": 4.0, "finetune.esft.batches": 2,
           "finetune.esft.top_p": 0.5, "weight_decay": 0.1}
  set_keys(c, {**small, **overrides})
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, jit_cache):  # noqa: F811
  del jit_cache
  workdir = str(tmp_path_factory.mktemp("base"))
  train.train_and_evaluate(tiny_config(steps=4, eval_every=4, checkpoint_every=4,
                                       **{"sample.length": 0,
                                          "moe.num_shared_experts": 1}), workdir)
  return workdir


def _params(workdir, **kw):
  model, _, step = finetune.load_model(workdir, **kw)
  return model, step


def test_lora_run_resumes_exactly(base_run, tmp_path):
  full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
  config = ft_config(**{"finetune.targets": ("router", "experts", "attention")})
  whole = finetune.finetune(config, base_run, full_dir)
  part = finetune.finetune(config, base_run, cut_dir, stop_at_step=4)
  assert part["preempted"] and part["step"] == 4
  rest = finetune.finetune(config, base_run, cut_dir)
  assert rest["step"] == 6
  for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(rest["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = lambda d: [r["loss"] for r in read_metrics(d, "train")]  # noqa: E731
  assert losses(full_dir) == losses(cut_dir)
  evals = read_metrics(full_dir, "eval")
  assert [r["step"] for r in evals] == [0, 3, 6]
  assert "old_eval_loss" in evals[0]
  info = json.load(open(os.path.join(full_dir, "finetune.json")))
  assert info["base_step"] == 4 and info["base_workdir"] == os.path.abspath(base_run)
  assert info["params_trainable"] == info["params_in_optimizer"]


def test_lora_run_trains_adapters_only_and_samples_merged_or_not(base_run, tmp_path):
  workdir = str(tmp_path / "lora")
  finetune.finetune(ft_config(), base_run, workdir)
  base, _, _ = run_state.load_model(base_run)
  adapted, step = _params(workdir, merge=False)
  merged, _ = _params(workdir, merge=True)
  assert step == 6
  # Frozen base parameters are bit-identical; the adapters moved.
  kept = {k: v for k, v in nnx.to_flat_state(nnx.state(adapted, nnx.Param)) if
          not isinstance(v, nnx.LoRAParam)}
  flat_base = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  for path, var in kept.items():
    assert np.asarray(var[...]).tobytes() == np.asarray(flat_base[path][...]).tobytes()
  assert any(float(np.abs(np.asarray(ad.lora_b[...])).max()) > 0
             for *_, ad in lora_adapters.adapters(adapted))
  x = np.arange(32, dtype=np.int32).reshape(1, 32) % 200
  np.testing.assert_allclose(adapted(x, deterministic=True)[0],
                             merged(x, deterministic=True)[0], atol=1e-5)
  # Trainable count: r * (K + N) per adapted weight; experts relu: wi [E, M, H],
  # wo [E, H, M] with E=4, M=32, H=64, r=2 -> 2 * 4 * 2 * (32 + 64) = 1536.
  info = json.load(open(os.path.join(workdir, "finetune.json")))
  assert info["params_trainable"] == 2 * 4 * 2 * (32 + 64)


def test_esft_keeps_frozen_experts_bit_identical_and_resumes_its_plan(base_run,
                                                                       tmp_path):
  workdir = str(tmp_path / "esft")
  config = ft_config(**{"finetune.method": "esft"})  # default targets: none
  part = finetune.finetune(config, base_run, workdir, stop_at_step=3)
  assert part["preempted"]
  first = json.load(open(os.path.join(workdir, "finetune.json")))
  assert finetune.finetune(config, base_run, workdir)["step"] == 6
  info = json.load(open(os.path.join(workdir, "finetune.json")))
  # The resumed run reuses the recorded plan: same shares, same selection.
  assert info == first
  assert info["plan"]["targets"] == []
  recorded = json.load(open(os.path.join(workdir, "config.json")))
  assert recorded["finetune"]["targets"] == []
  selected = np.asarray(info["plan"]["selected"]["1"])
  shares = np.asarray(info["plan"]["shares"]["1"])
  assert shares.sum() == pytest.approx(1.0, abs=1e-5)
  # The selection is the rule applied to the recorded shares.
  from moe_jax.peft import esft  # pylint: disable=import-outside-toplevel
  assert esft.select_experts({1: shares}, 0.5)[1].tolist() == selected.tolist()
  assert 0 < selected.sum() < 4
  tuned, _ = _params(workdir)
  base, _, _ = run_state.load_model(base_run)
  flat_base = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(tuned, nnx.Param)):
    old, new = np.asarray(flat_base[path][...]), np.asarray(var[...])
    if path[-2:] in (("experts", "wi"), ("experts", "wo")):
      for e in range(4):
        same = old[e].tobytes() == new[e].tobytes()
        assert same != bool(selected[e]), (path, e)  # weight decay 0.1 moves trained rows
    else:
      assert old.tobytes() == new.tobytes(), path
  assert info["params_trainable"] == int(selected.sum()) * 2 * 32 * 64


def test_clear_errors(base_run, tmp_path):
  with pytest.raises(ConfigError, match="no training run"):
    finetune.finetune(ft_config(), str(tmp_path / "nothing"), str(tmp_path / "w1"))
  # No --init_from, also when the workdir already records a base run.
  (tmp_path / "w0").mkdir()
  (tmp_path / "w0" / finetune.INFO_FILE).write_text('{"base_workdir": "/x"}')
  for workdir in (tmp_path / "w0", tmp_path / "w00"):
    with pytest.raises(ConfigError, match="--init_from is required"):
      finetune.finetune(ft_config(), None, str(workdir))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(base_run, "config.json")).read())
  with pytest.raises(ConfigError, match="has no checkpoint yet"):
    finetune.finetune(ft_config(), str(empty), str(tmp_path / "w2"))
  with pytest.raises(ConfigError, match="'nope', which is not a target"):
    finetune.finetune(ft_config(**{"finetune.targets": ("nope",)}), base_run,
                      str(tmp_path / "w3"))
  # A target the model lacks: the run's plan refuses it in one line, before training.
  from tests.test_peft import tiny_model  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"finetune": finetune.default_finetune_config()})
  config.finetune.targets = ("experts", "shared_experts")
  with pytest.raises(ConfigError, match="'shared_experts', but its MoE layers have no "
                     "shared experts"):
    finetune.prepare(tiny_model(shared=0), config)
  with pytest.raises(ConfigError, match="finetune.rank=0"):
    finetune.finetune(ft_config(**{"finetune.rank": 0}), base_run, str(tmp_path / "w4"))


def test_targets_default_per_method_and_esft_refuses_experts(tmp_path):
  section = finetune.default_finetune_config()
  assert section.targets is None
  for method, expected in (("lora", ("experts",)), ("esft", ()), ("full", ())):
    section.method = method
    assert finetune.resolved_targets(section) == expected
    assert not finetune.finetune_errors(section)
    config = finetune.run_config(ft_config(**{"finetune.method": method}),
                                 tiny_config(), str(tmp_path))
    assert config.finetune.targets == expected
  # ESFT's threshold: unset, the paper's for the score; config.json records it.
  assert section.esft.top_p is None
  for score, p in (("gate", 0.1), ("token", 0.2)):
    config = finetune.run_config(ft_config(**{"finetune.method": "esft",
                                              "finetune.esft.score": score,
                                              "finetune.esft.top_p": None}),
                                 tiny_config(), str(tmp_path))
    assert config.finetune.esft.top_p == p
  section.method, section.esft.top_p = "esft", 0.0
  assert "finetune.esft.top_p=0.0 must be in (0, 1]" in finetune.finetune_errors(
      section)[0]
  section.esft.top_p = None
  section.method, section.targets = "esft", ("router", "experts")
  (error,) = finetune.finetune_errors(section)
  assert "finetune.targets has 'experts', but under finetune.method='esft'" in error
  section.targets = ("router",)
  assert not finetune.finetune_errors(section)
  section.method = "full"
  assert "has no effect under finetune.method='full'" in finetune.finetune_errors(
      section)[0]
  section.method, section.targets = "lora", ()
  assert "LoRA needs at least one target" in finetune.finetune_errors(section)[0]


def test_finetuning_moves_the_selection_bias_by_the_rule(tmp_path):
  # A DeepSeek-style base (sigmoid top-2 with bias balancing): fine-tuning runs
  # pretraining's step, so the biases keep balancing after each optimizer step. At
  # step 1 the LoRA adapters are zero (B = 0): the model routes as the base, so the
  # step's choice counts are the base model's on the first fine-tuning batch.
  base_dir, workdir = str(tmp_path / "base"), str(tmp_path / "ft")
  train.train_and_evaluate(_bias_config(steps=2, warmup_steps=1, eval_every=2,
                                        checkpoint_every=2), base_dir)
  base, base_config, _ = run_state.load_model(base_dir)
  config = ft_config(steps=1, warmup_steps=0, log_every=1, eval_every=1,
                     checkpoint_every=1)
  finetune.finetune(config, base_dir, workdir)
  run = finetune.run_config(config, base_config, base_dir)
  from moe_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moe_jax.training import losses  # pylint: disable=import-outside-toplevel
  batch = next(data_lib.make_lm_datasets(
      run.data.name, data_dir=run.data.data_dir, seq_len=run.data.seq_len,
      batch_size=run.batch_size, seed=run.seed).train_iter())
  out = base.forward(batch["inputs"], deterministic=False,
                     token_mask=losses.token_mask(batch))
  counts = np.asarray(out.moe_aux[1].metrics["choice_counts"])
  before = np.asarray(base.blocks[1].ffn.selection_bias[...])
  tuned, step = _params(workdir, merge=False)
  after = np.asarray(tuned.blocks[1].ffn.selection_bias[...])
  assert step == 1 and np.any(after != before)
  expected = before + np.float32(0.01) * np.sign(np.mean(counts) - counts)
  np.testing.assert_allclose(after, expected.astype(np.float32), rtol=0, atol=1e-7)


@pytest.mark.slow
def test_cli_runs_and_reports_errors_in_one_line(base_run, tmp_path, jit_cache):  # noqa: F811
  env = dict(jit_cache, PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "finetune.py"),
         f"--config={CONFIG}", "--config.steps=2", "--config.batch_size=4",
         "--config.eval_steps=1", "--config.finetune.rank=2",
         "--config.warmup_steps=1"]
  out = subprocess.run(cmd + [f"--init_from={tmp_path / 'none'}",
                              f"--workdir={tmp_path / 'a'}"], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert len(program_lines(out.stderr)) == 1 and "--init_from" in out.stderr
  workdir = tmp_path / "b"
  out = subprocess.run(cmd + [f"--init_from={base_run}", f"--workdir={workdir}"],
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr
  sample = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sample.py"),
       f"--workdir={workdir}", "--length=8", "--prompt=def "], env=env,
      capture_output=True, text=True, timeout=900)
  assert sample.returncode == 0, sample.stderr
  assert sample.stdout.startswith("def ")
