"""One config: the LM config's model, moe and mamba sections are the module configs'
fields, and the module configs are derived back from them without naming a field."""

import dataclasses
import json
import os
import sys

import pytest

from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.mamba import MambaConfig
from moe_jax.training import build, config as config_lib, run_state
from moe_jax.training.config import default_config, load_config_file, validate_config
from moe_jax.training.sections import SECTIONS, derive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What turns each section's module config on, and builds it.
BUILDERS = {
    "model": ({}, lambda c: build.transformer_config(c, vocab_size=64)),
    "moe": ({"model.moe_every": 2}, build.moe_config),
    "mamba": ({"model.attn_layer_period": 2}, build.mamba_config),
    "mla": ({"model.mixer": "mla"}, build.mla_config),
}


def _set(config, overrides):
  for key, value in overrides.items():
    part, leaf = key.split(".")
    config[part][leaf] = value
  return config


def _load(name):
  return load_config_file(os.path.join(ROOT, "experiments", "configs", f"{name}.py"))


def test_sections_are_the_module_configs_fields_with_their_defaults():
  config = default_config()
  assert (SECTIONS["model"].cls, SECTIONS["moe"].cls, SECTIONS["mamba"].cls) == (
      TransformerConfig, MoeConfig, MambaConfig)
  for name, spec in SECTIONS.items():
    for field in dataclasses.fields(spec.cls):
      if field.name in spec.resolved:
        assert field.name not in config[name], (name, field.name)
        continue
      assert field.name in config[name], (name, field.name)
      # One default: the dataclass's, unless the section gives the LM's value of a
      # field without one (or an LM-only value that a run resolves).
      want = spec.values.get(field.name, field.default)
      assert config[name][field.name] == want, (name, field.name)
      if field.name in spec.values and field.default is not dataclasses.MISSING:
        assert field.name in ("queue_order", "activation"), (  # resolved by build
            name, field.name)


def test_the_listed_defaults_agree():
  moe, lm = MoeConfig(d_model=8, d_ff=16, num_experts=4), default_config()
  assert (moe.group_size, lm.moe.group_size) == (0, 0)
  assert (moe.capacity_factor, lm.moe.capacity_factor) == (1.25, 1.25)
  # init_scale is a factor on the model-wide scale everywhere: the LM's
  # model.init_scale is MoeConfig.model_init_scale, and moe.init_scale /
  # moe.router_init_scale are MoeConfig's factors of the same names.
  derived = build.moe_config(_set(default_config(), {"model.moe_every": 2,
                                                     "model.init_scale": 0.1,
                                                     "moe.router_init_scale": 0.5}))
  assert (moe.model_init_scale, moe.init_scale, moe.router_init_scale) == (1.0, 1.0, 1.0)
  assert (lm.moe.init_scale, lm.moe.router_init_scale) == (1.0, 1.0)
  assert (derived.model_init_scale, derived.init_scale, derived.router_init_scale) == (
      0.1, 1.0, 0.5)
  assert "model_init_scale" not in lm.moe


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_a_new_module_field_reaches_the_lm_config_and_back(monkeypatch, name):
  # A field added to the module config (here by subclassing) is an LM key with its
  # default, and its value reaches the built module config, with no other edit.
  spec = SECTIONS[name]
  extended = dataclasses.make_dataclass(
      "Extended" + spec.cls.__name__, [("new_knob", int, dataclasses.field(default=7))],
      bases=(spec.cls,), frozen=True)
  monkeypatch.setitem(SECTIONS, name, dataclasses.replace(spec, cls=extended))
  enable, make = BUILDERS[name]
  config = _set(default_config(), enable)
  assert config[name].new_knob == 7
  config[name].new_knob = 11
  built = make(config)
  assert type(built) is extended and built.new_knob == 11


@pytest.mark.parametrize("config_name", ["switch_small", "deepseek_small", "mixtral_small",
                                         "noisy_topk_small", "jamba_small", "mode_small",
                                         "mod_small"])
def test_every_section_key_reaches_its_module_config(config_name):
  # The shipped configs set many keys away from their defaults: each one must arrive.
  config = _load(config_name)
  for name, (_, make) in BUILDERS.items():
    built = make(config)
    if built is None:
      continue
    spec = SECTIONS[name]
    for field in dataclasses.fields(spec.cls):
      if field.name in spec.resolved or field.name in spec.values:
        continue
      if name == "model" and field.name in ("num_kv_heads", "head_dim"):
        continue  # stored resolved (0: num_heads, d_model / num_heads)
      assert getattr(built, field.name) == config[name][field.name], (
          config_name, name, field.name)


def test_derive_names_no_field_and_refuses_unknown_ones():
  section = default_config().mamba
  section.d_state = 8
  cfg = derive(MambaConfig, section, d_model=32, init_scale=0.5)
  assert (cfg.d_model, cfg.d_state, cfg.init_scale, cfg.norm_eps) == (32, 8, 0.5, 1e-6)
  # A section saved before a field existed: the field takes the dataclass default.
  del section["norm_eps"]
  assert derive(MambaConfig, section, d_model=32).norm_eps == 1e-6
  with pytest.raises(TypeError, match="no fields"):
    derive(MambaConfig, section, d_model=32, not_a_field=1)


def test_runs_saved_before_router_init_scale_load(tmp_path):
  config = default_config()
  saved = json.loads(config.to_json())
  moe = saved["moe"]
  del moe["router_init_scale"]
  moe["init_scale"] = 0.5  # before moe.router_init_scale: the router drew at this too
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = run_state.load_config(str(tmp_path))
  assert (loaded.moe.init_scale, loaded.moe.router_init_scale) == (0.5, 0.5)
  assert validate_config(loaded, num_devices=1) == []
  moe["router_init_scale"] = 0.25
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = run_state.load_config(str(tmp_path))
  assert (loaded.moe.init_scale, loaded.moe.router_init_scale) == (0.5, 0.25)


def test_one_view_serves_the_moe_checks_and_the_causality_check(monkeypatch):
  built = []
  real = config_lib.moe_view

  def counting(config):
    built.append(config)
    return real(config)

  monkeypatch.setattr(config_lib, "moe_view", counting)
  config = _set(default_config(), {"model.moe_every": 2, "moe.router": "expert_choice"})
  errors = validate_config(config, num_devices=1)
  assert any(e.startswith("moe.router='expert_choice' is not causal") for e in errors)
  assert len(built) == 1
