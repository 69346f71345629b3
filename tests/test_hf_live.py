"""moe_jax against a live ``transformers`` (skipped without torch and transformers, which
CI does not install; ``pip install -e .[fixtures]`` for runs by hand).

tools/hf_fixtures.py builds each family's tiny random model; moe_jax converts it, its
logits must match, and its export must load back into ``transformers`` with the same
logits."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moe_jax.interop import hf  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  spec = importlib.util.spec_from_file_location(
      "hf_fixtures", os.path.join(ROOT, "tools", "hf_fixtures.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["hf_fixtures"] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_live_parity_both_ways(family, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  tool = _tool()
  reference = tool.build(family, seed=1)
  reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ids = np.random.default_rng(0).integers(0, reference.config.vocab_size, (2, 12))
  with torch.no_grad():
    want = reference(torch.tensor(ids)).logits.numpy()
  model, config = hf.load(str(tmp_path / "hf"))
  np.testing.assert_allclose(hf.forward_logits(model, ids), want, atol=1e-4, rtol=0)
  hf.save(model, config, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    got = back(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
