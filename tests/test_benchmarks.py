"""The layer benchmark runs end to end on a tiny grid and writes what it measured."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import experts, moe_config, moe_layer, projection
from moe_jax.models import model_config, transformer
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _load_benchmark_module(name):
  """``benchmarks/NAME.py`` as a module, without putting benchmarks/ on sys.path (its
  ``configs.py`` would shadow the ``configs`` package of experiments/ for other tests)."""
  spec = importlib.util.spec_from_file_location(
      f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


einsum_forms = _load_benchmark_module("einsum_forms")


def _run_benchmark(script, *flags):
  """Runs ``benchmarks/SCRIPT`` with ``flags`` on one CPU device (no fake devices);
  returns its stdout. These runs check what a benchmark writes, never its timings, so
  they compile without LLVM's optimisation passes, as the in-process tests do."""
  env = cpu_env()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script),
                         *flags], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=900)  # a hang guard only
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def _refused(script, *flags, timeout=300):
  """Runs ``benchmarks/SCRIPT`` with bad ``flags``; asserts it fails without a
  traceback and returns its stderr."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script),
                         *flags], capture_output=True, text=True, env=cpu_env(),
                        cwd=ROOT, timeout=timeout)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  return proc.stderr


def _run(tmp_path, *flags):
  out = tmp_path / "layer.json"
  stdout = _run_benchmark(
      "moe_layer.py",
      "--experts=4", "--top_k=1,2", "--capacity_factors=1.0,2.0",
      "--group_sizes=64", "--dispatch=indices,dropless", "--d_model=16",
      "--d_ff=32", "--tokens=512", "--repeats=2", f"--json={out}", *flags)
  with open(out) as f:
    return json.load(f), stdout


def test_expert_ffn_benchmark_writes_a_row_per_expert_count(tmp_path):
  out = tmp_path / "experts.json"
  _run_benchmark("expert_ffn.py", "--experts=1,4", "--d_model=16", "--d_ff=32",
                 "--tokens=64", "--repeats=1", f"--json={out}")
  data = json.loads(out.read_text())
  assert [(r["num_experts"], r["rows_per_expert"]) for r in data["rows"]] == [
      (1, 64), (4, 16)]
  for r in data["rows"]:
    assert r["experts_ms"] > 0 and r["dense_ms"] > 0
    assert isinstance(r["experts_over_dense"], float)
  assert data["meta"]["tokens"] == 64


def test_config_overrides_are_cast_to_the_replaced_type_or_refused():
  from absl import app  # pylint: disable=import-outside-toplevel
  load_config = _load_benchmark_module("configs").load_config
  config = load_config("switch_small", ["progress_bar=False", "model.d_model=64",
                                        "learning_rate=2e-3"])
  assert config.progress_bar is False  # not bool("False"), which is True
  assert config.model.d_model == 64 and config.learning_rate == 2e-3
  assert load_config("switch_small", ["progress_bar=TRUE"]).progress_bar is True
  for item, message in [
      ("progress_bar=no", "'progress_bar=no': the value must be true or false."),
      ("model.d_model=x", "'model.d_model=x': the value must be of type int."),
      ("model.nope=1", "'model.nope=1': switch_small has no key 'model.nope'."),
      ("steps", "'steps': write it as KEY=VALUE.")]:
    with pytest.raises(app.UsageError) as e:
      load_config("switch_small", [item])
    assert str(e.value) == message


def test_expert_ffn_benchmark_refuses_an_uneven_split_and_no_tokens():
  stderr = _refused("expert_ffn.py", "--experts=3", "--tokens=64")
  assert "--experts=3" in stderr and "divide --tokens=64" in stderr
  assert "--tokens" in _refused("expert_ffn.py", "--tokens=0")


@pytest.mark.slow
def test_layer_benchmark_rows_and_markdown(tmp_path):
  data, stdout = _run(tmp_path)
  rows = data["rows"]
  # indices: 2 top_k x 2 cf; dropless ignores cf: one row per top_k.
  assert [(r["top_k"], r["capacity_factor"], r["dispatch"]) for r in rows] == [
      (1, 1.0, "indices"), (1, None, "dropless"), (1, 2.0, "indices"),
      (2, 1.0, "indices"), (2, None, "dropless"), (2, 2.0, "indices")]
  measured = ["dense_ms", "dense_einsum_ms", "moe_ms", "ratio", "ratio_vs_dense_einsum",
              "dense_page_faults", "moe_page_faults", "tokens_per_sec_dense",
              "tokens_per_sec_dense_einsum", "tokens_per_sec_moe"]
  for r in rows:  # measured values: only their presence and type are the code's
    for name in measured:
      assert isinstance(r[name], (int, float)), (name, r[name])
    for name in ["dense_bytes", "dense_einsum_bytes", "moe_bytes"]:
      assert r[name] is None or isinstance(r[name], int), (name, r[name])
  assert data["meta"]["tokens"] == 512
  assert data["meta"]["dense"].startswith("DenseFfn: 2-D matmuls")
  assert data["meta"]["dense_einsum"].startswith("einsum")
  assert "dropless" in stdout and "dense_einsum / dense: median" in stdout
  body = _check_markdown(tmp_path / "layer.json")
  # The decided columns, one markdown row per JSON row, in the same order.
  assert [tuple(row[:5]) for row in body] == [
      ("4", "1", "1.0", "64", "indices"), ("4", "1", "-", "64", "dropless"),
      ("4", "1", "2.0", "64", "indices"), ("4", "2", "1.0", "64", "indices"),
      ("4", "2", "-", "64", "dropless"), ("4", "2", "2.0", "64", "indices")]
  for row, r in zip(body, rows):
    # The goal is judged at cf 1.0 only; whether it is met depends on the timing.
    assert row[10] in (("met", "**missed**") if r["capacity_factor"] == 1.0 else ("",))
    # The measured cells show the JSON's values, rounded.
    assert row[5:10] == [f"{r['dense_ms']:.0f}", f"{r['dense_einsum_ms']:.0f}",
                         f"{r['moe_ms']:.0f}", f"{r['ratio']:.2f}",
                         f"{r['ratio_vs_dense_einsum']:.2f}"]
    assert row[11:] == [_mib(r["dense_bytes"]), _mib(r["moe_bytes"]),
                        f"{r['dense_page_faults']:.0f}", f"{r['moe_page_faults']:.0f}"]


HEADER = ["E", "K", "cf", "S", "dispatch", "dense ms", "dense einsum ms", "MoE ms",
          "ratio", "ratio vs einsum dense", "goal", "dense MiB", "MoE MiB",
          "dense faults", "MoE faults"]


def _mib(v):
  return "n/a" if v is None else f"{v / 2**20:.0f}"


def _check_markdown(path):
  """Runs to_markdown.py on ``path``; checks the header; returns the body's cells."""
  md = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                    "to_markdown.py"), str(path)],
                      capture_output=True, text=True, check=True).stdout
  table = [[c.strip() for c in line.strip().strip("|").split("|")]
           for line in md.splitlines() if line.startswith("|")]
  header, rule, body = table[0], table[1], table[2:]
  assert header == HEADER
  assert len(rule) == len(HEADER) and set("".join(rule)) == {"-"}
  assert all(len(row) == len(HEADER) for row in body), body
  return body


