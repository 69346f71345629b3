"""moe_jax.interop.hf against transformers' own outputs, committed as fixtures.

tests/fixtures/hf/<family>/ holds a tiny random Hugging Face model of each family
(tools/hf_fixtures.py, transformers 5.25.0) and its reference.npz: float32 logits for
fixed ids and greedy tokens from ``generate``. Per family:

* the converted model's logits are within 1e-4 of transformers';
* load then save reproduces every tensor bit for bit, under the same names;
* each deliberate mistake of a converter (a wrong norm epsilon, swapped gate and up
  projections, a flipped ``norm_topk_prob``, a missing q/k norm, bias or shared-expert
  gate) breaks that parity by far more than the tolerance;
* cached greedy decoding of the converted model reproduces transformers' greedy tokens,
  and those are the argmax of the model's own full forward.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.inference import decode
from moe_jax.interop import hf, safetensors_io
from moe_jax.interop.hf_tensors import ConversionError
from moe_jax.layers.router_families import SelectionBias
from moe_jax.training import build

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3")
TOLERANCE = 1e-4

pytestmark = pytest.mark.xdist_group("hf_interop")

_cache = {}


def _loaded(family):
  if family not in _cache:
    _cache[family] = hf.load(os.path.join(FIXTURES, family))
  return _cache[family]


def _reference(family):
  return np.load(os.path.join(FIXTURES, family, "reference.npz"))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
  model, _ = _loaded(family)
  ref = _reference(family)
  logits = hf.forward_logits(model, ref["input_ids"])
  assert logits.shape == ref["logits"].shape
  np.testing.assert_allclose(logits, ref["logits"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_then_save_is_bit_exact(family, tmp_path):
  model, config = _loaded(family)
  written = hf.save(model, config, str(tmp_path))
  assert written.model_type == family
  before = safetensors_io.Checkpoint(os.path.join(FIXTURES, family))
  after = safetensors_io.Checkpoint(str(tmp_path))
  assert sorted(after.names) == sorted(before.names)
  for name in before.names:
    a, b = before.read(name), after.read(name)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), name
  # The written config converts back to the same model.
  again, _ = hf.load(str(tmp_path))
  ref = _reference(family)
  np.testing.assert_array_equal(hf.forward_logits(again, ref["input_ids"]),
                                hf.forward_logits(model, ref["input_ids"]))


def test_load_traces_the_model_once_and_keeps_a_fresh_models_rng_state(monkeypatch):
  made, make_model = [], build.make_model

  def counted(config, **kwargs):
    made.append(config)
    return make_model(config, **kwargs)
  monkeypatch.setattr(hf.build, "make_model", counted)
  model, config = hf.load(os.path.join(FIXTURES, "olmoe"))
  assert len(made) == 1
  monkeypatch.undo()
  fresh = nnx.split(build.make_model(config), hf.WEIGHTS, ...)[2]
  got = nnx.split(model, hf.WEIGHTS, ...)[2]
  assert jax.tree.structure(got) == jax.tree.structure(fresh)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(fresh)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)


def _variant(config, model, **keys):
  """The model of ``config`` with ``keys`` changed, holding ``model``'s parameters
  wherever the paths still exist."""
  changed = config.copy_and_resolve_references()
  for key, value in keys.items():
    section, name = key.split(".")
    changed[section][name] = value
  other = build.make_model(changed)
  ours = dict(nnx.to_flat_state(nnx.state(model, hf.WEIGHTS)))
  theirs = nnx.state(other, hf.WEIGHTS)
  for path, var in nnx.to_flat_state(theirs):
    if path in ours and ours[path].get_value().shape == var.get_value().shape:
      var.set_value(ours[path].get_value())
  nnx.update(other, theirs)
  return other


def _swap_gate_and_up(model):
  swapped = nnx.clone(model)
  for _, module in nnx.iter_modules(swapped):
    if getattr(module, "wi_gate", None) is not None and hasattr(module, "wi"):
      gate, up = module.wi_gate.get_value(), module.wi.get_value()
      module.wi_gate.set_value(up)
      module.wi.set_value(gate)
  return swapped


MISTAKES = {
    "mixtral": ("eps", "gate_up", "norm_topk"),
    "olmoe": ("eps", "gate_up", "norm_topk", "qk_norm"),
    "qwen2_moe": ("eps", "gate_up", "norm_topk", "qkv_bias", "shared_gate"),
    "qwen3_moe": ("eps", "gate_up", "norm_topk", "qk_norm"),
    "deepseek_v3": ("eps", "gate_up", "norm_topk", "interleave", "yarn",
                    "selection_bias", "gate_scale"),
}


def _mistake(name, model, config):
  m = config.model
  if name == "eps":  # the two epsilons of these families, confused
    return _variant(config, model,
                    **{"model.norm_eps": 1e-5 if m.norm_eps == 1e-6 else 1e-6})
  if name == "gate_up":
    return _swap_gate_and_up(model)
  if name == "norm_topk":
    return _variant(config, model,
                    **{"moe.normalize_gates": not config.moe.normalize_gates})
  if name == "qk_norm":
    return _variant(config, model, **{"model.qk_norm": "none"})
  if name == "qkv_bias":
    return _variant(config, model, **{"model.qkv_bias": False})
  if name == "shared_gate":
    return _variant(config, model, **{"moe.shared_expert_gate": False})
  if name == "interleave":  # rotary over the halves instead of interleaved pairs
    return _variant(config, model, **{"mla.rope_interleave": False})
  if name == "yarn":  # YaRN's frequencies and mscale left out
    return _variant(config, model, **{"model.rope_scaling": "none"})
  if name == "gate_scale":  # routed_scaling_factor left out
    return _variant(config, model, **{"moe.gate_scale": 1.0})
  if name == "selection_bias":  # e_score_correction_bias not loaded
    wrong = nnx.clone(model)
    for _, var in nnx.to_flat_state(nnx.state(wrong, SelectionBias)):
      var.set_value(jax.numpy.zeros_like(var.get_value()))
    return wrong
  raise ValueError(name)


@pytest.mark.parametrize("family,mistake",
                         [(f, m) for f in FAMILIES for m in MISTAKES[f]])
def test_each_mistake_breaks_parity(family, mistake):
  model, config = _loaded(family)
  ref = _reference(family)
  wrong = hf.forward_logits(_mistake(mistake, model, config), ref["input_ids"])
  assert np.abs(wrong - ref["logits"]).max() > 3 * TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_matches_transformers_and_full_forward(family):
  model, _ = _loaded(family)
  ref = _reference(family)
  ids, greedy = ref["input_ids"], ref["greedy"]
  new = greedy.shape[1] - ids.shape[1]
  out = decode.generate(model, [list(map(int, row)) for row in ids], new,
                        max_len=greedy.shape[1], temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out), greedy[:, ids.shape[1]:])
  # The full forward over the greedy sequence picks the same tokens.
  logits = hf.forward_logits(model, greedy[:, :-1])
  np.testing.assert_array_equal(logits[:, ids.shape[1] - 1:].argmax(-1),
                                greedy[:, ids.shape[1]:])


def _copy_fixture(family, tmp_path):
  dst = tmp_path / family
  shutil.copytree(os.path.join(FIXTURES, family), dst)
  return dst


def _edit_config(path, **changes):
  file = path / "config.json"
  data = json.loads(file.read_text())
  data.update(changes)
  file.write_text(json.dumps(data))


def test_unknown_family_is_one_line(tmp_path):
  path = _copy_fixture("mixtral", tmp_path)
  _edit_config(path, model_type="gpt2")
  with pytest.raises(ConversionError, match=r"model_type='gpt2' is not a family"):
    hf.load(str(path))


def test_missing_tensor_is_named(tmp_path):
  path = _copy_fixture("olmoe", tmp_path)
  ckpt = safetensors_io.Checkpoint(str(path))
  tensors = {n: ckpt.read(n) for n in ckpt.names
             if n != "model.layers.1.mlp.experts.3.up_proj.weight"}
  del ckpt
  safetensors_io.save(tensors, str(path / "model.safetensors"))
  with pytest.raises(ConversionError,
                     match=r"'model.layers.1.mlp.experts.3.up_proj.weight' is missing"):
    hf.load(str(path))


def test_shape_mismatch_is_named(tmp_path):
  path = _copy_fixture("mixtral", tmp_path)
  _edit_config(path, intermediate_size=48)
  with pytest.raises(ConversionError, match=r"tensor 'model.layers.0.block_sparse_moe"
                     r".experts.0.w1.weight' has shape \(96, 64\)"):
    hf.load(str(path))


def test_pickle_weights_are_refused(tmp_path):
  path = tmp_path / "pickled"
  path.mkdir()
  shutil.copy(os.path.join(FIXTURES, "mixtral", "config.json"), path)
  (path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(safetensors_io.CheckpointError, match="pickle-based"):
    hf.load(str(path))


def test_unsupported_option_is_refused(tmp_path):
  path = _copy_fixture("mixtral", tmp_path)
  _edit_config(path, sliding_window=4096)
  with pytest.raises(ConversionError, match="sliding_window=4096"):
    hf.load(str(path))


def test_save_refuses_what_the_family_cannot_express(tmp_path):
  model, config = _loaded("mixtral")
  layernorm = config.copy_and_resolve_references()
  layernorm.model.norm = "layernorm"
  with pytest.raises(ConversionError, match="model.norm='layernorm'"):
    hf.save(build.make_model(layernorm), layernorm, str(tmp_path), family="mixtral")
  with pytest.raises(ConversionError, match="no Hugging Face family"):
    hf.save(build.make_model(layernorm), layernorm, str(tmp_path))
  del model


def test_sharded_checkpoint_and_mesh_load(tmp_path):
  """Shards with an index read back the same; on a 2 x 4 mesh (experts over 4) each
  parameter is placed by its logical axes with the same values."""
  model, config = _loaded("qwen2_moe")
  hf.save(model, config, str(tmp_path), max_shard_bytes=200_000)
  assert os.path.exists(tmp_path / safetensors_io.INDEX)
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(2, 4, 1)
  sharded, _ = hf.load(str(tmp_path), mesh=mesh,
                       overrides={"mesh.data": 2, "mesh.expert": 4})
  experts = sharded.blocks[0].ffn.experts.wi.get_value()
  assert experts.sharding.spec[0] == "expert"
  assert len(experts.addressable_shards) == 8
  ref = _reference("qwen2_moe")
  a = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(jax.device_get(var.get_value())),
                                  np.asarray(a[path].get_value()), err_msg=str(path))
  del ref


def test_export_refuses_adapters_and_folds_them_once_merged(tmp_path):
  """A LoRA-adapted model is refused until its adapters are merged; the merged export
  reloads with the adapted model's logits, which differ from the base's."""
  from moe_jax.layers import lora_adapters  # pylint: disable=import-outside-toplevel
  from moe_jax.peft import lora  # pylint: disable=import-outside-toplevel
  _, config = _loaded("olmoe")
  model, _ = hf.load(os.path.join(FIXTURES, "olmoe"))
  ids = _reference("olmoe")["input_ids"]
  base = hf.forward_logits(model, ids)
  lora.add_lora(model, ("attention", "experts"), rank=2, alpha=4.0)
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jax.numpy.asarray(rng.normal(size=var.get_value().shape) * 0.3,
                                    jax.numpy.float32))
  adapted = hf.forward_logits(model, ids)
  assert np.abs(adapted - base).max() > 0.1
  with pytest.raises(ConversionError, match="no tensor"):
    hf.save(model, config, str(tmp_path / "unmerged"))
  assert lora_adapters.merge(model) > 0
  hf.save(model, config, str(tmp_path / "merged"))
  again, _ = hf.load(str(tmp_path / "merged"))
  np.testing.assert_allclose(hf.forward_logits(again, ids), adapted, atol=1e-4, rtol=0)


def test_deepseek_v3_mtp_module_matches_its_reference():
  """The multi-token-prediction module stored beside DeepSeek-V3 (block
  ``num_hidden_layers``) converts into ``mtp/0``, and its logits match the fixture's
  reference, composed from transformers' own layer classes (tools/hf_fixtures.py)."""
  model, config = _loaded("deepseek_v3")
  assert config.model.mtp_depth == 1
  ref = _reference("deepseek_v3")
  out = model.forward(jax.numpy.asarray(ref["input_ids"]), deterministic=True)
  mtp = np.asarray(out.mtp_logits[0])[:, :-1]  # the last position has no next token
  np.testing.assert_allclose(mtp, ref["mtp_logits"], atol=TOLERANCE, rtol=0)
