"""The optimizer state is sharded like the parameters it mirrors (8 fake CPU devices).

``jax.jit(tx.init)`` alone put every Adam moment on one device (they are
``zeros_like``, so nothing ties them to the parameters' layout) and the run then
replicated them: every device held the moments of every expert, and the compiled step
all-gathered the expert gradients to update them. These tests pin the placement of
every optimizer leaf and the absence of those all-gathers, for AdamW on a
data=2 x expert=4 mesh and for Adafactor (factored second moments) on a
data=2 x expert=2 x model=2 mesh.
"""

import re

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.training import build, run_state, train
from moe_jax.parallel import optimizer_sharding, sharding
from moe_jax.models import param_sharding
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.peft import finetune
from tests.test_train import tiny_config

E = 8
# (optimizer, (data, expert, model), overrides). Adafactor factors a second moment
# only when two axes have >= 128 entries: d_model=128, d_ff=256 make the expert
# weights [8, 128, 256] and [8, 256, 128] factored, the [1] placeholders alongside.
SETTINGS = {
    "adamw": ("adamw", (2, 4, 1), {}),
    "adafactor": ("adafactor", (2, 2, 2), {"model.d_model": 128, "model.d_ff": 256}),
}


def _config(optimizer, **overrides):
  return tiny_config(**{"moe.num_experts": E, "batch_size": 8, "data.seq_len": 16,
                        "moe.group_size": 16, "optimizer": optimizer, **overrides})


_setups = {}


def _setup(name):
  """``(config, model, tx, state, state_sharding)`` as train_and_evaluate makes them."""
  if name not in _setups:
    optimizer, axes, overrides = SETTINGS[name]
    config = _config(optimizer, **overrides)
    model = build.make_model(config)
    mesh = sharding.make_mesh(*axes)
    param_sharding.shard_model(model, mesh)
    tx, _ = build.make_optimizer(config)
    state, state_sharding = train.init_train_state(model, tx, mesh, config.seed)
    _setups[name] = (config, model, tx, state, state_sharding)
  return _setups[name]


def _key(path) -> str:
  return jax.tree_util.keystr(path)


