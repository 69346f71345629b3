"""The tokenizer comparison (moe_jax/compare/tokenizer_grid.py,
experiments/compare_tokenizers.py): the rows differ only in their tokenizer, bytes
per token are hand-computed, and the report ranks on bits per byte at equal steps and
at the interleaved benchmark's equal time.

The whole command (train the BPE, both runs, the report) is run by hand:
``python experiments/compare_tokenizers.py --preset=smoke``; its training and grid
paths are the ones every grid shares (tests/test_compare_deepseek_v3.py).
"""

import json
import os
import sys

import pytest

from moe_jax.compare import grid, runner, tokenizer_grid
from moe_jax.data.tokenizer import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import train_tokenizer  # pylint: disable=wrong-import-position


def _settings(**kw):
  return tokenizer_grid.resolve_settings(
      "cpu_small", configs_dir=CONFIGS, **{"bpe_tokenizer": "bpe_4096/tokenizer.json", **kw})


def test_rows_differ_only_in_the_tokenizer():
  runs = tokenizer_grid.build_grid(_settings())
  assert [r.name for r in runs] == ["byte_s0", "bpe_s0", "byte_s1", "bpe_s1"]
  byte, bpe = runs[0].config.to_dict(), runs[1].config.to_dict()
  assert byte["data"].pop("tokenizer") == "byte"
  # Relative to the run's directory WORKDIR/runs/NAME: the configs name no absolute path.
  assert bpe["data"].pop("tokenizer") == "hf:../../bpe_4096/tokenizer.json"
  assert byte == bpe
  assert runs[0].config.steps == 600 and runs[0].config.moe.num_experts == 8


def test_settings_errors():
  with pytest.raises(ValueError, match="bpe_tokenizer is unset"):
    tokenizer_grid.resolve_settings("cpu_small", configs_dir=CONFIGS)
  with pytest.raises(ValueError, match="--bpe_vocab_size=200"):
    _settings(bpe_vocab_size=200)


def test_bytes_per_token_hand_computed(tmp_path):
  # Two merges on "abababab": (a, b) then (ab, ab); the word is then 2 tokens of 4 bytes.
  path = train_tokenizer.train_bpe(["abababab"] * 50, 260, str(tmp_path))
  vocab, bpt = tokenizer_grid.vocab_and_bytes_per_token(f"hf:{path}", ["abababab"])
  assert (vocab, bpt) == (260, 4.0)
  vocab, bpt = tokenizer_grid.vocab_and_bytes_per_token("byte", ["abababab", "é"])
  assert bpt == 1.0 and vocab >= 256


def _fake_run(workdir, run, bpb, tokens_per_sec):
  """A finished run's files: evals at steps 300 and 600 with bits per byte ``bpb``."""
  rdir = runner.run_dir(workdir, run)
  os.makedirs(rdir, exist_ok=True)
  lines = [{"split": "train", "step": s, "tokens_per_sec": tokens_per_sec,
            "dropped_fraction": 0.0, "elapsed_sec": s / 10} for s in (300, 600)]
  lines += [{"split": "eval", "step": s, "eval_loss": 2 * b, "eval_bits_per_byte": b,
             "eval_loss_stderr": 0.01} for s, b in zip((300, 600), bpb)]
  with open(os.path.join(rdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(l) + "\n" for l in lines)
  with open(os.path.join(rdir, "model_info.json"), "w", encoding="utf-8") as f:
    json.dump({"params_total": 10, "params_active": 5, "flops_per_token_active": 100}, f)


def test_report_ranks_on_bits_per_byte_at_the_benchmarks_equal_time(tmp_path):
  """Training throughput says the BPE run is as fast as bytes; the interleaved
  benchmark says it is half as fast, and the equal-time budget follows the benchmark:
  bytes finish 600 steps in 600 s, the BPE reaches step 300 at 600 s."""
  train_tokenizer.train_bpe(["to be or not to be"] * 20, 300, str(tmp_path / "bpe"))
  settings = _settings(seeds=1, bpe_tokenizer="bpe/tokenizer.json")
  runs = tokenizer_grid.build_grid(settings)
  _fake_run(tmp_path, runs[0], (2.0, 1.5), 2048.0)  # byte
  _fake_run(tmp_path, runs[1], (1.6, 1.2), 2048.0)  # bpe
  with open(tmp_path / runner.BENCH_FILE, "w", encoding="utf-8") as f:
    json.dump({"byte": [2048.0, 2048.0, 1900.0], "bpe": [1024.0, 1024.0, 1100.0]}, f)
  out = grid.write_outputs(tokenizer_grid.GRID, str(tmp_path), runs, settings, {})
  by = {r["row"]: r for r in out["rows"]}
  assert by["byte"]["equal_time_sec"] == pytest.approx(600.0)
  assert by["byte"]["bits_per_byte_at_equal_time"] == pytest.approx(1.5)
  assert by["bpe"]["bits_per_byte_at_equal_time"] == pytest.approx(1.6)
  # The few merges a short text allows: the tokenizer's own vocabulary, not the ask.
  assert by["bpe"]["vocab_size"] == make_tokenizer(
      f"hf:{tmp_path / 'bpe' / 'tokenizer.json'}").vocab_size < 300
  md = (tmp_path / "report.md").read_text(encoding="utf-8")
  assert "- At equal steps: BPE 1.2000 against bytes 1.5000" in md
  assert "-0.3000" in md and "BPE lower" in md
  assert "- At equal time (600 s): BPE 1.6000 against bytes 1.5000" in md
  assert "+0.1000" in md and "bytes lower" in md
  assert (tmp_path / "bits_per_byte.png").stat().st_size > 0


def test_the_benchmark_reads_a_run_s_relative_tokenizer(tmp_path):
  """The interleaved benchmark builds each model as its run did: the BPE row's
  tokenizer path is relative to the run's directory, not to the current one."""
  train_tokenizer.train_bpe(["to be or not to be"] * 20, 300, str(tmp_path / "bpe"))
  settings = tokenizer_grid.resolve_settings(
      "smoke", configs_dir=CONFIGS, bpe_tokenizer="bpe/tokenizer.json")
  bpe = [r for r in tokenizer_grid.build_grid(settings) if r.row == "bpe"]
  out = runner.measure_throughput(bpe, steps=1, rounds=1, log=lambda _: None,
                                  workdir=str(tmp_path))
  assert list(out) == ["bpe"] and out["bpe"][0] > 0
