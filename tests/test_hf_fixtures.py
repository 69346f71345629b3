"""The committed Hugging Face fixtures (tests/fixtures/hf/) are whole and self-consistent.

Reads only json, numpy and safetensors: the files written by tools/hf_fixtures.py.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
FILES = ("config.json", "model.safetensors", "tokenizer.json", "reference.npz",
         "versions.json")
BATCH, LENGTH, NEW_TOKENS = 2, 16, 8


def _config(family):
  with open(os.path.join(ROOT, family, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def _num_experts(config):
  return config.get("num_local_experts", config.get("num_experts"))


def _moe_layers(config):
  """The MoE blocks as transformers builds them (Qwen: mlp_only_layers, sparse step)."""
  layers = range(config["num_hidden_layers"])
  if config["model_type"] in ("mixtral", "olmoe"):
    return list(layers)
  step = config["decoder_sparse_step"]
  return [i for i in layers
          if i not in config["mlp_only_layers"] and (i + 1) % step == 0]


def test_every_family_has_every_file():
  for family in FAMILIES:
    for name in FILES:
      assert os.path.isfile(os.path.join(ROOT, family, name)), (family, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_shapes_match_the_config(family):
  config = _config(family)
  vocab, width = config["vocab_size"], config["hidden_size"]
  layers, experts = config["num_hidden_layers"], _num_experts(config)
  ref = np.load(os.path.join(ROOT, family, "reference.npz"))
  moe = _moe_layers(config)
  expected = {
      "input_ids": ((BATCH, LENGTH), np.int32),
      "logits": ((BATCH, LENGTH, vocab), np.float32),
      "hidden_states": ((layers + 1, BATCH, LENGTH, width), np.float32),
      "router_logits": ((len(moe), BATCH * LENGTH, experts), np.float32),
      "moe_layers": ((len(moe),), np.int32),
      "greedy": ((BATCH, LENGTH + NEW_TOKENS), np.int32),
  }
  assert sorted(ref.files) == sorted(expected)
  for name, (shape, dtype) in expected.items():
    assert ref[name].shape == shape and ref[name].dtype == dtype, (
        name, ref[name].shape, ref[name].dtype)
    if dtype == np.float32:
      assert np.isfinite(ref[name]).all(), name
  assert ref["moe_layers"].tolist() == moe
  assert ((ref["input_ids"] >= 0) & (ref["input_ids"] < vocab)).all()
  assert ((ref["greedy"] >= 0) & (ref["greedy"] < vocab)).all()
  np.testing.assert_array_equal(ref["greedy"][:, :LENGTH], ref["input_ids"])
  # Greedy's first new token is the argmax of the last prompt position's logits.
  np.testing.assert_array_equal(ref["greedy"][:, LENGTH],
                                ref["logits"][:, -1].argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_load_and_match_the_config(family):
  config = _config(family)
  tensors = load_file(os.path.join(ROOT, family, "model.safetensors"))
  vocab, width = config["vocab_size"], config["hidden_size"]
  assert all(t.dtype == np.float32 for t in tensors.values())
  assert tensors["model.embed_tokens.weight"].shape == (vocab, width)
  assert tensors["lm_head.weight"].shape == (vocab, width)
  assert tensors["model.norm.weight"].shape == (width,)
  heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
  head_dim = config.get("head_dim") or width // heads
  experts = _num_experts(config)
  moe = _moe_layers(config)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    assert tensors[p + "self_attn.q_proj.weight"].shape == (heads * head_dim, width)
    assert tensors[p + "self_attn.k_proj.weight"].shape == (kv_heads * head_dim, width)
    assert tensors[p + "self_attn.v_proj.weight"].shape == (kv_heads * head_dim, width)
    assert tensors[p + "self_attn.o_proj.weight"].shape == (width, heads * head_dim)
    moe_prefix = p + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    expert_ids = {int(m.group(1)) for name in tensors
                  if (m := re.match(re.escape(moe_prefix) + r"experts\.(\d+)\.", name))}
    if i in moe:
      assert tensors[moe_prefix + "gate.weight"].shape == (experts, width)
      assert expert_ids == set(range(experts)), (i, expert_ids)
    else:
      assert not expert_ids and moe_prefix + "gate.weight" not in tensors
      assert tensors[p + "mlp.gate_proj.weight"].shape == (
          config["intermediate_size"], width)


def test_tokenizer_is_the_same_everywhere_with_the_recorded_specials():
  texts = {f: open(os.path.join(ROOT, f, "tokenizer.json"), encoding="utf-8").read()
           for f in FAMILIES}
  assert len(set(texts.values())) == 1
  tokenizer = json.loads(texts[FAMILIES[0]])
  assert tokenizer["model"]["type"] == "BPE"
  vocab = tokenizer["model"]["vocab"]
  assert len(vocab) == 512 and sorted(vocab.values()) == list(range(512))
  for family in FAMILIES:
    with open(os.path.join(ROOT, family, "versions.json"), encoding="utf-8") as f:
      versions = json.load(f)
    for token, token_id in versions["special_tokens"].items():
      assert vocab[token] == token_id
    assert {t["content"]: t["id"] for t in tokenizer["added_tokens"]} == (
        versions["special_tokens"])
    assert versions["transformers"].startswith("5.")