def _flat(tree):
  return [(_key(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _param_of(opt_path, params):
  """The parameter whose path ends ``opt_path`` (the state's copies of the parameter
  tree sit under a prefix such as ``[1][0].mu``), or None."""
  hits = [(p, x) for p, x in _flat(params) if opt_path.endswith(p)]
  return max(hits, key=lambda h: len(h[0])) if hits else None


def _spec(s):
  """A spec without trailing Nones (P('expert', None) and P('expert') are one layout)."""
  out = list(s.spec)
  while out and out[-1] is None:
    out.pop()
  return tuple(out)


def assert_follows_parameters(opt_state, params):
  """Every optimizer leaf is a NamedSharding on the parameters' mesh: a leaf of its
  parameter's shape has the parameter's spec, a leaf with one axis removed has the
  parameter's spec on the axes it keeps, anything else is replicated. Returns the
  number of leaves of each kind."""
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  kinds = {"same": 0, "factored": 0, "other": 0}
  for path, x in _flat(opt_state):
    assert isinstance(x.sharding, NamedSharding), (path, x.sharding)
    assert x.sharding.mesh == mesh, path
    hit = _param_of(path, params)
    if hit is not None and x.shape == hit[1].shape:
      assert _spec(x.sharding) == _spec(hit[1].sharding), (path, x.sharding.spec)
      kinds["same"] += 1
    elif hit is not None and any(hit[1].shape[:i] + hit[1].shape[i + 1:] == x.shape
                                 for i in range(hit[1].ndim)):
      # The tests' shapes have no equal adjacent axes: the removed axis is known.
      param = hit[1]
      spec = list(param.sharding.spec) + [None] * (param.ndim - len(param.sharding.spec))
      (i,) = [i for i in range(param.ndim)
              if param.shape[:i] + param.shape[i + 1:] == x.shape]
      want = _spec(NamedSharding(mesh, P(*(spec[:i] + spec[i + 1:]))))
      assert _spec(x.sharding) == want, (path, x.sharding.spec, want)
      kinds["factored"] += 1
    else:
      assert _spec(x.sharding) == (), (path, x.shape, x.sharding.spec)
      kinds["other"] += 1
  return kinds


@pytest.mark.parametrize("name", SETTINGS)
def test_optimizer_state_is_sharded_like_its_parameters(name):
  _, _, _, state, _ = _setup(name)
  kinds = assert_follows_parameters(state.opt_state, state.params)
  # AdamW: mu and nu of every parameter. Adafactor: v, or v_row and v_col.
  n = len(jax.tree.leaves(state.params))
  assert kinds["same"] + kinds["factored"] // 2 == (2 * n if name == "adamw" else n)
  # The experts' moments are split over E like the experts.
  expert_moments = [(p, x) for p, x in _flat(state.opt_state)
                    if "['experts']" in p and x.ndim >= 2]
  assert expert_moments
  for path, x in expert_moments:
    assert _spec(x.sharding)[:1] == ("expert",), (path, x.sharding.spec)
    assert {s.data.shape[0] for s in x.addressable_shards} == {E // x.sharding.mesh.shape[
        "expert"]}, path
  if name == "adafactor":
    assert kinds["factored"] > 0
    # [8, 128, 256] with spec (expert, None, model): v_row drops the 256 axis, v_col
    # the 128 axis and keeps the model split of the other.
    flat = dict(_flat(state.opt_state))
    wi = "['blocks'][1]['ffn']['experts']['wi']"
    v_row = next(x for p, x in flat.items() if p.endswith(".v_row" + wi))
    v_col = next(x for p, x in flat.items() if p.endswith(".v_col" + wi))
    assert (v_row.shape, _spec(v_row.sharding)) == ((8, 128), ("expert",))
    assert (v_col.shape, _spec(v_col.sharding)) == ((8, 256), ("expert", "model"))


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
  """The result shapes of every all-gather (sync or async start) of an HLO module."""
  shapes = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s*\ball-gather(?:-start)?\(", line)
    if m:
      shapes += [tuple(int(d) for d in dims.split(",") if d)
                 for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", m.group(1))]
  return shapes


@pytest.mark.parametrize("name", SETTINGS)
def test_train_step_does_not_all_gather_expert_arrays(name):
  config, model, tx, state, state_sharding = _setup(name)
  # Every array the optimizer keeps for an expert weight, at full size: the weights,
  # their moments, Adafactor's factored [E, M] and [E, H] statistics.
  expert_shapes = {x.shape for p, x in _flat((state.params, state.opt_state))
                   if "['experts']" in p and x.ndim >= 2 and x.shape[0] == E}
  assert (E, config.model.d_model, config.model.d_ff) in expert_shapes
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  tokens = np.zeros((config.batch_size, config.data.seq_len), np.int32)
  batch = sharding.shard_batch({"inputs": tokens, "targets": tokens},
                               state_sharding.step.mesh)
  hlo = step.lower(state, batch).compile().as_text()
  gathered = [s for s in _all_gather_shapes(hlo) if s in expert_shapes]
  assert not gathered, gathered


def test_a_resumed_state_is_sharded_like_a_fresh_one(tmp_path):
  # The checkpoint holds the layout before the fix (optimizer state replicated): the
  # restore target's shardings, not the saved ones, decide where a resumed run's
  # leaves land.
  _, _, _, state, _ = _setup("adamw")
  replicated = NamedSharding(state.step.sharding.mesh, P())
  old = state.replace(opt_state=jax.device_put(state.opt_state, replicated))
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  try:
    checkpointer.save(1, run_state.to_checkpoint(old))
    _, saved, _ = checkpointer.restore(
        run_state.to_checkpoint(run_state.abstract_like(state)))
  finally:
    checkpointer.close()
  restored = run_state.from_checkpoint(saved)
  assert_follows_parameters(restored.opt_state, restored.params)
  for (path, got), (_, want) in zip(_flat(restored), _flat(state)):
    assert got.sharding == want.sharding, path


def test_finetuning_optimizer_state_follows_the_trainable_subset():
  # ESFT on a sharded model: the trainable expert weights' moments keep E split, and
  # the chained row-freezing transform (no state) does not get in the way.
  config = _config("adamw")
  model = build.make_model(config)
  mesh = sharding.make_mesh(2, 4)
  param_sharding.shard_model(model, mesh)
  with config.unlocked():
    config.finetune = ml_collections.ConfigDict(finetune.default_finetune_config())
    config.finetune.method = "esft"
    config.finetune.esft_selected = {"1": [True, False] * (E // 2)}
  plan = finetune.prepare(model, config)
  _, params, _, _ = run_state.split_trainable(model, plan["wrt"])
  tx, _, masks = finetune.make_optimizer(config, params, plan["row_masks"])
  assert masks is not None
  opt_state = optimizer_sharding.init_optimizer_state(tx, params)
  kinds = assert_follows_parameters(opt_state, params)
  assert kinds["same"] == 2 * len(jax.tree.leaves(params))
  assert all(_spec(x.sharding) == ("expert",) for p, x in _flat(opt_state)
             if "['experts']" in p)


def test_factored_statistic_keeps_only_the_axes_it_is_sure_of():
  mesh = sharding.make_mesh(2, 2, 2)
  param = NamedSharding(mesh, P("expert", None, "model"))
  replicated = NamedSharding(mesh, P())
  stat = optimizer_sharding._stat_sharding  # pylint: disable=protected-access
  assert stat((4, 8, 16), (4, 8, 16), param, replicated) is param
  assert stat((4, 8), (4, 8, 16), param, replicated).spec == P("expert")
  assert stat((4, 16), (4, 8, 16), param, replicated).spec == P("expert", "model")
  # [4, 16, 16] minus one of its 16s: (expert, None) or (expert, model) -> the axis
  # on which they disagree is replicated.
  assert stat((4, 16), (4, 16, 16), param, replicated).spec == P("expert")
  other = NamedSharding(mesh, P("expert", "model"))
  assert stat((4, 16), (4, 16, 16), other, replicated).spec == P("expert")
  assert stat((1,), (4, 8, 16), param, replicated) is replicated
  assert stat((), (4, 8, 16), param, replicated) is replicated
