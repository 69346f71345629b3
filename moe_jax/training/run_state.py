"""The state of a training run and how it is restored.

:class:`TrainState` (what a step changes and a checkpoint saves) and its checkpoint
layouts, the per-step reseeding of the model's RNG streams, the split of a model into
graph, parameters and selection-bias state, and loading a run's config and model from
its work directory (:func:`load_model`).
"""

from __future__ import annotations

import json
import os
import zlib
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.parallel import sharding
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.training.config import default_config
from moe_jax.errors import TrainingError
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.training.build import RNG_STREAMS, make_model, make_optimizer, vocab_size_of
from moe_jax.layers.router_families import SelectionBias
from moe_jax.models.scan import (BLOCKS, SCAN, ScanUnit, block_kinds, find_unit,
                                 stack_layers, unstack_layers)
from moe_jax.models.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  """Everything a step changes (and a checkpoint saves).

  Attributes:
    step: i32[] completed updates.
    params: nested dict of parameters (``nnx.State.to_pure_dict()``).
    opt_state: optax state.
    rng: u32[2] raw key data of the run's base key.
    model_state: nested dict of the model's non-trainable state that the step updates
      outside the gradient: the MoE layers' selection biases (:func:`model_state`);
      empty when there are none. Left empty for a model that has some, the step
      starts from the model's own values.
  """

  step: jax.Array
  params: dict[str, Any]
  opt_state: Any
  rng: jax.Array
  model_state: dict[str, Any] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class _StateWithoutModelState:
  """The checkpoint layout of a :class:`TrainState` with an empty ``model_state``, the
  layout every checkpoint had before selection biases existed, so those still resume."""

  step: jax.Array
  params: dict[str, Any]
  opt_state: Any
  rng: jax.Array


def to_checkpoint(state: TrainState):
  if state.model_state:
    return state
  return _StateWithoutModelState(step=state.step, params=state.params,
                                 opt_state=state.opt_state, rng=state.rng)


def from_checkpoint(saved) -> TrainState:
  if isinstance(saved, TrainState):
    return saved
  return TrainState(step=saved.step, params=saved.params, opt_state=saved.opt_state,
                    rng=saved.rng)


def restore(checkpointer: Checkpointer, abstract: TrainState, *, data_iterator=None,
            scan_unit: ScanUnit | None = None
            ) -> tuple[int, TrainState, dict[str, Any]] | None:
  """``(step, state, meta)`` of the newest readable checkpoint, or None when there is
  none (:meth:`Checkpointer.restore`).

  ``abstract`` is the state's layout (``jax.ShapeDtypeStruct`` leaves, with their
  shardings). A checkpoint saved without ``model_state`` (a model without selection
  biases, or a fine-tuning run from before fine-tuning moved them) restores with an
  empty ``model_state``: the model's own selection biases. A checkpoint saved with the
  other ``model.scan_layers`` setting (its params have ``scan`` or not) is read in its
  own layout on one device, converted (:func:`~moe_jax.models.scan.stack_layers` /
  :func:`~moe_jax.models.scan.unstack_layers` of ``scan_unit``, the model's unit)
  and placed as ``abstract`` says.
  """
  run_stacked = SCAN in abstract.params

  def layout(saved_keys):
    if "model_state" in saved_keys and abstract.model_state:
      target = abstract
    else:
      target = to_checkpoint(abstract.replace(model_state={}))
    if (f"params/{SCAN}" in saved_keys) == run_stacked:
      return target
    if scan_unit is None:
      raise TrainingError("the checkpoint's blocks are laid out for the other "
                          "model.scan_layers setting and the model has no scan unit; "
                          "resume with the setting it was saved with.")
    convert = (partial(unstack_layers, pattern=scan_unit) if run_stacked
               else partial(stack_layers, pattern=scan_unit))
    host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                        jax.eval_shape(convert, target))

  restored = checkpointer.restore(layout, data_iterator=data_iterator)
  if restored is None:
    return None
  step, saved, meta = restored
  state = from_checkpoint(saved)
  if (SCAN in state.params) != run_stacked:
    convert = stack_layers if run_stacked else unstack_layers
    state = convert(state, scan_unit)
    place = lambda tree, like: jax.tree.map(  # noqa: E731
        lambda x, a: jax.device_put(x, a.sharding), tree, like)
    state = state.replace(
        step=place(state.step, abstract.step), rng=place(state.rng, abstract.rng),
        params=place(state.params, abstract.params),
        opt_state=place(state.opt_state, abstract.opt_state),
        model_state=(place(state.model_state, abstract.model_state)
                     if state.model_state else {}))
  return step, state, meta