def test_markdown_of_hand_written_rows_new_and_old(tmp_path):
  # Hand-written JSON: every cell below is decided by to_markdown.py alone.
  meta = dict(backend="cpu", device="cpu", jax="0", d_model=4, d_ff=8, tokens=16,
              dtype="float32", repeats=1)
  row = dict(num_experts=8, top_k=1, capacity_factor=1.0, group_size=16,
             dispatch="indices", dense_ms=100.0, dense_einsum_ms=140.0, moe_ms=130.0,
             ratio=1.3, ratio_vs_dense_einsum=0.93, dense_bytes=2**21,
             dense_einsum_bytes=2**21, moe_bytes=3 * 2**20, dense_page_faults=10.0,
             moe_page_faults=20.0)
  path = tmp_path / "new.json"
  path.write_text(json.dumps(dict(meta=dict(meta, dense="d2", dense_einsum="de"),
                                  rows=[row, dict(row, top_k=2, ratio=2.5)])))
  # 1.3 > 1.25 misses the top-1 goal; 2.5 > 2.4 misses the top-2 one.
  assert _check_markdown(path) == [
      ["8", "1", "1.0", "16", "indices", "100", "140", "130", "1.30", "0.93",
       "**missed**", "2", "3", "10", "20"],
      ["8", "2", "1.0", "16", "indices", "100", "140", "130", "2.50", "0.93",
       "**missed**", "2", "3", "10", "20"]]
  # A JSON written before the two baselines: no einsum column, no faults.
  old = {k: v for k, v in row.items()
         if k not in ("dense_einsum_ms", "ratio_vs_dense_einsum", "dense_einsum_bytes",
                      "dense_page_faults", "moe_page_faults")}
  path = tmp_path / "old.json"
  path.write_text(json.dumps(dict(meta=meta, rows=[dict(old, ratio=1.2),
                                                   dict(old, skipped="too big")])))
  assert _check_markdown(path) == [
      ["8", "1", "1.0", "16", "indices", "100", "n/a", "130", "1.20", "n/a", "met",
       "2", "3", "n/a", "n/a"],
      ["8", "1", "1.0", "16", "indices", "skipped: too big"] + [""] * 9]


