"""Every module declares its logical axes, FLOPs and LoRA targets
(:mod:`moe_jax.layers.protocols`), and the walkers (sizes, param_sharding, peft.lora)
refuse a module that does not, instead of counting it as 0 or leaving it out."""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax.layers.protocols import Flops, LoraWeight
from moe_jax.models import block as block_lib
from moe_jax.models import param_sharding, sizes
from moe_jax.peft import lora as peft_lora
from moe_jax.training import build

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "configs")
MODEL_CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py"))
    if not os.path.basename(p).startswith("finetune"))  # finetune_*: no model keys
SEQ = 12


def _config(name: str, **changes):
  spec = importlib.util.spec_from_file_location(f"protocols_config_{name}",
                                                os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.d_model, c.model.num_heads, c.model.d_ff = 16, 2, 24
  # The full-size configs, shrunk as the small ones: one KV head, the default head
  # width, the byte vocabulary, expert widths like d_ff and at most 8 blocks (Jamba's
  # pattern unit: every module kind once).
  c.model.num_kv_heads = min(c.model.num_kv_heads, 1)
  c.model.head_dim, c.data.vocab_size = 0, 0
  c.model.num_layers = min(c.model.num_layers, 8)
  if c.moe.get("d_ff", 0):
    c.moe.d_ff = 24
  c.data.seq_len = SEQ
  for key, value in changes.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _model(name: str, **changes):
  return build.make_model(_config(name, **changes), seed=0)


# Variants beyond the configs themselves.
EC = {"moe.router": "expert_choice", "moe.top_k": 1, "moe.second_policy": "all",
      "moe.normalize_gates": True}
VARIANTS = {
    **{name: (name, {}) for name in MODEL_CONFIGS},
    "gqa": ("dense_small", {"model.num_kv_heads": 1}),
    "gqa_moe": ("switch_small", {"model.num_kv_heads": 1}),
    "mod_mlp": ("mod_small", {"model.mod_predictor": "mlp"}),
    "mod_moe": ("switch_small", {"model.mod_every": 2}),
    "shared": ("switch_small", {"moe.num_shared_experts": 1}),
    "expert_choice": ("switch_small", EC),
    "learned_layernorm_tied": ("switch_small", {
        "model.position": "learned", "model.norm": "layernorm",
        "model.tie_embeddings": True}),
    "jamba_gqa_mod": ("jamba_small", {"model.num_kv_heads": 1, "model.mod_every": 2,
                                      "model.mod_predictor": "mlp"}),
    "mla_mod": ("deepseek_small", {
        "model.mixer": "mla", "mla.q_lora_rank": 8, "mla.kv_lora_rank": 8,
        "mla.qk_nope_head_dim": 4, "mla.qk_rope_head_dim": 4, "mla.v_head_dim": 4,
        "model.mod_every": 2}),
    "jamba_mla": ("jamba_small", {
        "model.mixer": "mla", "model.position": "rotary", "mla.kv_lora_rank": 8,
        "mla.qk_nope_head_dim": 4, "mla.qk_rope_head_dim": 4, "mla.v_head_dim": 4}),
    "mtp_moe": ("switch_small", {"model.mtp_depth": 2}),
    "mtp_jamba": ("jamba_small", {"model.mtp_depth": 1}),
    "mtp_scanned": ("dense_small", {"model.mtp_depth": 1, "model.scan_layers": True}),
}


@pytest.fixture(name="zoo", scope="module")
def _zoo():
  """A model with every module kind: Mamba and attention, MoE with shared experts,
  dense FFNs, Mixture-of-Depths with an MLP predictor, and LoRA
  adapters on every target."""
  model = _model("jamba_small", **{
      "model.mod_every": 2, "model.mod_predictor": "mlp", "model.num_kv_heads": 1,
      "model.position": "learned", "moe.num_shared_experts": 1})
  peft_lora.add_lora(model, tuple(peft_lora.TARGETS), rank=2, alpha=2.0)
  return model


def _check_declared(model):
  assert param_sharding.undeclared_axes(model) == []
  flops = sizes.flops_per_token(model, SEQ)  # raises if a module declares none
  assert flops["active"] > 0 and flops["total"] >= flops["active"]
  return flops


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_module_of_every_config_declares_axes_and_flops(variant):
  name, changes = VARIANTS[variant]
  model = _model(name, **changes)
  _check_declared(model)
  # With LoRA on every target the model has, the adapters declare theirs too.
  targets = sorted({w.target for w in peft_lora.declared_weights(model)})
  assert peft_lora.add_lora(model, targets, rank=2, alpha=2.0) > 0
  assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  _check_declared(model)


def _classes_declaring_flops(model):
  return sorted({type(m) for _, m in nnx.iter_modules(model)
                 if "flops_per_token" in vars(type(m))}, key=lambda t: t.__name__)


def test_the_zoo_has_every_module_kind(zoo):
  names = {t.__name__ for t in _classes_declaring_flops(zoo)}
  assert names == {"Adapter", "Attention", "DenseFfn", "DepthRouter", "MambaMixer",
                   "MlpPredictor", "MoeLayer", "Norm", "Router", "Transformer"}


@pytest.mark.parametrize("cls_name", [
    "Adapter", "Attention", "DenseFfn", "DepthRouter", "MambaMixer", "MlpPredictor",
    "MoeLayer", "Norm", "Router", "Transformer"])
def test_a_module_without_its_flop_count_is_refused(cls_name, zoo, monkeypatch):
  model = zoo
  _check_declared(model)
  cls = next(t for t in _classes_declaring_flops(model) if t.__name__ == cls_name)
  monkeypatch.delattr(cls, "flops_per_token")
  # MoeLayer owns no parameter itself: without its count, its experts are asked.
  owner = "Experts" if cls_name == "MoeLayer" else cls_name
  with pytest.raises(sizes.UndeclaredFlops, match=f"{owner} owns parameters"):
    sizes.flops_per_token(model, SEQ)


def test_a_parameter_without_logical_axes_is_listed():
  model = _model("switch_small")
  model.blocks[1].ffn.experts.wo.set_metadata(logical_axes=None)
  model.blocks[0].attn.query.set_metadata(logical_axes=("embed", "heads"))  # rank 3
  bad = param_sharding.undeclared_axes(model)
  assert len(bad) == 2
  assert bad[0].startswith("blocks/0/attn/query (16, 2, 8)")
  assert bad[1].startswith("blocks/1/ffn/experts/wo")


class _BareMixer(nnx.Module):
  """A new token mixer that declares nothing."""

  def __init__(self, cfg, rngs):
    self.proj = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model, cfg.d_model)))

  def __call__(self, x, positions, token_mask=None):
    return x @ self.proj[...]


