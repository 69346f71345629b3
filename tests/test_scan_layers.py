"""``model.scan_layers``: the layer pattern's repeating unit, scanned training equal to
unrolled training (random draws included), cached decoding, the checkpoint layouts'
conversion and resuming across them, and unchanged parameter and FLOP counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.inference import decode
from moe_jax.models import sizes
from moe_jax.models.layer_pattern import LayerKind, layer_pattern
from moe_jax.models.scan import (ScanUnit, block_kinds, find_unit, stack_layers,
                                 unstack_layers)
from moe_jax.training import build, run_state, train
from moe_jax.training.config import check_config
from moe_jax.training.metrics import read_metrics
from tests import test_decode
from tests.test_remat import NOISE, _batches, _run
from tests.test_train import _zoo_config, tiny_config

STEPS = 12
D, E = LayerKind("attention", "dense"), LayerKind("attention", "moe")


def test_unit_of_switch_jamba_dense_first_and_no_repeat():
  switch = layer_pattern(8, moe_every=2)
  assert find_unit(switch) == ScanUnit(prefix=0, period=2, repeats=4)
  assert find_unit(switch[:7]) == ScanUnit(1, 2, 3)  # D E D E D E D: D, then (E, D)
  jamba = layer_pattern(32, attn_layer_period=8, attn_layer_offset=4, moe_every=2,
                        moe_offset=1)
  assert find_unit(jamba) == ScanUnit(0, 8, 4)
  assert find_unit(jamba[:16]) == ScanUnit(0, 8, 2)
  assert find_unit(jamba[:8]) is None  # one period only
  # Dense-first-k (DeepSeek's first dense layers): the dense blocks are the prefix.
  assert find_unit((D, D, D) + (E,) * 5) == ScanUnit(3, 1, 5)
  assert find_unit((D, D) + (D, E) * 3) == ScanUnit(2, 2, 3)
  assert find_unit((D, E, E, D)) is None
  assert find_unit((D,)) is None and find_unit(()) is None
  assert find_unit(layer_pattern(4)) == ScanUnit(0, 1, 4)


def test_a_pattern_without_a_unit_is_refused_in_one_line():
  config = tiny_config(**{"model.scan_layers": True, "model.num_layers": 3,
                          "model.moe_every": 3})
  with pytest.raises(ConfigError, match=r"model.scan_layers=True needs a layer pattern "
                     r"with a unit repeated at least twice, and the "
                     r"model.num_layers=3 blocks have none; use model.scan_layers=False"):
    check_config(config, num_devices=1)
  check_config(tiny_config(**{"model.scan_layers": True, "model.num_layers": 4}),
               num_devices=1)
  with pytest.raises(ConfigError, match=r"model.scan_layers=True with "
                     r"optimizer='adafactor'"):
    check_config(tiny_config(**{"model.scan_layers": True, "model.num_layers": 4,
                                "optimizer": "adafactor"}), num_devices=1)


def _config(name, scan, **overrides):
  if name == "switch":
    return tiny_config(**NOISE, **{"model.num_layers": 4, "model.scan_layers": scan,
                                   "sample.length": 0, **overrides})
  if name == "mod":  # Mixture-of-Depths: blocks 1 and 3 are routed and hold MoE layers
    return _zoo_config("mod_small", **{
        "model.num_layers": 4, "model.moe_every": 2, "moe.group_size": 0,
        "model.mod_capacity": 0.25, "model.dropout": 0.1, "moe.jitter_noise": 0.1,
        "model.scan_layers": scan, **overrides})
  # Jamba-like: blocks 0-3 = Mamba+dense, Mamba+MoE, attention+dense, Mamba+MoE, twice.
  return _zoo_config("jamba_small", **{
      "model.num_layers": 8, "model.attn_layer_period": 4, "model.attn_layer_offset": 2,
      "mamba.chunk_size": 8, "model.scan_layers": scan, "model.dropout": 0.1,
      "moe.jitter_noise": 0.1, **overrides})


@pytest.mark.parametrize("name", ["switch", "jamba", "mod"])
def test_scanned_trains_as_unrolled_random_draws_included(name):
  want, unrolled = _run(_config(name, False))
  assert np.all(np.isfinite(want)) and np.all(want[:, 1] > 0)
  got, scanned = _run(_config(name, True))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # The same parameters at the end, layer by layer.
  unit = find_unit(block_kinds(_config(name, True).model))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               unstack_layers(scanned.params, unit), unrolled.params)


def test_scanned_remat_and_selection_biases_train_as_unrolled():
  """remat inside the scan, and DeepSeek-V3's selection biases updated row by row."""
  extra = {"model.remat": "full", "moe.bias_update_rate": 0.01}
  want, unrolled = _run(_config("switch", False, **extra), steps=6)
  got, scanned = _run(_config("switch", True, **extra), steps=6)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  unit = ScanUnit(0, 2, 2)
  biases = unstack_layers(scanned.model_state, unit)
  assert sorted(biases["blocks"]) == [1, 3]
  b1, b3 = (biases["blocks"][i]["ffn"]["selection_bias"] for i in (1, 3))
  assert not np.array_equal(b1, b3)  # each row moved by its own layer's counts
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), biases,
               unrolled.model_state)