def _unbatched_dot_operands(text):
  """The operand types, e.g. ("16x8xf32", "8x16xf32"), of every dot_general without
  batch axes in StableHLO ``text``."""
  found = []
  for line in text.splitlines():
    if "dot_general" in line and "batching_dims" not in line:
      found.append(re.search(r": \(tensor<([^>]*)>, tensor<([^>]*)>\)", line).groups())
  return found


def test_einsum_forms_compute_the_same_model_with_n_d_dots_and_are_undone():
  # Every projection einsum_forms swaps: the dense FFN (block 0), experts through the
  # einsum dispatch with swiglu (wi_gate), a noisy router (block 1), the unembedding.
  moe = moe_config.MoeConfig(d_model=8, d_ff=16, num_experts=4, capacity_factor=2.0,
                            group_size=8, dispatch="einsum", activation="swiglu",
                            router="noisy_topk", init_scale=0.1, router_init_scale=0.1)
  cfg = model_config.TransformerConfig(vocab_size=32, num_layers=2, d_model=8,
                                      num_heads=2, d_ff=16, moe_every=2, moe=moe,
                                      activation="swiglu", max_len=16)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens, deterministic=True)
    return jnp.mean(logits ** 2)

  def run():
    step = jax.jit(jax.value_and_grad(loss))
    return step(params), step.lower(params).as_text()

  experts_call = experts.Experts.__call__
  new, new_text = run()
  with einsum_forms.einsum_forms():
    old, old_text = run()
  # The forward dots on the 2 x 8 = 16 token rows: the dense FFN [16, 8] x [8, 16], the
  # router [16, 8] x [8, 4] and the unembedding [16, 8] x [8, 32] are 2-D in the
  # model; the former forms hand XLA [2, 8, 8] activations instead.
  rows_2d = {("16x8xf32", "8x16xf32"), ("16x8xf32", "8x4xf32"), ("16x8xf32", "8x32xf32")}
  assert rows_2d <= set(_unbatched_dot_operands(new_text))
  assert not rows_2d & set(_unbatched_dot_operands(old_text))
  n_d = lambda text: sum(a.count("x") > 2 for a, _ in _unbatched_dot_operands(text))
  assert n_d(old_text) > n_d(new_text)  # attention's q/k/v/o stay N-D in both
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Leaving the context restores the model's own forms.
  assert (experts.project is moe_layer.project is transformer.project
          is projection.project)
  assert experts.Experts.__call__ is experts_call


@pytest.mark.slow
def test_layer_benchmark_skips_what_does_not_fit(tmp_path):
  data, stdout = _run(tmp_path, "--max_gib=0")
  assert all("skipped" in r and "GiB" in r["skipped"] for r in data["rows"])
  assert "skipped: needs" in stdout


@pytest.mark.slow
def test_negative_memory_cap_is_refused_before_anything_runs():
  stderr = _refused("moe_layer.py", "--max_gib=-1", timeout=900)
  assert "--max_gib=-1" in stderr and "non-negative" in stderr


