"""The layer benchmark runs end to end on a tiny grid and writes what it measured."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *flags):
  out = tmp_path / "layer.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "moe_layer.py"),
         "--experts=4", "--top_k=1,2", "--capacity_factors=1.0,2.0",
         "--group_sizes=64", "--dispatch=indices,dropless", "--d_model=16",
         "--d_ff=32", "--tokens=512", "--repeats=2", f"--json={out}", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=900)  # a hang guard only
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    return json.load(f), proc.stdout


@pytest.mark.slow
def test_layer_benchmark_rows_and_markdown(tmp_path):
  data, stdout = _run(tmp_path)
  rows = data["rows"]
  # indices: 2 top_k x 2 cf; dropless ignores cf: one row per top_k.
  assert [(r["top_k"], r["capacity_factor"], r["dispatch"]) for r in rows] == [
      (1, 1.0, "indices"), (1, None, "dropless"), (1, 2.0, "indices"),
      (2, 1.0, "indices"), (2, None, "dropless"), (2, 2.0, "indices")]
  measured = ["dense_ms", "moe_ms", "ratio", "dense_page_faults", "moe_page_faults",
              "tokens_per_sec_dense", "tokens_per_sec_moe"]
  for r in rows:  # measured values: only their presence and type are the code's
    for name in measured:
      assert isinstance(r[name], (int, float)), (name, r[name])
    for name in ["dense_bytes", "moe_bytes"]:
      assert r[name] is None or isinstance(r[name], int), (name, r[name])
  assert data["meta"]["tokens"] == 512
  assert "dropless" in stdout
  md = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                    "to_markdown.py"),
                       str(tmp_path / "layer.json")], capture_output=True, text=True,
                      check=True).stdout
  table = [[c.strip() for c in line.strip().strip("|").split("|")]
           for line in md.splitlines() if line.startswith("|")]
  header, rule, body = table[0], table[1], table[2:]
  assert header[:5] == ["E", "K", "cf", "S", "dispatch"] and len(header) == 13
  assert set("".join(rule)) == {"-"}
  # The decided columns, one markdown row per JSON row, in the same order.
  assert [tuple(row[:5]) for row in body] == [
      ("4", "1", "1.0", "64", "indices"), ("4", "1", "-", "64", "dropless"),
      ("4", "1", "2.0", "64", "indices"), ("4", "2", "1.0", "64", "indices"),
      ("4", "2", "-", "64", "dropless"), ("4", "2", "2.0", "64", "indices")]
  for row, r in zip(body, rows):
    assert len(row) == 13
    # The goal is judged at cf 1.0 only; whether it is met depends on the timing.
    assert row[8] in (("met", "**missed**") if r["capacity_factor"] == 1.0 else ("",))
    # The measured cells show the JSON's values, rounded.
    mib = lambda v: "n/a" if v is None else f"{v / 2**20:.0f}"
    assert row[5:8] == [f"{r['dense_ms']:.0f}", f"{r['moe_ms']:.0f}", f"{r['ratio']:.2f}"]
    assert row[9:] == [mib(r["dense_bytes"]), mib(r["moe_bytes"]),
                       f"{r['dense_page_faults']:.0f}", f"{r['moe_page_faults']:.0f}"]


@pytest.mark.slow
def test_layer_benchmark_skips_what_does_not_fit(tmp_path):
  data, stdout = _run(tmp_path, "--max_gib=0")
  assert all("skipped" in r and "GiB" in r["skipped"] for r in data["rows"])
  assert "skipped: needs" in stdout


@pytest.mark.slow
def test_negative_memory_cap_is_refused_before_anything_runs():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "moe_layer.py"),
       "--max_gib=-1"], capture_output=True, text=True, cwd=ROOT, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "--max_gib=-1" in proc.stderr and "non-negative" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_decode_benchmark_writes_every_field(tmp_path):
  # Fields and types only: the values are measurements.
  out, md = tmp_path / "decode.json", tmp_path / "decode.md"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"),
         "--configs=switch_small", "--config_overrides=model.num_layers=2,"
         "model.d_model=16,model.d_ff=32,model.num_heads=2,moe.num_experts=4,"
         "data.seq_len=16", "--batch_sizes=1,2", "--prompt_len=4",
         "--compare_prompt_lens=4", "--new_tokens=2", "--repeats=1",
         "--sample_bytes=20", f"--json={out}", f"--markdown={md}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=900)  # a hang guard only
  assert proc.returncode == 0, proc.stderr[-2000:]
  data = json.loads(out.read_text())
  assert data["meta"]["jax"] and data["meta"]["backend"] == "cpu"
  (row,) = data["rows"]
  assert row["config"] == "switch_small"
  for key in ("weight_bytes_total", "weight_bytes_active_per_token",
              "kv_cache_bytes_per_token", "kv_cache_bytes_per_sequence",
              "step_peak_bytes"):
    assert isinstance(row[key], (int, float)), key
  assert [b["batch"] for b in row["batches"]] == [1, 2]
  for b in row["batches"]:
    for key in ("prefill_tokens_per_sec", "decode_tokens_per_sec", "step_ms"):
      assert isinstance(b[key], float), key
  (cmp,) = row["cached_vs_uncached"]
  assert cmp["prompt_len"] == 4
  for key in ("cached_ms_per_token", "uncached_ms_per_token", "speedup"):
    assert isinstance(cmp[key], float), key
  for key in ("cached_warm_sec", "cached_cold_sec", "uncached_warm_sec",
              "uncached_cold_sec", "speedup_warm", "speedup_cold"):
    assert isinstance(row["sample"][key], float), key
  text = md.read_text()
  assert "| switch_small | 2 |" in text and "uncached ms/token" in text


@pytest.mark.slow
def test_jamba_seq_len_benchmark_writes_every_field(tmp_path):
  # jamba_small's 8-layer pattern at width 16; fields, types and the decided values
  # (lengths, batches, matched parameter counts) only: the rest are measurements.
  out, md = tmp_path / "jamba.json", tmp_path / "jamba.md"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "jamba_seq_len.py"),
         "--config_overrides=model.d_model=16,model.num_heads=2,model.d_ff=32,"
         "moe.num_experts=4,mamba.chunk_size=8", "--seq_lens=32,16",
         "--tokens_per_step=64", "--repeats=1", f"--json={out}", f"--markdown={md}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=900)  # a hang guard only
  assert proc.returncode == 0, proc.stderr[-2000:]
  data = json.loads(out.read_text())
  meta, rows = data["meta"], data["rows"]
  assert meta["config"] == "jamba_small" and meta["expert_d_ff"] == 32
  # The baseline's dense FFNs are widened (in steps of 8) to the hybrid's active
  # parameters: within half a step of 4 dense blocks x 3 SwiGLU matrices x 16 x 8.
  active = meta["params_active"]
  assert meta["baseline_d_ff"] > 32
  assert abs(active["attention"] - active["jamba"]) <= 4 * 3 * 16 * 8 // 2
  assert [(r["seq_len"], r["model"], r["batch_size"]) for r in rows] == [
      (16, "jamba", 4), (16, "attention", 4), (32, "jamba", 2), (32, "attention", 2)]
  for r in rows:
    assert r["params_active"] == active[r["model"]]
    for key in ("step_ms", "tokens_per_sec", "flops_per_token_active"):
      assert isinstance(r[key], (int, float)), key
    assert r["peak_bytes"] is None or isinstance(r["peak_bytes"], int)
  text = md.read_text()
  assert "| 16 | 4 |" in text and "| 32 | 2 |" in text
  assert text.count("Crossing (") == 2
