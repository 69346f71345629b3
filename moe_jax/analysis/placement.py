"""Meshes: where experts and parameters live, and the bytes each device holds."""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax.layers import moe_layer
from moe_jax.analysis.trace import path_str


def _value(x: Any) -> Any:
  return x.get_value() if isinstance(x, nnx.Variable) else x


def experts_by_device(layer: Any) -> dict[jax.Device, list[int]]:
  """The experts whose weights each device holds (all of them where replicated).

  Args:
    layer: a :class:`~moe_jax.layers.moe_layer.MoeLayer`, its ``experts`` module, or a
      placed ``[E, ...]`` array.
  """
  if isinstance(layer, moe_layer.MoeLayer):
    layer = layer.experts
  arr = _value(getattr(layer, "wi", layer))
  num_experts = arr.shape[0]
  out = {}
  for device, index in arr.sharding.devices_indices_map(arr.shape).items():
    start, stop, _ = index[0].indices(num_experts)
    out[device] = list(range(start, stop))
  return out


def _params_with_parents(model: Any):
  nodes = dict(nnx.iter_graph(model))
  for path, node in nodes.items():
    if isinstance(node, nnx.Param) and hasattr(node.get_value(), "shape"):
      yield path, nodes.get(path[:-1]), node


def placed_bytes_per_device(model: Any) -> dict[jax.Device, int]:
  """Bytes of ``nnx.Param`` data that each device actually holds (read off the
  arrays' shards; a replicated parameter counts on every device)."""
  out: dict[jax.Device, int] = collections.Counter()
  for _, _, var in _params_with_parents(model):
    for shard in var.get_value().addressable_shards:
      out[shard.device] += shard.data.nbytes
  return dict(out)


def planned_bytes_per_device(model: Any, mesh: jax.sharding.Mesh) -> dict[str, int]:
  """Bytes of parameters per device if ``model`` were placed on ``mesh``.

  Uses the same logical-axis rules as :func:`moe_jax.models.param_sharding.shard_model`,
  but only shapes, so ``model`` may be abstract (``nnx.eval_shape``) and nothing is
  allocated. Every device holds the same amount under these rules.

  Returns:
    ``{"experts": ..., "other": ..., "total": ...}`` bytes per device; ``experts`` are
    the parameters of :class:`~moe_jax.layers.experts.Experts` modules.
  """
  from moe_jax.layers import experts as experts_lib  # pylint: disable=import-outside-toplevel
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  from moe_jax.layers.protocols import logical_axes  # pylint: disable=import-outside-toplevel

  out = {"experts": 0, "other": 0}
  for path, parent, var in _params_with_parents(model):
    value = var.get_value()
    names = logical_axes(var)
    if names is None:
      spec = jax.sharding.PartitionSpec()
    else:
      spec = sharding.logical_to_spec(names, value.shape, mesh, where=path_str(path))
    spec = sharding.fsdp_spec(spec, value.shape, mesh)  # as shard_model splits Params
    shard = NamedSharding(mesh, spec).shard_shape(tuple(value.shape))
    nbytes = math.prod(shard) * np.dtype(value.dtype).itemsize
    out["experts" if isinstance(parent, experts_lib.Experts) else "other"] += nbytes
  out["total"] = out["experts"] + out["other"]
  return out