@pytest.mark.slow
def test_decode_benchmark_writes_every_field(tmp_path):
  # Fields and types only: the values are measurements.
  out, md = tmp_path / "decode.json", tmp_path / "decode.md"
  _run_benchmark(
      "decode.py",
      "--configs=switch_small", "--config_overrides=model.num_layers=2,"
      "model.d_model=16,model.d_ff=32,model.num_heads=2,moe.num_experts=4,"
      "data.seq_len=16", "--batch_sizes=1,2", "--prompt_len=4",
      "--compare_prompt_lens=4", "--new_tokens=2", "--repeats=1",
      "--sample_bytes=20", f"--json={out}", f"--markdown={md}")
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


def test_mla_decode_benchmark_reads_the_cache_off_the_models(tmp_path):
  # Cache values per token and block, by hand: deepseek_v3_small's MLA 64 + 32,
  # deepseek_small's attention 2 x 4 heads x 64; V3-671B's 512 + 64 against 2 x 128 x
  # 128. Timings are only checked to be there.
  out, md = tmp_path / "mla.json", tmp_path / "mla.md"
  _run_benchmark("mla_decode.py", "--cache_lens=6", "--new_tokens=2", "--repeats=1",
                 "--batch=2", "--full_size_layers=4", f"--json={out}", f"--markdown={md}")
  data = json.loads(out.read_text())
  values = [r["values_per_token_per_block"] for r in data["cache"]]
  assert values == [96, 512, 576, 32768]
  assert [r["bytes_per_token_per_block"] for r in data["cache"]] == [
      4 * v for v in values]  # float32 caches
  assert data["cache"][0]["cache_variables"] == ["cached_latent", "cached_rope_key"]
  (group,) = data["speed"]
  assert [r["model"] for r in group] == ["MLA absorbed", "MLA expanded",
                                         "MHA (deepseek_small)"]
  for r in group:
    assert r["cache_len"] == 6 and isinstance(r["decode_tokens_per_sec"], float)
  assert "56.9x smaller" in md.read_text()


@pytest.mark.slow
def test_decode_benchmark_measures_a_trained_run(tmp_path):
  # A 2-step mod_small run shrunk to width 16; --workdirs loads its checkpoint and its
  # config (4 blocks from the run, not the config file's 8).
  from moe_jax.training import train  # pylint: disable=import-outside-toplevel
  config = _load_benchmark_module("configs").load_config("mod_small", [
      "model.num_layers=4", "model.d_model=16", "model.d_ff=32", "model.num_heads=2",
      "data.seq_len=16", "batch_size=2", "steps=2", "warmup_steps=1", "eval_every=2",
      "eval_steps=1",
      "sample.length=0", "progress_bar=False"])
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  out = tmp_path / "decode.json"
  _run_benchmark(
      "decode.py", "--configs=mod_small", f"--workdirs=mod_small={workdir}",
      "--batch_sizes=1", "--prompt_len=4", "--compare_prompt_lens=4",
      "--new_tokens=2", "--repeats=1", "--sample_bytes=0", f"--json={out}")
  (row,) = json.loads(out.read_text())["rows"]
  assert row["weights"] == "trained, step 2"
  # 4 blocks x 2 (K, V) x 16 x 4 bytes of cache per token, plus a 4-byte position
  # per block: 528 bytes, against 1040 for the config file's 8 blocks.
  assert row["kv_cache_bytes_per_token"] == 4 * 2 * 16 * 4 + 4 * 4


def test_decode_benchmark_refuses_a_bad_workdirs_pair():
  stderr = _refused("decode.py", "--configs=dense_small",
                    "--workdirs=mod_small=/nonexistent")
  assert "'mod_small' is not one of --configs" in stderr


