"""A model's parameters on a mesh (:func:`shard_model`), and how they are laid out.

Parameters carry *logical* axis names (:data:`moe_jax.parallel.sharding.LOGICAL_AXES`).
They come from Variable metadata ``logical_axes`` when present (``nnx.Param(w,
logical_axes=("vocab", "embed"))``), otherwise from per-module defaults (``EXPERT_AXES``
of :class:`~moe_jax.layers.experts.Experts`, ``DENSE_AXES`` of
:class:`~moe_jax.layers.experts.DenseFfn`, the router, ``nnx.Embed`` and the norms). The
rules table :data:`~moe_jax.parallel.sharding.LOGICAL_RULES` maps them to mesh axes;
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

from moe_jax.layers import experts as experts_lib
from moe_jax.layers import moe_layer
from moe_jax.parallel.sharding import (LOGICAL_RULES, check_mesh, fsdp_spec,
                                       logical_to_spec, moe_layout)

# Defaults for modules that do not annotate their parameters, by module type.
# [M, E]: E of the logits stays replicated; W_noise of noisy top-k alike.
ROUTER_AXES = {"kernel": ("embed", None), "noise_kernel": ("embed", None)}
EMBED_AXES = {"embedding": ("vocab", "embed")}
NORM_AXES = {"scale": ("norm",), "bias": ("norm",)}



# ------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------


def default_logical_axes(module: Any, name: str) -> tuple[str | None, ...] | None:
  """Logical axes of parameter ``name`` of ``module`` when it carries none itself."""
  if isinstance(module, experts_lib.Experts):
    return experts_lib.EXPERT_AXES.get(name)
  if isinstance(module, experts_lib.DenseFfn):
    return experts_lib.DENSE_AXES.get(name)
  if isinstance(module, moe_layer.Router):
    return ROUTER_AXES.get(name)
  if isinstance(module, nnx.Embed):
    return EMBED_AXES.get(name)
  if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)):
    return NORM_AXES.get(name)
  return None


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _variables(model) -> list[tuple[tuple, Any, nnx.Variable]]:
  """(path, parent, variable) of every array Variable of ``model``."""
  nodes = dict(nnx.iter_graph(model))
  out = []
  for path, node in nodes.items():
    if isinstance(node, nnx.Variable) and hasattr(node.get_value(), "shape"):
      out.append((path, nodes.get(path[:-1]), node))
  return out


def logical_axes_of(parent: Any, name: Any, var: nnx.Variable):
  """The logical axes of ``var``: its ``logical_axes`` metadata, else the default."""
  names = var.get_metadata("logical_axes", None)
  if names is None and isinstance(var, nnx.Param):
    names = default_logical_axes(parent, name)
  return names


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
  for path, parent, var in _variables(model):
    names = logical_axes_of(parent, path[-1], var)
    shape = var.get_value().shape
    spec = P() if names is None else logical_to_spec(
        names, shape, mesh, rules, where=_path_str(path))
    if isinstance(var, nnx.Param):
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
  each one copies its devices' pieces of it.
  """
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
  for path, _, var in _variables(model):
    sharding = getattr(var.get_value(), "sharding", None)
    out[_path_str(path)] = sharding.spec if isinstance(sharding, NamedSharding) else P()
  return out


def format_sharding(model: Any) -> str:
  """A table of path, shape, logical axes and PartitionSpec, one line per array."""
  rows = [("path", "shape", "logical axes", "spec")]
  specs = describe_sharding(model)
  for path, parent, var in _variables(model):
    names = logical_axes_of(parent, path[-1], var)
    rows.append((_path_str(path), str(tuple(var.get_value().shape)),
                 "-" if names is None else str(tuple(names)),
                 str(specs[_path_str(path)])))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in rows)