class _DeclaringMixer(_BareMixer):
  """The same mixer with the three declarations a new module makes."""

  def __init__(self, cfg, rngs):
    self.proj = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model, cfg.d_model)),
                          logical_axes=("embed", "embed"))

  def flops_per_token(self, tokens):
    return Flops.dense(2 * self.proj.size + tokens)

  def lora_targets(self):
    return (LoraWeight("attention", "proj"),)


def _with_mixer(monkeypatch, cls):
  monkeypatch.setitem(block_lib.MIXERS, "attention",
                      block_lib.MixerKind("attn", lambda cfg, rngs: cls(cfg, rngs)))
  return _model("dense_small")


def test_a_new_mixer_without_declarations_gets_clear_errors(monkeypatch):
  model = _with_mixer(monkeypatch, _BareMixer)
  with pytest.raises(sizes.UndeclaredFlops,
                     match=r"blocks/0/attn: _BareMixer owns parameters but declares no "
                           r"flops_per_token"):
    sizes.flops_per_token(model, SEQ)
  assert [b.split(" ")[0] for b in param_sharding.undeclared_axes(model)] == [
      f"blocks/{i}/attn/proj" for i in range(model.cfg.num_layers)]
  with pytest.raises(ValueError, match="'attention', but the model has no attention"):
    peft_lora.add_lora(model, ("attention",), rank=2, alpha=2.0)


def test_a_new_mixer_that_declares_is_counted_sharded_and_adapted(monkeypatch):
  reference = _model("dense_small")
  model = _with_mixer(monkeypatch, _DeclaringMixer)
  assert param_sharding.undeclared_axes(model) == []
  m, layers = model.cfg.d_model, model.cfg.num_layers
  attention = reference.blocks[0].attn.flops_per_token(SEQ).active
  expected = (sizes.flops_per_token(reference, SEQ)["active"]
              + layers * (2 * m * m + SEQ - attention))
  assert sizes.flops_per_token(model, SEQ)["active"] == expected
  assert peft_lora.add_lora(model, ("attention",), rank=2, alpha=2.0) == layers
  adapter = model.blocks[0].attn.proj_lora
  assert adapter.lora_a.get_metadata("logical_axes") == ("embed", None)
  assert float(jnp.abs(adapter.lora_b[...]).sum()) == 0.0


def test_a_module_declaring_an_unknown_lora_target_is_refused(monkeypatch):
  class Unknown(_DeclaringMixer):
    def lora_targets(self):
      return (LoraWeight("latent_attention", "proj"),)

  model = _with_mixer(monkeypatch, Unknown)
  with pytest.raises(ValueError, match="Unknown declares LoRA target 'latent_attention'"):
    peft_lora.add_lora(model, ("dense_ffn",), rank=2, alpha=2.0)
