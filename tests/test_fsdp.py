"""FSDP (``mesh.fsdp``): sharded training equals one device, and the compiled step
gathers weights and reduce-scatters gradients (8 fake CPU devices).

Every weight and its optimizer state is split over ``fsdp`` (along M, or another
dimension for a weight without M; :func:`moe_jax.parallel.sharding.fsdp_spec`) and the
batch over data*fsdp*expert. Routing groups never depend on the mesh, so 20 training
steps on any mesh give the one-device losses up to float32 rounding, and the
DeepSeek-V3 selection biases (moved by whole-number choice counts) bit for bit.

``-m "not slow"`` runs a covering subset (every mesh and every model once, ``COVER``);
the whole 4 x 4 matrix is ``test_fsdp_matrix_equals_one_device`` under the ``slow``
marker (``pytest -m slow tests/test_fsdp.py``).
"""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from moe_jax.models import param_sharding
from moe_jax.parallel import sharding
from moe_jax.training import build, train
from tests.test_train import JAMBA_TINY, _zoo_config

STEPS = 20
# (data, fsdp, expert, model) of each mesh.
MESHES = {
    "fsdp8": (1, 8, 1, 1),
    "fsdp2_expert4": (1, 2, 4, 1),
    "data2_fsdp2_expert2": (2, 2, 2, 1),
    "fsdp2_model2_expert2": (1, 2, 2, 2),
}
MODELS = ("switch_small", "mixtral_small", "deepseek_small", "jamba_small")
# Every mesh and every model once.
COVER = [("switch_small", "fsdp8"), ("mixtral_small", "fsdp2_expert4"),
         ("deepseek_small", "data2_fsdp2_expert2"),
         ("jamba_small", "fsdp2_model2_expert2")]
# Tiny: a batch of 8 rows of 16 tokens (one row per data-parallel device on an 8-way
# batch split), one routing group per sequence, width 32 (8 divides it).
SMALL = {"batch_size": 8, "data.seq_len": 16, "moe.group_size": 16,
         "model.d_model": 32, "model.d_ff": 32, "warmup_steps": 0}


def _config(name):
  extra = dict(JAMBA_TINY) if name == "jamba_small" else {}
  if name == "deepseek_small":
    extra["moe.d_ff"] = 8
  config = _zoo_config(name, **SMALL, **extra)
  if config.moe.dispatch == "dropless":
    # The worst-case buffer: a finite one may drop rows that one device keeps.
    config.moe.ragged_buffer_factor = -1.0
  return config


def _setup(name, axes):
  """``(config, model, tx, state, state_sharding, mesh)`` on ``axes``."""
  return _setup_config(_config(name), axes)


def _setup_config(config, axes):
  data, fsdp, expert, model_axis = axes
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.expert, config.mesh.model = expert, model_axis
  model = build.make_model(config)
  mesh = sharding.make_mesh(data, expert, model_axis, fsdp=fsdp)
  param_sharding.shard_model(model, mesh)
  tx, _ = build.make_optimizer(config)
  state, state_sharding = train.init_train_state(model, tx, mesh, config.seed)
  return config, model, tx, state, state_sharding, mesh


def _batches(config, vocab=256):
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.data.seq_len)
  for _ in range(STEPS):
    tokens = rng.integers(0, vocab, size=shape, dtype=np.int32)
    yield {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1)}


_runs = {}


