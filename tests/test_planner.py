"""The AOT planner: steps compiled for TPU and GPU topologies on this CPU host.

libtpu and the CUDA plugin (the test extra installs both) give compile-only devices;
nothing here runs on an accelerator. The configs are the small ones: full sizes are
compiled by the report command, not by the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.errors import ConfigError
from moe_jax.parallel import sharding
from moe_jax.planner import compile as planner
from moe_jax.planner import hlo, memory_report, scale_report
from moe_jax.planner.targets import make_target, parse_target
from moe_jax.training.config import load_config_file, set_keys
from tests.subprocess_env import cpu_env, program_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
PLAN = os.path.join(ROOT, "experiments", "plan.py")
KEYS = ("target", "devices", "mesh", "mode", "compile_s", "fits", "bytes_per_device",
        "flops_per_step", "flops_per_step_model", "tokens_per_step", "step_s_bound",
        "mfu_bound", "collectives", "params_total", "params_active")



def _config(name, **overrides):
  return set_keys(load_config_file(os.path.join(CONFIGS, f"{name}.py")), overrides)


@pytest.mark.parametrize("spec,words", [
    ("v9:2x2", "unknown chip 'v9'"), ("v5e:2", "bad topology '2'"),
    ("h100:8", "HOSTSxGPUS"), ("v5p:4x4", "3-D"), ("h100:0x8", ">= 1")])
def test_bad_targets_are_refused_in_one_line_before_anything_loads(spec, words):
  with pytest.raises(ConfigError) as e:
    parse_target(spec)
  assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_serving_sizes_are_refused_before_anything_compiles():
  with pytest.raises(ConfigError, match="--serve_batch=0"):
    planner.plan(_config("switch_small"), make_target("h100:1x1"), mode="serve",
                 serve_batch=0)
  with pytest.raises(ConfigError, match="--serve_chunk=100 must divide the context 256"):
    planner.plan(_config("switch_small"), make_target("h100:1x1"), mode="serve",
                 serve_len=256, serve_chunk=100)


def test_the_mesh_fills_the_devices_with_data_parallelism():
  config = _config("switch_small", **{"mesh.expert": 2})
  assert planner.resolve_mesh(config, 8) == {"data": 4, "fsdp": 1, "expert": 2,
                                             "model": 1}
  with pytest.raises(planner.PlanError, match="does not divide"):
    planner.resolve_mesh(_config("switch_small", **{"mesh.expert": 3}), 8)


def test_make_mesh_lays_out_axes_that_do_not_factor_the_torus():
  # jax.make_mesh refuses 8 x 8 on v5p's 4x4x4 torus (NotImplementedError).
  devices = make_target("v5p:4x4x4").devices
  mesh = sharding.make_mesh(8, 8, 1, devices=devices)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "expert": 8, "model": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_hlo_counts_a_scanned_loop_as_often_as_it_runs():
  devices = make_target("v5p:2x2x1").devices
  mesh = jax.sharding.Mesh(devices, ("x",))
  w = jax.ShapeDtypeStruct((6, 256, 256), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, None, "x")))
  x = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))

  def scanned(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

  def unrolled(w, x):
    for i in range(w.shape[0]):
      x = jnp.tanh(x @ w[i])
    return x.sum()

  counts = {}
  for f in (scanned, unrolled):
    compiled = jax.jit(f).lower(w, x).compile()
    counts[f.__name__] = hlo.analyze(compiled.as_text())
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    counts[f.__name__ + "_xla"] = xla["flops"]
  ideal = 6 * 2 * 128 * 256 * 256 / 4  # per device
  assert counts["scanned"].flops == pytest.approx(ideal, rel=0.01)
  assert counts["unrolled"].flops == pytest.approx(ideal, rel=0.01)
  # XLA's own count agrees where there is no loop (it adds the elementwise work) and
  # counts the loop body once.
  assert counts["unrolled_xla"] == pytest.approx(ideal, rel=0.05)
  assert counts["scanned_xla"] < ideal / 3
  # One gather per layer either way (XLA may pick a different operand to gather).
  assert (counts["scanned"].collectives["all-gather"]["count"]
          == counts["unrolled"].collectives["all-gather"]["count"] == 6)


def _assert_complete(plan, target):
  assert set(KEYS) <= set(plan), set(KEYS) - set(plan)
  assert plan["target"] == target and plan["fits"] is True
  b = plan["bytes_per_device"]
  assert set(b) >= {"params", "optimizer", "temp", "peak", "hbm"}
  assert 0 < b["params"] < b["peak"] < b["hbm"]
  assert b["optimizer"] == pytest.approx(2 * b["params"], rel=0.01)  # Adam, fp32
  assert plan["tokens_per_step"] == 16 * 128
  # The compiled matmuls and the model's own count agree within what attention
  # masking, the router and the capacity padding add.
  assert 0.8 < plan["flops_per_step"] / plan["flops_per_step_model"] < 1.5
  assert 0 < plan["mfu_bound"] <= 1
  assert "all-reduce" in plan["collectives"]  # the data-parallel gradient sum
  # The peak is the compiler's own (TPU: its temporaries overlap in time).
  assert plan["memory"]["peak_source"] == "compiler" and plan["memory"]["peak"] == b["peak"]
  # The compiler's memory report: largest first, each no larger than the peak.
  sizes = [buf["bytes"] for buf in plan["largest_buffers"]]
  assert sizes and sizes == sorted(sizes, reverse=True) and sizes[0] <= b["peak"]
  assert hlo.shape_bytes(plan["largest_buffers"][0]["value"]) <= 1.01 * sizes[0]


@pytest.mark.parametrize("target", ["v5e:2x2", "h100:1x8"])
def test_switch_small_plans_on_tpu_and_gpu(target):
  plan = planner.plan(_config("switch_small"), make_target(target))
  _assert_complete(plan, target)
  json.dumps(plan)  # JSON-ready


def test_mixtral_small_dropless_sends_rows_with_a_ragged_all_to_all_on_v5p():
  # Scanned layers and full remat re-trace megablox inside the dropless shard_map.
  config = _config("mixtral_small", **{"mesh.expert": 4, "moe.ragged_exchange": "ragged",
                                       "model.scan_layers": True, "model.remat": "full"})
  target = make_target("v5p:2x2x1")
  texts = []
  original = planner._step_report

  def keep_text(compiled, *args):
    texts.append(compiled.as_text())
    return original(compiled, *args)

  planner._step_report = keep_text
  try:
    plan = planner.plan(config, target)
  finally:
    planner._step_report = original
  assert plan["mesh"]["expert"] == 4 and plan["fits"]
  assert plan["collectives"]["ragged-all-to-all"]["count"] > 0
  # The expert weights stay where they live: no all-gather returns a whole expert
  # weight (E = 8 experts of 256 x 1024).
  comps, _ = hlo.parse_module(texts[0])
  gathered = [i.shape for insts in comps.values() for i in insts
              if i.opcode.startswith("all-gather") and "8,256,1024" in i.shape
              or i.opcode.startswith("all-gather") and "8,1024,256" in i.shape]
  assert not gathered, gathered


def test_an_oversized_step_exits_1_with_one_line_naming_the_hbm():
  proc = subprocess.run(
      [sys.executable, PLAN, f"--config={CONFIGS}/switch_small.py", "--target=v5e:2x2",
       "--config.model.d_model=4096", "--config.model.d_ff=16384",
       "--config.moe.num_experts=32"],
      capture_output=True, text=True, timeout=900, check=False, env=cpu_env())
  lines = program_lines(proc.stderr)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  assert len(lines) == 1, lines
  assert "GiB HBM" in lines[0] and "over" in lines[0] and "mesh.fsdp" in lines[0]
  # 32 experts' 4096 x 16384 float32 kernels (their gradients or Adam moments).
  assert "its largest buffer is f32[32,4096,16384] (8.0 GiB)" in lines[0] or (
      "its largest buffer is f32[32,16384,4096] (8.0 GiB)" in lines[0]), lines[0]


REPORT = """Memory Space: default (color=0)
Total bytes: 3221225472 (3.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    2.00GiB( 67%);    2.00GiB;  1024;                3; bf16[2,3], 2×f32[8,64,1024,1024]
    3.00GiB(100%);    1.00GiB;  0;                1; (f32[4], s32[2]), bf16[4,128,1024,1024]
    3.00GiB(100%);  512.00KiB;  0;                1; f32[8,16384]

Memory Space: host (color=5)
Total bytes: 8589934592 (8.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    8.00GiB(100%);    8.00GiB;  0;                1; f32[2147483648]
"""


def test_the_memory_report_is_read_from_the_device_space_largest_first(tmp_path):
  (tmp_path / "m.after_optimizations-memory-usage-report.txt").write_text(REPORT)
  (tmp_path / "helper-memory-usage-report.txt").write_text(
      "Memory Space: default (color=0)\nTotal bytes: 16 (16B)\n")
  got = memory_report.largest_buffers(str(tmp_path), top=2)
  assert got == [
      {"bytes": 2 * 2 ** 30, "value": "f32[8,64,1024,1024]",
       "shapes": ["bf16[2,3]", "f32[8,64,1024,1024]"]},
      {"bytes": 2 ** 30, "value": "bf16[4,128,1024,1024]",
       "shapes": ["(f32[4], s32[2])", "bf16[4,128,1024,1024]"]}]
  assert memory_report.describe(got[0]) == "f32[8,64,1024,1024] (2.0 GiB)"
  assert memory_report.largest_buffers(str(tmp_path / "none")) == []


def test_serving_plans_the_kv_cache_at_its_batch_and_context():
  config = _config("switch_small")
  plan = planner.plan(config, make_target("h100:1x8"), mode="serve", serve_batch=8,
                      serve_len=256)
  assert set(KEYS) <= set(plan) and plan["fits"]
  m = config.model
  head_dim = m.head_dim or m.d_model // m.num_heads
  kv_heads = m.num_kv_heads or m.num_heads
  rows = 8 // 8  # the cache's rows split over the 8 data-parallel devices
  per_block = 2 * rows * 256 * kv_heads * head_dim * 4 + rows * 256 * 4  # K, V, positions
  assert plan["bytes_per_device"]["kv_cache"] == m.num_layers * per_block
  assert plan["bytes_per_device"]["optimizer"] == 0
  assert plan["tokens_per_step"] == 8 and plan["prefill"]["tokens_per_step"] == 8 * 256
  # The decode step is one token per row: its FLOPs are a small share of the prefill's.
  assert 0 < plan["flops_per_step"] < plan["prefill"]["flops_per_step"] / 50


def test_the_search_ends_on_a_fitting_rung_next_to_a_failing_one(monkeypatch):
  from moe_jax.planner import scale  # pylint: disable=import-outside-toplevel
  ladder = scale.LADDERS["v5p"]
  need = 32  # devices the fake step needs
  tried = []

  def fake_try(make_config, chip, topology, **kwargs):
    del make_config, kwargs
    tried.append(topology)
    devices = scale._devices(chip, topology)  # pylint: disable=protected-access
    return {"chip": chip, "topology": topology, "devices": devices,
            "fits": devices >= need}

  monkeypatch.setattr(scale, "try_plan", fake_try)
  # The analytic start (state / devices <= HBM / 2) is 2x2x2 here; the search climbs.
  rows = scale.smallest_fit(None, "v5p", params_total=40e9, bytes_per_param=12)
  assert scale.answer(rows)["topology"] == "2x4x4"  # 32 chips
  assert tried == ["2x2x4", "2x4x4"]
  tried.clear()
  need = 4  # starting too high, it walks down until a rung fails (or the ladder ends)
  rows = scale.smallest_fit(None, "v5p", params_total=2e12, bytes_per_param=12)
  assert scale.answer(rows)["topology"] == ladder[0] and tried[-1] == ladder[0]


def test_the_mesh_rules():
  from moe_jax.planner import scale  # pylint: disable=import-outside-toplevel
  # Training: experts over gcd(E, D), ZeRO-3 over the rest.
  assert scale.choose_mesh(64, 512, 8192) == {"data": 1, "fsdp": 8, "expert": 64,
                                              "model": 1}
  assert scale.choose_mesh(8, 4, 4096) == {"data": 1, "fsdp": 1, "expert": 4, "model": 1}
  assert scale.choose_mesh(128, 8, 768)["expert"] == 8
  # X = D would replicate the dense weights: kept while their state is small, else
  # the expert axis is halved so that fsdp = 2 splits them over every device.
  hbm = 96 * 2 ** 30
  assert scale.choose_mesh(256, 256, 7168, 0.2 * hbm, hbm)["fsdp"] == 1
  assert scale.choose_mesh(256, 256, 7168, 2.0 * hbm, hbm) == {
      "data": 1, "fsdp": 2, "expert": 128, "model": 1}
  assert "half of gcd" in scale.mesh_reason(
      scale.choose_mesh(256, 256, 7168, 2.0 * hbm, hbm), 256)
  assert scale.choose_mesh(64, 512, 8192, 2.0 * hbm, hbm)["expert"] == 64  # fsdp > 1
  # fsdp must divide d_model: the remainder goes to data.
  assert scale.choose_mesh(1, 64, 96) == {"data": 2, "fsdp": 32, "expert": 1, "model": 1}
  # Serving: heads over model, then experts and fsdp within the batch's rows.
  config = _config("mixtral_small")
  mesh = scale.tensor_serving_mesh(config, 16, 8)
  assert mesh["model"] == config.model.num_heads and (
      mesh["fsdp"] * mesh["expert"] * mesh["model"] == 16)
  assert 8 % (mesh["fsdp"] * mesh["expert"]) == 0
  # Experts first: E = 8 experts over 8 of the 16 devices (one row each), the heads
  # over the other 2.
  assert config.moe.num_experts == 8 and config.model.num_heads % 2 == 0
  assert scale.expert_serving_mesh(config, 16, 8) == {
      "data": 1, "fsdp": 1, "expert": 8, "model": 2}
  assert scale.expert_serving_mesh(config, 16, 4)["expert"] == 4  # the batch bounds it


def test_training_plans_use_the_blocked_kernel_and_a_loss_chunk_within_the_sequence():
  from moe_jax.planner import scale  # pylint: disable=import-outside-toplevel
  from moe_jax.training.config import check_config  # pylint: disable=import-outside-toplevel
  config = _config("mixtral_small")
  keys = scale.training_overrides(config, 8, 2 ** 14, 512)
  assert keys["model.attention_kernel"] == "blocked" and keys["loss_chunk"] == 512
  assert scale.training_overrides(config, 8, 2 ** 14, 4096)["loss_chunk"] == 1024
  assert keys["batch_size"] == 32 and keys["grad_accum_steps"] == 4
  check_config(set_keys(config, keys), num_devices=8)  # the keys are valid together


def test_the_search_stops_when_more_devices_do_not_shrink_the_peak(monkeypatch):
  from moe_jax.planner import scale  # pylint: disable=import-outside-toplevel
  tried = []

  def fake_try(make_config, chip, topology, **kwargs):
    del make_config, kwargs
    tried.append(topology)
    devices = scale._devices(chip, topology)  # pylint: disable=protected-access
    peak = 500e9 + 1e12 / devices  # mostly a part that no device count divides
    return {"chip": chip, "topology": topology, "devices": devices, "fits": False,
            "bytes_per_device": {"peak": peak}}

  monkeypatch.setattr(scale, "try_plan", fake_try)
  rows = scale.smallest_fit(None, "h100", params_total=1e9, bytes_per_param=2)
  # Peaks 1500, 1000, 750, 625 GB on 1, 2, 4, 8 GPUs: 625 / 750 > 0.8 ends it.
  assert scale.answer(rows) is None and tried == ["1x1", "1x2", "1x4", "1x8"]
  assert scale.search_done(rows, "h100")


def test_the_blocked_kernel_and_chunks_keep_a_long_prefill_out_of_memory():
  """One row of 2,048 tokens, 4 heads: the dense kernel holds 4 x 2048^2 float32 scores
  (64 MiB) at once, the blocked one 512-long tiles (4 MiB); a prefill in chunks of
  512 holds a chunk's activations."""
  temps = {}
  for kernel, chunk in (("dense", 0), ("blocked", 0), ("blocked", 512)):
    config = _config("dense_small", **{"model.attention_kernel": kernel,
                                       "model.num_layers": 2})
    plan = planner.plan(config, make_target("h100:1x1"), mode="serve", serve_batch=1,
                        serve_len=2048, serve_chunk=chunk)
    temps[kernel, chunk] = plan["prefill"]["memory"]["temp"]
  assert temps["dense", 0] > 4 * 2048 ** 2 * 4
  assert temps["blocked", 0] < temps["dense", 0] / 4, temps
  # A chunked prefill: 512 new tokens per call against the 2,048-slot cache.
  assert plan["prefill"]["tokens_per_step"] == 512 and plan["prefill_chunks"] == 4
  assert plan["serve_chunk"] == 512 and plan["serve_len"] == 2048
  assert temps["blocked", 512] < temps["blocked", 0], temps


def test_serving_reports_the_blocked_searches_and_the_dense_ones_they_replaced():
  def row(config, topology, fits, **keys):  # rows of before the keys: dense, unchunked
    return {"part": "serve", "config": config, "chip": "h100", "topology": topology,
            "devices": int(topology.split("x")[-1]), "fits": fits, "serve_len": 32768,
            **keys}
  blocked = {"attention_kernel": "blocked"}  # the whole context at once
  chunked = {"attention_kernel": "blocked", "serve_chunk": 4096}
  rows = [row("a", "1x4", False), row("a", "1x8", False), row("a", "1x4", False, **blocked),
          row("b", "1x4", False), row("a", "1x2", False, **chunked)]
  current, old = scale_report.split_searches(rows, "serve")
  assert current == [rows[3], rows[4]] and old == rows[:3]
  text = scale_report.serve_table(rows, ["a", "b"], ["h100"])
  now, before = text.split("Earlier searches")
  assert "| a | h100 | none fits |" in now and "1x2 no" in now and "1x8" not in now
  assert "| a | h100 | blocked | whole context | tensor first | none | 1x4 no |" in before
  assert ("| a | h100 | dense | whole context | tensor first | none | 1x4 no, 1x8 no |"
          in before)
  # A failed TPU compile has no plan keys: its row still belongs to its search.
  rows.append(row("b", "1x8", False))
  del rows[-1]["serve_len"]
  assert scale_report.split_searches(rows, "serve")[1] == rows[:3]
  # A search with another serving mesh replaces the tensor-parallel one.
  rows.append(row("b", "1x2", True, **chunked, serve_mesh="expert"))
  current, old = scale_report.split_searches(rows, "serve")
  assert rows[3] in old and current[-1] is rows[-1]


def test_training_reports_the_blocked_searches_and_the_dense_ones_they_replaced():
  def row(topology, fits, **keys):  # rows of before the keys: dense, whole logits
    r = {"part": "train", "config": "a", "chip": "v5p", "topology": topology,
         "devices": 4 * int(topology.split("x")[-1]), "fits": fits, **keys}
    if fits:
      r.update({"mesh": {"data": 1, "fsdp": r["devices"], "expert": 1, "model": 1},
                "tokens_per_step": 8, "flops_per_step": 3.0, "flops_per_step_model": 2.0,
                "compile_s": 1.0, "step_s_bound": 1.0, "mfu_bound": 0.5,
                "bytes_per_device": {k: 2 ** 30 for k in
                                     ("params", "optimizer", "temp", "peak", "hbm")}})
    return r
  blocked = {"attention_kernel": "blocked", "loss_chunk": 1024}
  rows = [row("2x2x4", False), row("2x2x8", True), row("2x2x2", False, **blocked),
          row("2x2x4", True, **blocked)]
  current, old = scale_report.split_searches(rows, "train")
  assert current == rows[2:] and old == rows[:2]
  now, before = scale_report.train_table(rows, ["a"], ["v5p"]).split("Earlier searches")
  assert "| a | v5p | 2x2x4 (16) | fsdp16 |" in now and "| blocked | 1024 |" in now
  assert "2x2x2 no, 2x2x4 fits |" in now and "2x2x8" not in now
  assert "| a | v5p | dense | whole | 2x2x8 (32) | 2x2x4 no, 2x2x8 fits |" in before
  # Until a config's search is made again, its newest search is the current one.
  assert scale_report.split_searches(rows[:2], "train") == (rows[:2], [])


def test_serving_rules_are_compared_at_the_current_searchs_fit():
  def row(part, topology, fits, rule, peak, **keys):
    r = {"part": part, "config": "a", "chip": "h100", "topology": topology,
         "devices": int(topology.split("x")[-1]), "fits": fits, "serve_mesh": rule,
         "attention_kernel": "blocked", "serve_chunk": 1024, **keys}
    if peak is not None:
      d = r["devices"]
      r.update({"mesh": {"data": 1, "fsdp": 1, "expert": d if rule == "expert" else 1,
                         "model": d if rule == "tensor" else 1},
                "step_s_bound": 0.002, "memory": {"peak_source": "compiler"},
                "bytes_per_device": {"peak": peak * 2 ** 30}})
    return r
  search = [row("serve", "1x2", False, "tensor", 90.0), row("serve", "1x4", True, "tensor", 46.0)]
  other = row("serve_rule", "1x4", True, "expert", 52.5)
  assert "No other mesh rule" in scale_report.serve_rules_table(search)
  text = scale_report.serve_rules_table(search + [other])
  assert ("| a | h100 | 1x4 | tensor first | model4: 46.0 GiB, decode bound 2.00 ms | "
          "expert first | expert4: 52.5 GiB, decode bound 2.00 ms |") in text
  # A rule compiled against an earlier fit (another topology) is not compared.
  stale = row("serve_rule", "1x8", False, "expert", None, peak_needed=99 * 2 ** 30)
  assert "1x8" not in scale_report.serve_rules_table(search + [stale])
  assert "does not fit (99.0 GiB)" in scale_report.serve_rules_table(
      search[:1] + [row("serve", "1x8", True, "tensor", 40.0), stale])
  # A search made again with the other rule is compared with the earlier search's
  # compile at its topology; the same rule is never compared with itself.
  again = [row("serve", "1x4", True, "expert", 40.0), row("serve", "1x2", False, "expert", 90.0)]
  text = scale_report.serve_rules_table(search + [other] + again)
  assert ("| a | h100 | 1x4 | expert first | expert4: 40.0 GiB, decode bound 2.00 ms | "
          "tensor first | model4: 46.0 GiB, decode bound 2.00 ms |") in text
  assert text.count("| a | h100 |") == 1
  # On one device both rules give the same mesh: nothing to compare.
  one = [row("serve", "1x1", True, "tensor", 9.0), row("serve_rule", "1x1", True, "expert", 9.0)]
  for r in one:
    r["mesh"] = {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
  assert "No other mesh rule" in scale_report.serve_rules_table(one)


def test_published_setups_show_each_variant_and_its_largest_buffer():
  buffers = [{"bytes": 72 * 2 ** 30, "value": "f32[36,8,4,4096,4096]", "shapes": []}]
  base = {"part": "published", "chip": "v5p", "topology": "4x4x4", "reported": "55% MFU"}
  rows = [{**base, "setup": "mix_v5p", "variant": "dense attention", "fits": False,
           "peak_needed": 224.4 * 2 ** 30, "largest_buffers": buffers},
          {**base, "setup": "mix_v5p", "variant": "blocked attention",
           "fits": True, "devices": 64, "flops_per_step": 3.0, "flops_per_step_model": 2.0,
           "mfu_bound": 0.5, "largest_buffers": [], "memory": {"peak_source": "compiler"},
           "bytes_per_device": {"peak": 80 * 2 ** 30, "hbm": 95 * 2 ** 30}}]
  text = scale_report.published_table(rows)
  assert ("| mix_v5p | dense attention | v5p:4x4x4 | no | 224.4 / - | "
          "f32[36,8,4,4096,4096] (72.0 GiB) | - | - |") in text
  assert ("| mix_v5p | blocked attention | v5p:4x4x4 (64) | yes | 80.0 / 95.0 | - | "
          "1.50 | 50% |") in text
  # A peak summed from the temporaries (no compiler peak) is starred.
  del rows[1]["memory"]
  assert "| yes | 80.0* / 95.0 |" in scale_report.published_table(rows)
  assert text.count("- `mix_v5p`: 55% MFU") == 1
