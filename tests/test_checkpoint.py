"""Checkpointer: round trip of (state, data iterator, meta); fallback on damage."""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.errors import CheckpointError
from moe_jax.training.checkpoint import Checkpointer


def _state(seed):
  k = jax.random.key(seed)
  return {"step": jnp.asarray(seed, jnp.int32),
          "params": {"w": jax.random.normal(k, (3, 4)), "b": jnp.arange(4.0)},
          "opt_state": ({"mu": jnp.ones((3, 4)) * seed},),
          "rng": jax.random.key_data(k)}


def _abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _iterator():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_iterator_position_and_meta(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  it = _iterator()
  for _ in range(3):
    next(it)
  state = _state(3)
  ckpt.save(3, state, data_iterator=it, meta={"accumulator": {"count": 2}, "x": 0.1})
  expected_next = next(it)

  fresh = _iterator()
  step, restored, meta = ckpt.restore(_abstract(_state(0)), data_iterator=fresh)
  assert step == 3
  _assert_tree_equal(restored, state)
  assert meta == {"accumulator": {"count": 2}, "x": 0.1}
  np.testing.assert_array_equal(next(fresh), expected_next)  # resumes mid-stream


def test_keeps_only_the_newest_checkpoints(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  assert ckpt.all_steps() == [2, 3]


def test_empty_directory_restores_nothing(tmp_path):
  assert Checkpointer(str(tmp_path), keep=2).restore(_abstract(_state(0))) is None


def _damage(directory, step):
  """Truncates every file of the saved state, as a disk fault might."""
  for root, _, files in os.walk(os.path.join(directory, str(step), "state")):
    for name in files:
      with open(os.path.join(root, name), "wb"):
        pass


def test_corrupt_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  _damage(directory, 2)
  with caplog.at_level(logging.WARNING):
    step, restored, _ = ckpt.restore(_abstract(_state(0)))
  assert step == 1
  _assert_tree_equal(restored, _state(1))
  assert "step 2" in caplog.text and "falling back" in caplog.text
  # The damaged step is moved aside (kept for inspection), so step 2 can be saved again.
  assert os.path.isdir(str(tmp_path / "checkpoints_corrupt" / "2"))
  assert ckpt.all_steps() == [1]
  ckpt.save(2, _state(2))
  assert ckpt.all_steps() == [1, 2]


def test_partial_save_is_ignored(tmp_path):
  directory = str(tmp_path)
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(1, _state(1))
  # What a save killed half-way leaves behind: orbax's temporary directory.
  os.makedirs(os.path.join(directory, "2.orbax-checkpoint-tmp-1234", "state"))
  ckpt = Checkpointer(directory, keep=3)
  assert ckpt.all_steps() == [1]
  assert ckpt.restore(_abstract(_state(0)))[0] == 1


def test_refuses_to_start_over_when_no_checkpoint_is_readable(tmp_path):
  directory = str(tmp_path)
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(5, _state(5))
  _damage(directory, 5)
  with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
    ckpt.restore(_abstract(_state(0)))


def test_a_run_that_asks_for_another_layout_moves_no_checkpoint(tmp_path):
  """Every step failing alike is a mismatch of the run, not damage: the checkpoints
  stay where they are, and the error says nothing was moved."""
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  other = _state(0)
  other["params"]["w"] = jnp.zeros((5, 4))  # a changed width
  with pytest.raises(CheckpointError, match="nothing was moved"):
    ckpt.restore(_abstract(other))
  assert not os.path.exists(str(tmp_path / "checkpoints_corrupt"))
  assert ckpt.all_steps() == [1, 2]
  step, restored, _ = ckpt.restore(_abstract(_state(0)))  # the right config still resumes
  assert step == 2
  _assert_tree_equal(restored, _state(2))