def _run(name, axes):
  """The 20 losses and the final selection biases (bytes) of ``name`` on ``axes``."""
  key = (name, axes)
  if key not in _runs:
    config, model, tx, state, state_sharding, mesh = _setup(name, axes)
    step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
    losses = []
    for batch in _batches(config):
      state, metrics = step(state, sharding.shard_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    biases = [np.asarray(x).tobytes() for x in jax.tree.leaves(state.model_state)]
    _runs[key] = (np.array(losses), biases)
  return _runs[key]


def _check_equal(name, mesh_name):
  one, one_bias = _run(name, (1, 1, 1, 1))
  got, got_bias = _run(name, MESHES[mesh_name])
  np.testing.assert_allclose(got, one, rtol=0, atol=1e-5)
  assert got_bias == one_bias
  if name == "deepseek_small":
    assert one_bias and any(np.frombuffer(b, np.float32).any() for b in one_bias)


@pytest.mark.parametrize("name,mesh_name", COVER)
def test_fsdp_equals_one_device(name, mesh_name):
  _check_equal(name, mesh_name)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", MODELS)
def test_fsdp_matrix_equals_one_device(name, mesh_name):
  _check_equal(name, mesh_name)


# ---------------------------------------------------------------------------------
# Placement: weights, optimizer state and batch
# ---------------------------------------------------------------------------------


def _fsdp_axes(spec):
  return [i for i, e in enumerate(spec)
          if e == "fsdp" or (isinstance(e, tuple) and "fsdp" in e)]


@pytest.mark.parametrize("mesh_name", ["fsdp8", "fsdp2_expert4"])
def test_every_weight_and_its_moments_are_split_over_fsdp(mesh_name):
  _, _, _, state, _, mesh = _setup("jamba_small", MESHES[mesh_name])
  fsdp = MESHES[mesh_name][1]
  params = jax.tree_util.tree_flatten_with_path(state.params)[0]
  replicated = []
  for path, w in params:
    axes = _fsdp_axes(w.sharding.spec)
    if not axes:
      replicated.append(jax.tree_util.keystr(path))
      continue
    assert len(axes) == 1
    # M where the weight has it (embed), else its largest dimension fsdp divides;
    # a weight that is not an expert's is split over the expert axis there too
    # (ZeRO-3 over every data-parallel device) when fsdp * expert divides it.
    entry = w.sharding.spec[axes[0]]
    is_expert = any(e == "expert" for e in w.sharding.spec)
    over = fsdp * (mesh.shape["expert"] if isinstance(entry, tuple) else 1)
    assert is_expert or over == fsdp * mesh.shape["expert"] or (
        w.shape[axes[0]] % (fsdp * mesh.shape["expert"])), jax.tree_util.keystr(path)
    assert w.sharding.shard_shape(w.shape)[axes[0]] == w.shape[axes[0]] // over
  # Only weights with no dimension that fsdp divides stay whole over it (fsdp=8:
  # Mamba's [R] dt_norm, R = ceil(32 / 16) = 2).
  assert replicated == [jax.tree_util.keystr(p) for p, w in params
                        if all(d % fsdp for d in w.shape)]
  assert len(replicated) < len(params) // 4
  for name in ("mu", "nu"):
    moments = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if name in jax.tree_util.keystr(p)]
    assert [m.sharding.spec for m in moments] == [w.sharding.spec for _, w in params]
  batch = sharding.shard_batch({"t": np.zeros((8, 16), np.int32)}, mesh)["t"]
  assert batch.sharding.shard_shape(batch.shape) == (1, 16)  # over fsdp*expert = 8
  expert_wi = state.params["blocks"][1]["ffn"]["experts"]["wi"]  # [E, M, H]
  assert tuple(expert_wi.sharding.spec)[:2] == (
      "expert" if mesh.shape["expert"] > 1 else None, "fsdp")


def test_fsdp_spec_rule():
  mesh = sharding.make_mesh(1, 2, 1, fsdp=4)
  P = jax.sharding.PartitionSpec
  # M (embed) carries fsdp: kept.
  assert sharding.fsdp_spec(P("expert", "fsdp"), (4, 8, 16), mesh) == P("expert", "fsdp")
  # No M: the largest free dimension fsdp divides, the first of equal ones; not an
  # expert's weight, so over (fsdp, expert) where fsdp * expert = 8 divides it.
  assert sharding.fsdp_spec(P(), (4, 64), mesh) == P(None, ("fsdp", "expert"))
  assert sharding.fsdp_spec(P(), (8, 8), mesh) == P(("fsdp", "expert"))
  assert sharding.fsdp_spec(P(), (12,), mesh) == P("fsdp")  # 8 does not divide 12
  assert sharding.fsdp_spec(P(None, "fsdp"), (4, 16), mesh) == P(None, ("fsdp", "expert"))
  # An expert's weight keeps E alone on the expert axis.
  assert sharding.fsdp_spec(P("expert"), (8, 6, 4), mesh) == P("expert", None, "fsdp")
  # Nothing fsdp divides (or a scalar): replicated over fsdp.
  assert sharding.fsdp_spec(P(), (6,), mesh) == P()
  assert sharding.fsdp_spec(P(), (), mesh) == P()
  assert sharding.fsdp_spec(P(), (8,), sharding.make_mesh(2)) == P()  # fsdp=1


def test_fsdp_config_checks_fail_before_compiling():
  from moe_jax.training.config import validate_config
  config = _config("switch_small")
  config.mesh.fsdp, config.mesh.expert = 4, 4
  errs = validate_config(config, num_devices=8)
  assert any("mesh.data*mesh.fsdp*mesh.expert*mesh.model" in e and "16" in e
             for e in errs), errs
  config.mesh.fsdp, config.mesh.expert, config.model.d_model = 8, 1, 36
  errs = validate_config(config, num_devices=8)
  assert any("model.d_model=36" in e and "mesh.fsdp=8" in e for e in errs), errs
  config.model.d_model, config.batch_size = 32, 4
  errs = validate_config(config, num_devices=8)
  assert any("batch size 4" in e and "mesh.data*mesh.fsdp*mesh.expert" in e
             for e in errs), errs
  config.batch_size, config.mesh.fsdp = 8, 0
  assert any(e.startswith("mesh.fsdp=0") for e in validate_config(config, num_devices=8))
  config.mesh.fsdp = 8
  assert validate_config(config, num_devices=8) == []


