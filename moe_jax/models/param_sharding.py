"""A model's parameters on a mesh (:func:`shard_model`), and how they are laid out.

Parameters carry *logical* axis names (:data:`moe_jax.parallel.sharding.LOGICAL_AXES`)
in their ``logical_axes`` metadata, declared by the module that creates them
(``nnx.Param(w, logical_axes=("vocab", "embed"))``, from a dict constant beside the
module: ``ATTENTION_AXES``, ``EXPERT_AXES``, ...; :mod:`moe_jax.layers.protocols`).
Nothing here knows a module class. :func:`undeclared_axes` lists the parameters that
declare none (they are replicated). The rules table
:data:`~moe_jax.parallel.sharding.LOGICAL_RULES` maps the names to mesh axes.
a parameter the rules leave unsplit over ``fsdp`` is split over it along another
dimension (:func:`~moe_jax.parallel.sharding.fsdp_spec`).
``shard_model`` writes the resolved spec into flax's ``out_sharding`` metadata as well,
so ``nnx.get_partition_spec`` and ``nnx.Optimizer`` (which builds its state from the
parameters' metadata) follow it. See ``docs/sharding.md``.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.layers import moe_layer
from moe_jax.layers.protocols import logical_axes
from moe_jax.models.scan import LAYERS_AXIS
from moe_jax.parallel.sharding import (LOGICAL_RULES, check_mesh, fsdp_spec,
                                       logical_to_spec, moe_layout)


# ------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _variables(model) -> list[tuple[tuple, nnx.Variable]]:
  """(path, variable) of every array Variable of ``model``."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Variable) and hasattr(node.get_value(), "shape")]


def undeclared_axes(model: Any) -> list[str]:
  """Paths of the parameters (``nnx.Param``, LoRA factors included) of ``model`` that
  declare no logical axes, or a number of them other than their rank."""
  bad = []
  for path, var in _variables(model):
    if isinstance(var, nnx.Param):
      names = logical_axes(var)
      if names is None or len(names) != var.get_value().ndim:
        bad.append(f"{_path_str(path)} {tuple(var.get_value().shape)}: {names}")
  return bad


def shard_model(model: Any, mesh: Mesh,
                rules: Iterable[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Places ``model``'s state on ``mesh`` in place and wires MoeLayer constraints.

  Every MoeLayer gets a :class:`MeshLayout` for ``mesh``. Every array Variable is
  moved to the NamedSharding of its logical axes (parameters without logical axes,
  RNG state and other variables are replicated); every parameter is split over the
  ``fsdp`` axis too (:func:`~moe_jax.parallel.sharding.fsdp_spec`). Each also gets
  ``logical_axes``, ``out_sharding`` and ``mesh`` metadata so that
  ``nnx.get_partition_spec`` and an ``nnx.Optimizer`` created afterwards follow the
  same layout.

  Args:
    model: any nnx graph node (a Module, or an ``nnx.Optimizer`` created before).
    mesh: a mesh from :func:`make_mesh`.
    rules: logical -> mesh axis rules.

  Returns:
    ``model``, for chaining.

  Raises:
    ValueError: before anything is compiled, when a MoE layer's E does not fit the
      expert axis (naming both numbers) or an annotation does not match its shape.
  """
  check_mesh(mesh)
  rules = tuple(rules)
  # Resolve everything first, so a bad layer leaves the model untouched.
  layouts = [(node, moe_layout(mesh, node.cfg.num_experts))
             for _, node in nnx.iter_graph(model)
             if isinstance(node, moe_layer.MoeLayer)]
  placements = []
  for path, var in _variables(model):
    names = logical_axes(var)
    shape = var.get_value().shape
    spec = P() if names is None else logical_to_spec(
        names, shape, mesh, rules, where=_path_str(path))
    if isinstance(var, nnx.Param) and names and names[0] == LAYERS_AXIS:
      # A scanned model's stacked blocks: fsdp splits one layer's dims, as unrolled.
      spec = P(None, *fsdp_spec(P(*tuple(spec)[1:]), shape[1:], mesh))
    elif isinstance(var, nnx.Param):
      spec = fsdp_spec(spec, shape, mesh)
    placements.append((var, names, spec))
  for layer, layout in layouts:
    layer.layout = layout
  for var, names, spec in placements:
    if names is not None:
      var.set_metadata(logical_axes=tuple(names))
    var.set_metadata(out_sharding=tuple(spec), mesh=mesh)
    var.set_value(_place(var.get_value(), NamedSharding(mesh, spec)))
  return model


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
  """``device_put`` that also works when the mesh spans several processes.

  Across processes every process must hold the same ``value`` (the same seed), and
  each one copies its devices' pieces of it. An abstract value (``jax.ShapeDtypeStruct``,
  a model from ``nnx.eval_shape``) only gets the sharding.
  """
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    data_sharding = NamedSharding(sharding.mesh, P(*sharding.spec))
    data = _place(jax.random.key_data(value), data_sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
  host = np.asarray(jax.device_get(value))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def describe_sharding(model: Any) -> dict[str, P]:
  """``{parameter path: PartitionSpec}`` of every array Variable, for start-up logs.

  Arrays not on a mesh (a single device) report ``PartitionSpec()``.
  """
  out = {}
  for path, var in _variables(model):
    sharding = getattr(var.get_value(), "sharding", None)
    out[_path_str(path)] = sharding.spec if isinstance(sharding, NamedSharding) else P()
  return out


def format_sharding(model: Any) -> str:
  """A table of path, shape, logical axes and PartitionSpec, one line per array."""
  rows = [("path", "shape", "logical axes", "spec")]
  specs = describe_sharding(model)
  for path, var in _variables(model):
    names = logical_axes(var)
    rows.append((_path_str(path), str(tuple(var.get_value().shape)),
                 "-" if names is None else str(tuple(names)),
                 str(specs[_path_str(path)])))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in rows)
