"""experiments/curves.py: eval curves against steps, training seconds and FLOPs."""

import csv
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "experiments_curves", os.path.join(ROOT, "experiments", "curves.py"))
curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves)


def _write_run(workdir, lines, flops_router=10):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"batch_size": 2, "data": {"seq_len": 4}}, f)
  with open(os.path.join(workdir, "model_info.json"), "w") as f:
    json.dump({"flops_per_token_active": 100, "flops_per_token_router": flops_router}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(l) + "\n" for l in lines)


def test_curve_by_hand_and_files(tmp_path):
  # 2 x 4 = 8 tokens per step. Train lines: steps 1-2 at 8 tokens/s (2 * 8 / 8 = 2 s),
  # steps 3-4 at 16 tokens/s (2 * 8 / 16 = 1 s): 2 s at step 2, 3 s at step 4, so the
  # eval at step 3 is at 2.5 s. FLOPs: 3 x (100 + 10) x step x 8 = 2640 x step.
  run = str(tmp_path / "mod")
  _write_run(run, [
      {"split": "train", "step": 2, "tokens_per_sec": 8.0},
      {"split": "eval", "step": 3, "eval_loss": 2.0, "eval_loss_stderr": 0.1,
       "eval_tokens": 64},
      {"split": "train", "step": 4, "tokens_per_sec": 16.0},
      {"split": "eval", "step": 4, "eval_loss": 1.5, "eval_loss_stderr": 0.05,
       "eval_tokens": 64, "eval_loss_predictor": 1.6}])
  rows = curves.read_curve("mod", run)
  assert [(r["step"], r["train_sec"], r["train_flops"]) for r in rows] == [
      (3, 2.5, 7920), (4, 3.0, 10560)]
  assert [r["eval_loss_predictor"] for r in rows] == [None, 1.6]
  # A run stopped at step 6, after its last train line (step 4): the last interval's
  # 0.5 s per step carries on, 3 + 2 * 0.5 = 4 s.
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"split": "eval", "step": 6, "eval_loss": 1.4}) + "\n")
  assert curves.read_curve("mod", run)[-1]["train_sec"] == 4.0
  dense = str(tmp_path / "dense")
  _write_run(dense, [{"split": "train", "step": 4, "tokens_per_sec": 8.0},
                     {"split": "eval", "step": 4, "eval_loss": 1.7,
                      "eval_loss_stderr": 0.05, "eval_tokens": 64}], flops_router=0)
  out = tmp_path / "out"
  assert curves.main([f"--runs=mod={run},dense={dense}", f"--out={out}",
                      "--x=train_flops,step"]) == 0
  with open(out / "curves.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["run"], r["step"], r["train_sec"], r["train_flops"]) for r in table] == [
      ("mod", "3", "2.5", "7920"), ("mod", "4", "3.0", "10560"),
      ("mod", "6", "4.0", "15840"),
      ("dense", "4", "4.0", "9600")]  # 4 * 8 / 8 s; 3 * 100 * 4 * 8
  assert table[0]["eval_loss_predictor"] == ""
  assert sorted(os.listdir(out)) == ["curves.csv", "eval_loss_vs_step.png",
                                     "eval_loss_vs_train_flops.png"]