@pytest.mark.slow
def test_jamba_seq_len_benchmark_writes_every_field(tmp_path):
  # jamba_small at width 16 and half its depth (4 layers: Mamba, Mamba + MoE,
  # attention, Mamba + MoE); fields, types and the decided values (lengths, batches,
  # matched parameter counts) only: the rest are measurements.
  out, md = tmp_path / "jamba.json", tmp_path / "jamba.md"
  _run_benchmark(
      "jamba_seq_len.py",
      "--config_overrides=model.d_model=16,model.num_heads=2,model.d_ff=32,"
      "moe.num_experts=4,mamba.chunk_size=8,model.num_layers=4,"
      "model.attn_layer_period=4,model.attn_layer_offset=2", "--seq_lens=32,16",
      "--tokens_per_step=64", "--repeats=1", f"--json={out}", f"--markdown={md}",
      f"--png={tmp_path / 'jamba.png'}")
  assert (tmp_path / "jamba.png").stat().st_size > 0
  data = json.loads(out.read_text())
  meta, rows = data["meta"], data["rows"]
  assert meta["config"] == "jamba_small" and meta["expert_d_ff"] == 32
  # The baseline's dense FFNs are widened (in steps of 8) to the hybrid's active
  # parameters: within half a step of 2 dense blocks x 3 SwiGLU matrices x 16 x 8.
  active = meta["params_active"]
  assert meta["baseline_d_ff"] > 32
  assert abs(active["attention"] - active["jamba"]) <= 2 * 3 * 16 * 8 // 2
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
  # --from_json measures nothing and writes the same table.
  md2 = tmp_path / "again.md"
  _run_benchmark("jamba_seq_len.py", f"--from_json={out}", f"--markdown={md2}")
  assert md2.read_text() == text


TINY_MODEL = ("model.num_layers=2,model.d_model=16,model.d_ff=32,model.num_heads=2,"
              "moe.num_experts=4,data.seq_len=16,batch_size=2")


@pytest.mark.slow
def test_train_throughput_times_both_projection_forms(tmp_path):
  out = tmp_path / "train.json"
  _run_benchmark(
      "train_throughput.py",
      "--forms=2d,einsum", "--repeats=1", f"--config_overrides={TINY_MODEL}",
      f"--json={out}")
  rows = json.loads(out.read_text())["rows"]
  configs = ["dense_small", "switch_small", "top2_small"]
  assert [(r["config"], r["form"]) for r in rows] == (
      [(c, "2d") for c in configs] + [(c, "einsum") for c in configs])
  for r in rows:  # measured values: presence and type only
    for key in ("step_ms", "tokens_per_sec", "throughput_vs_dense"):
      assert isinstance(r[key], float), key
    assert ("einsum_over_2d" in r) == (r["form"] == "einsum")
  # Each form is against its own dense model: dense/dense is 1 in every round.
  assert [r["throughput_vs_dense"] for r in rows if r["config"] == "dense_small"] == [
      1.0, 1.0]


@pytest.mark.slow
def test_matmul_forms_benchmark_checks_every_case(tmp_path):
  out = tmp_path / "forms.json"
  _run_benchmark(
      "matmul_forms.py",
      "--sizes=tiny", "--repeats=1", f"--json={out}")
  rows = json.loads(out.read_text())["rows"]
  assert [r["case"] for r in rows] == [
      "dense_ffn", "attention_qkv", "attention_out", "unembed", "mamba_in_proj",
      "mamba_x_proj", "router_E4", "experts_E4"]
  for r in rows:
    assert r["max_rel_diff"] < 1e-5, r  # the two forms compute the same values
    assert isinstance(r["einsum_over_2d"], float)
    # Compiler-decided: the 2-D form's step has no transposed copy of its operands.
    assert r["matmul_2d_transposes"] == 0 and isinstance(r["einsum_transposes"], int)


@pytest.mark.slow
def test_mamba_scan_benchmark_writes_every_pair(tmp_path):
  out = tmp_path / "scan.json"
  stdout = _run_benchmark(
      "mamba_scan.py", "--batch=2", "--length=12", "--d_inner=8", "--d_state=4",
      "--chunk_sizes=5,16", "--repeats=1", f"--json={out}")
  data = json.loads(out.read_text())
  assert [(r["scan"], r["chunk_size"]) for r in data["rows"]] == [
      ("associative", 5), ("associative", 16), ("sequential", 5), ("sequential", 16)]
  assert min(r["vs_fastest"] for r in data["rows"]) == 1.0
  assert data["meta"]["length"] == 12 and "| sequential | 16 |" in stdout