# ---------------------------------------------------------------------------------
# The compiled step: weights gathered one at a time, gradients reduce-scattered
# ---------------------------------------------------------------------------------

_OP = re.compile(
    r"^\s*(%\S+) = (.*?) (all-gather|all-reduce|reduce-scatter)(?:-start)?\(", re.M)


def _shapes(result_type):
  """The f32 array shapes of an HLO result type (a tuple has several)."""
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"f32\[([\d,]*)\]", result_type)]


def _collectives(hlo, kind):
  """``[(name, [shapes])]`` of every ``kind`` op of ``hlo``."""
  return [(name, _shapes(result)) for name, result, k in _OP.findall(hlo) if k == kind]


def _sliced_per_device(hlo, name, index, tuple_result):
  """True when every user of element ``index`` of ``name``'s result takes the
  partition id as well (it keeps its device's slice: all-reduce + dynamic-slice)."""
  if tuple_result:
    m = re.search(rf"^\s*(%\S+) = \S+ get-tuple-element\({re.escape(name)}\), "
                  rf"index={index}\b", hlo, re.M)
    if m is None:
      return False
    name = m.group(1)
  users = [line for line in hlo.splitlines()
           if re.search(rf"[(,] ?{re.escape(name)}[,)]", line)
           and not line.lstrip().startswith(name + " ")]
  return bool(users) and all("partition-id" in line for line in users)


def test_compiled_fsdp_step_gathers_each_weight_and_reduce_scatters_gradients():
  config = _config("switch_small")
  config.model.remat = "full"  # each block gathers its weights again for the backward
  _, model, tx, state, state_sharding, mesh = _setup_config(config, MESHES["fsdp8"])
  step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
  batch = sharding.shard_batch(next(_batches(config)), mesh)
  hlo = step.lower(state, batch).compile().as_text()

  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  block = [(jax.tree_util.keystr(p), w) for p, w in flat
           if "'blocks'" in jax.tree_util.keystr(p) and _fsdp_axes(w.sharding.spec)]
  assert len(block) >= 10
  gathered = [s for _, shapes in _collectives(hlo, "all-gather") for s in shapes]
  largest = max(w.size for _, w in flat)
  # One weight per all-gather, never several blocks' (or the model's) weights at once.
  assert gathered and all(np.prod(s) <= largest for s in gathered)
  # Every block weight is gathered whole, twice: for the forward and, rematerialised,
  # for the backward pass.
  for shape in {w.shape for _, w in block}:
    weights = sum(w.shape == shape for _, w in block)
    assert gathered.count(shape) >= 2 * weights, (shape, gathered)

  # Gradients: reduced over the batch and left on the weight's shard. GPU/TPU
  # compilers emit a reduce-scatter; XLA:CPU has no pass that forms one, and emits
  # the same as an all-reduce whose every user keeps its device's slice.
  scattered = [s for _, shapes in _collectives(hlo, "reduce-scatter") for s in shapes]
  reduced = _collectives(hlo, "all-reduce")
  experts = state.params["blocks"][1]["ffn"]["experts"]
  for w in (experts["wi"], experts["wo"], state.params["blocks"][0]["attn"]["query"]):
    shard = w.sharding.shard_shape(w.shape)
    if shard in scattered:
      continue
    hits = [(name, shapes.index(w.shape), len(shapes) > 1)
            for name, shapes in reduced if w.shape in shapes]
    assert hits, (w.shape, "no reduce-scatter or all-reduce of the gradient")
    assert all(_sliced_per_device(hlo, *hit) for hit in hits), w.shape


def test_fsdp_holds_an_eighth_of_the_weights_and_moments_per_device():
  # XLA's memory analysis of the compiled step (benchmarks/fsdp_memory.py at full
  # size): on data=8 each device holds all parameters and AdamW moments, on fsdp=8 an
  # eighth (all but a few odd-sized weights split; the batch is split either way).
  args = {}
  for axes in ((8, 1, 1, 1), (1, 8, 1, 1)):
    config, model, tx, state, state_sharding, mesh = _setup("switch_small", axes)
    step = train.make_train_step(model, tx, config, state_sharding=state_sharding)
    batch = sharding.shard_batch(next(_batches(config)), mesh)
    args[axes[1]] = step.lower(state, batch).compile().memory_analysis(
        ).argument_size_in_bytes
  params = sum(x.nbytes for x in jax.tree.leaves(state.params))
  assert args[1] > 3 * params
  assert args[8] < args[1] / 8 * 1.05
