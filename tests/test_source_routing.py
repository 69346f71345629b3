"""moe_jax.analysis.source_routing: expert load by data source, on a router that sends
each source to one expert by construction."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from moe_jax import MoeConfig, MoeLayer
from moe_jax.analysis import source_routing
from tests.subprocess_env import cpu_env, program_lines


def _layer(capacity_factor):
  """4 experts; a token whose first feature is +1 goes to e0, -1 to e1."""
  layer = MoeLayer(MoeConfig(d_model=8, d_ff=16, num_experts=4, top_k=1,
                             capacity_factor=capacity_factor,
                             eval_capacity_factor=capacity_factor, group_size=8,
                             min_capacity=1), rngs=nnx.Rngs(0))
  kernel = np.zeros(layer.router.kernel[...].shape, np.float32)
  kernel[0, 0], kernel[0, 1] = 20.0, -20.0
  layer.router.kernel[...] = kernel
  return layer


def _batch(sign, weights=None):
  x = np.zeros((1, 8, 8), np.float32)
  x[..., 0] = sign
  return {"inputs": x} if weights is None else {"inputs": x, "weights": weights}


def test_each_source_lands_on_its_expert_and_padding_does_not_count():
  pad = np.ones((1, 8), np.float32)
  pad[0, 6:] = 0  # two padding tokens in source b's second batch
  result = source_routing.expert_load_by_source(
      _layer(capacity_factor=4.0),  # capacity 8: nothing dropped
      {"a": [_batch(+1.0)], "b": [_batch(-1.0), _batch(-1.0, pad)]})
  (r,) = result.values()
  assert r["sources"] == ["a", "b"]
  np.testing.assert_array_equal(r["counts"], [[8, 0, 0, 0], [0, 14, 0, 0]])
  np.testing.assert_array_equal(r["tokens"], [8, 14])
  np.testing.assert_array_equal(r["shares"], [[1, 0, 0, 0], [0, 1, 0, 0]])
  # The source decides the expert: I(source; expert) = H(expert).
  assert r["mi_normalized"] == pytest.approx(1.0)
  assert "| a | 8 | 1.000 | 0.000 |" in source_routing.markdown(result)


def test_dropped_choices_are_not_load_and_identical_sources_share_nothing():
  # Capacity factor 1: C = 8 / 4 = 2 slots per expert, so 2 of each group's 8 tokens
  # are kept.
  result = source_routing.expert_load_by_source(
      _layer(capacity_factor=1.0), {"a": [_batch(+1.0)], "b": [_batch(+1.0)]})
  (r,) = result.values()
  np.testing.assert_array_equal(r["counts"], [[2, 0, 0, 0], [2, 0, 0, 0]])
  np.testing.assert_array_equal(r["tokens"], [8, 8])
  assert r["mi"] == pytest.approx(0.0)


def test_the_command_refuses_a_missing_run_in_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, os.path.join(root, "experiments", "routing_by_source.py"),
       f"--workdirs={tmp_path / 'nothing'}"], capture_output=True, text=True,
      env=cpu_env(), cwd=root, timeout=600, check=False)
  assert done.returncode == 1
  assert program_lines(done.stderr) == [
      f"--workdirs: {str(tmp_path / 'nothing')!r} holds no run (no config.json)."]