def abstract_like(state: Any) -> Any:
  """``state`` as ``jax.ShapeDtypeStruct`` s with its shardings: the target a
  checkpoint is restored to, so a resumed run's leaves (parameters and optimizer
  state alike) land where a fresh run places them."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _path_salt(path) -> int:
  # Stable across processes (str hash() is salted per interpreter).
  return zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF


def reseed(model: nnx.Module, key: jax.Array) -> None:
  """Points every RNG stream of ``model`` at a key derived from ``key`` and its path.

  A scanned model's streams get the keys the unrolled model's get: those of its
  stacked streams (``scan/j/...``, one key per row) are drawn as the unrolled paths
  ``blocks/<prefix + r * period + j>/...`` are, in the unrolled order.
  """
  keys = {s: jax.random.fold_in(key, i) for i, s in enumerate(RNG_STREAMS)}
  if not getattr(getattr(model, "cfg", None), "scan_layers", False):
    nnx.reseed(model, policy=lambda path, k, shape: jax.random.fold_in(
        k, _path_salt(path)), **keys)
    return
  unit = model.unit
  streams = [(tuple(path), s) for path, s in nnx.iter_graph(model)
             if isinstance(s, nnx.RngStream) and s.key.tag in keys]
  scanned = [(p, s) for p, s in streams if str(p[0]) == SCAN]
  # (unrolled path, stream, row or None for an unstacked stream) in nnx.reseed's
  # order for the unrolled model: the prefix blocks, the rows in turn, the rest. The
  # MoE layers' shared streams (unstacked, under the first MoE block) come once.
  order = [(p, s, None) for p, s in streams if str(p[0]) == BLOCKS]
  for r in range(unit.repeats):
    for j in range(unit.period):
      for p, s in scanned:
        if int(p[1]) == j and (s.key.shape != () or r == 0):
          order.append(((BLOCKS, unit.block_index(r, j), *p[2:]), s,
                        r if s.key.shape != () else None))
  order += [(p, s, None) for p, s in streams if str(p[0]) not in (BLOCKS, SCAN)]
  draw = nnx.Rngs(**keys)
  rows: dict[int, list] = {}
  for path, stream, row in order:
    k = jax.random.fold_in(draw[stream.key.tag](), _path_salt(path))
    if row is None:
      stream.key.set_value(k)
    else:
      rows.setdefault(id(stream), [None] * unit.repeats)[row] = k
  for _, stream in scanned:
    value = jnp.stack(rows[id(stream)]) if id(stream) in rows else stream.key.get_value()
    stream.key.set_value(value)
    stream.count.set_value(jnp.zeros(value.shape, jnp.uint32))
  for _, stream, row in order:
    if row is None:
      stream.count.set_value(jnp.zeros((), jnp.uint32))


def split_model(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params.to_pure_dict(), rest


def split_trainable(model: nnx.Module, wrt: Any = nnx.Param):
  """``(graphdef, trainable, frozen, rest)``: pure dicts of the parameters the nnx
  filter ``wrt`` takes and of the other parameters, and the non-parameter state."""
  graphdef, trainable, frozen, rest = nnx.split(model, wrt, nnx.Param, ...)
  return graphdef, trainable.to_pure_dict(), frozen.to_pure_dict(), rest


def model_state(model: nnx.Module) -> dict[str, Any]:
  """The model's selection biases as a nested dict (``TrainState.model_state``)."""
  return nnx.state(model, SelectionBias).to_pure_dict()


def merge_model(graphdef, params, rest, model_state_):
  m = nnx.merge(graphdef, params, rest, copy=True)
  if model_state_:
    nnx.update(m, model_state_)
  return m


def single_device_copy(model: Transformer) -> Transformer:
  """A host copy of ``model`` with MoE layers laid out for one device (for sampling)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(_gather_to_host, state)
  copy = nnx.merge(graphdef, state)
  for _, module in nnx.iter_modules(copy):
    if isinstance(module, MoeLayer):
      module.layout = sharding.SINGLE_DEVICE
  return copy


def _gather_to_host(x):
  if not isinstance(x, jax.Array):
    return x
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.device_put(x, jax.local_devices()[0])


def load_config(workdir: str):
  """The ConfigDict a run in ``workdir`` was started with (``workdir/config.json``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise TrainingError(f"--workdir={workdir!r} holds no run (no config.json); train "
                        "first with experiments/train.py.")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  # Keys added since the run started take their defaults (which reproduce the old model),
  # except two whose defaults changed the routing: runs from before moe.queue_order
  # queued choice-major, and runs from before moe.balance_scope balanced per group.
  # Runs from before moe.router_init_scale drew the router at moe.init_scale.
  old_moe = saved.get("moe", {})
  if "init_scale" in old_moe and "router_init_scale" not in old_moe:
    old_moe["router_init_scale"] = old_moe["init_scale"]
  config = default_config()
  _update_known(config, saved)
  if "queue_order" not in old_moe:
    config.moe.queue_order = "choice_major"
  if "balance_scope" not in old_moe:
    config.moe.balance_scope = "group"
  return config


def _update_known(node, values: dict) -> None:
  for k, v in values.items():
    if isinstance(v, dict) and k in node and hasattr(node[k], "items"):
      _update_known(node[k], v)
    else:
      node[k] = v


def load_model(workdir: str, *, vocab_size: int | None = None
               ) -> tuple[Transformer, Any, int]:
  """``(model, config, step)`` from the latest readable checkpoint of a run
  (``vocab_size`` None: :func:`~moe_jax.training.build.vocab_size_of` the run)."""
  config = load_config(workdir)
  model = make_model(config, vocab_size=vocab_size or vocab_size_of(config, workdir=workdir))
  tx, _ = make_optimizer(config)
  graphdef, params, rest = split_model(model)
  abstract = jax.eval_shape(lambda p, s: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0)), model_state=s), params,
      model_state(model))
  # Onto this process's first device, whatever mesh the run was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints)
  try:
    restored = restore(checkpointer, abstract,
                       scan_unit=find_unit(block_kinds(config.model)))
  finally:
    checkpointer.close()
  if restored is None:
    raise TrainingError(f"--workdir={workdir!r} has no checkpoint yet.")
  step, state, _ = restored
  return merge_model(graphdef, state.params, rest, state.model_state), config, step