@pytest.mark.parametrize("name", ["switch", "jamba"])
def test_cached_decoding_of_a_scanned_model_equals_its_full_forward(name):
  """tests/test_decode.py's check on scanned models with a prefix (5 blocks: one
  unscanned, then two units) and their unrolled twins."""
  model = test_decode.make_model(test_decode.MODELS[name], **{
      "model.num_layers": 5 if name == "switch" else 9, "model.scan_layers": True})
  assert model.unit == ((1, 2, 2) if name == "switch" else (1, 4, 2))
  decoder = decode.Decoder(model, batch_size=3, max_len=test_decode.MAX_LEN,
                           prefill_len=test_decode.PREFILL_LEN)
  rows = [p + f for p, f in zip(test_decode.PROMPTS, test_decode.FORCED)]
  expected = test_decode.full_logits(model, rows)
  np.testing.assert_allclose(np.concatenate(test_decode.full_logits(
      model.unrolled(), rows)), np.concatenate(expected), atol=1e-5, rtol=0)
  cached = test_decode.teacher_forced(decoder, "left")
  for b in range(len(rows)):
    np.testing.assert_allclose(cached[b], expected[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["switch", "jamba"])
def test_counts_and_flops_do_not_change(name):
  unrolled = build.make_model(_config(name, False))
  scanned = build.make_model(_config(name, True))
  assert sizes.count_params(scanned) == sizes.count_params(unrolled)
  assert sizes.flops_per_token(scanned, 32) == sizes.flops_per_token(unrolled, 32)


def test_conversion_round_trips_bit_exactly():
  config = _config("switch", False, **{"moe.bias_update_rate": 0.01})
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  state, _ = train.init_train_state(model, tx, None, config.seed)
  step = train.make_train_step(model, tx, config)
  state, _ = step(state, next(_batches(config, 1)))  # non-zero moments
  unit = find_unit(block_kinds(config.model))
  stacked = stack_layers(state, block_kinds(config.model))
  # The stacked layout is the scanned model's own.
  scanned = build.make_model(_config("switch", True))
  _, scanned_params, _ = run_state.split_model(scanned)
  assert (jax.tree.map(jnp.shape, stacked.params)
          == jax.tree.map(jnp.shape, scanned_params))
  back = unstack_layers(stacked, unit)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               back, state)
  restacked = stack_layers(back, unit)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restacked, stacked)


@pytest.mark.parametrize("first", [False, True])
def test_a_run_resumes_across_the_setting(first, tmp_path):
  """Ten steps with one setting, ten more with the other: the losses of a 20-step run."""
  def cfg(scan, **kw):
    return _config("switch", scan, **{"steps": 20, "log_every": 1, "eval_every": 20,
                                      "checkpoint_every": 10, **kw})
  whole = tmp_path / "whole"
  train.train_and_evaluate(cfg(first), str(whole))
  split = tmp_path / "split"
  train.train_and_evaluate(cfg(first, stop_at_step=10), str(split))
  train.train_and_evaluate(cfg(not first), str(split))
  want = [r["loss"] for r in read_metrics(str(whole), "train")]
  got = [r["loss"] for r in read_metrics(str(split), "train")]
  assert len(got) == len(want) == 20
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_stacked_parameters_shard_as_their_layers():
  """The leading ``layers`` axis stays unsplit; each layer is split as unrolled, FSDP
  included: a stacked norm scale [R, M] with R = 36 > M = 32 splits M, never R."""
  from moe_jax.models import param_sharding  # pylint: disable=import-outside-toplevel
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(1, 2, 1, fsdp=4)
  specs = {}
  for scan in (False, True):
    config = tiny_config(**{"model.num_layers": 72, "model.scan_layers": scan,
                            "mesh.expert": 2, "mesh.fsdp": 4, "mesh.data": 1})
    model = param_sharding.shard_model(build.make_model(config), mesh)
    assert param_sharding.undeclared_axes(model) == []  # "layers" + the layer's axes
    specs[scan] = param_sharding.describe_sharding(model)
  stacked = {k: v for k, v in specs[True].items() if k.startswith("scan/")}
  assert stacked
  for path, spec in stacked.items():
    _, j, rest = path.split("/", 2)
    assert tuple(spec)[:1] in ((), (None,)), path
    assert tuple(spec)[1:] == tuple(specs[False][f"blocks/{j}/{rest}"]), path
  assert any("fsdp" in str(spec) for spec in stacked.values())


def test_tracing_refuses_a_scanned_model_and_traces_its_unrolled_twin():
  from moe_jax.analysis import trace  # pylint: disable=import-outside-toplevel
  model = build.make_model(tiny_config(**{"model.num_layers": 4,
                                          "model.scan_layers": True}))
  tokens = jnp.zeros((2, 32), jnp.int32)
  with pytest.raises(ValueError, match=r"trace model.unrolled\(\)"):
    trace.trace_routing(model, tokens)
  assert len(trace.trace_routing(model.unrolled(), tokens)) == 2


def test_fine_tuning_starts_from_the_unrolled_twin_of_a_scanned_run(tmp_path):
  from moe_jax.peft import finetune  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.num_layers": 4, "model.scan_layers": True, "steps": 2,
                          "warmup_steps": 1,
                          "eval_every": 2, "checkpoint_every": 2, "sample.length": 0})
  train.train_and_evaluate(config, str(tmp_path))
  scanned, _, _ = run_state.load_model(str(tmp_path))
  model, base_config, step = finetune.load_base(str(tmp_path))
  assert step == 2 and base_config.model.scan_layers is False
  assert not model.cfg.scan_layers and len(model.blocks) == 4
  want = unstack_layers(run_state.split_model(scanned)[1], scanned.unit)
  jax.tree.map(np.testing.assert_array_equal, run_state.split_model(model)[1], want)
