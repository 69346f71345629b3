"""Expert parallelism and FSDP on a ``jax.sharding.Mesh`` with axes
``("data", "fsdp", "expert", "model")``.

Layout (flaxformer / t5x style, see ``docs/sharding.md``):

* The batch, and with it the MoE groups ``[G, S, M]``, is split over every
  data-parallel device: ``data``, ``fsdp`` and ``expert`` together, D =
  data*fsdp*expert shards.
* Expert weights ``[E, M, H]`` are split along E over ``expert`` (E / expert experts
  per device) and along H over ``model``; everything else is replicated or split over
  ``model`` where that is natural (Megatron-style ``mlp``, ``heads``, ``vocab``).
* FSDP: every weight is also split over ``fsdp``, along M (logical ``embed``), or,
  for a weight without M, along its largest dimension that ``fsdp`` divides
  (:func:`fsdp_spec`), and a weight that is not an expert's over ``expert`` as well;
  its optimizer state follows it. The compiled step all-gathers a weight where it is
  used and reduce-scatters its gradient.
* Inside :class:`~moe_jax.layers.moe_layer.MoeLayer` the expert buffers ``[E, G, C, M]``
  are pinned to E over ``expert`` and G over ``data*fsdp``. Going from the group layout
  to the buffer layout and back is an all-to-all within each ``expert`` row of the mesh.
* With fewer experts than the expert axis (E < expert, expert % E == 0) every device
  holds all E experts and computes them for its own groups: the expert axis then acts
  as extra data parallelism for that layer and no all-to-all is needed.

Here: the mesh, the rules table :data:`LOGICAL_RULES` that maps *logical* axis names
(:data:`LOGICAL_AXES`) to mesh axes (:func:`logical_to_spec`), the MoE layer's
activation layouts (:class:`Layout`, :class:`MeshLayout`), the placement of optimizer
state, batches and multi-process start-up. Placing a model's parameters is
:mod:`moe_jax.models.param_sharding`'s.

Nothing here changes the numbers: every constraint only moves data, and the grouping of
tokens never depends on the mesh, so a sharded run equals a single-device run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "model")
# The batch (and the MoE groups) is split over all data-parallel devices.
BATCH_AXES = ("data", "fsdp", "expert")
# Every weight is split over this axis as well (fully sharded data parallelism).
FSDP_AXIS = "fsdp"
EXPERT_AXIS = "expert"

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),   # B of activations, G of MoE groups
    ("expert", "expert"),    # E of expert weights
    ("mlp", "model"),        # H, hidden width of experts and dense FFNs
    ("heads", "model"),      # attention heads (Megatron: q/k/v column-, out row-split)
    ("kv_heads", "model"),   # N_kv key/value heads; replicated when fewer than `model`
    ("vocab", "model"),      # V of embeddings and output projection
    ("embed", "fsdp"),       # M, model width: the FSDP axis of every weight with M
    ("kv", None),            # per-head width
    ("latent", None),        # multi-head latent attention's compressed widths
    ("norm", None),          # scale / bias of LayerNorm and RMSNorm
    ("length", None),        # L
    ("layers", None),        # the stacked blocks of a scanned model (model.scan_layers)
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_RULES)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------


def validate_mesh(
    num_devices: int,
    data: int = 1,
    expert: int = 1,
    model: int = 1,
    num_experts: int | None = None,
    global_batch: int | None = None,
    *,
    seq_len: int | None = None,
    group_size: int | None = None,
    d_ff: int | None = None,
    num_processes: int = 1,
    fsdp: int = 1,
    d_model: int | None = None,
) -> list[str]:
  """Every problem with a mesh for a model and batch, one sentence each.

  Runs on plain integers, so config validation can call it before anything is traced.

  Args:
    num_devices: devices available (``jax.device_count()``).
    data, expert, model, fsdp: mesh axis sizes (``mesh.data``, ``mesh.expert``,
      ``mesh.model``, ``mesh.fsdp``).
    num_experts: E; must be a multiple of ``expert`` (E / expert experts per device)
      or divide it (the experts are then replicated over the expert axis).
    global_batch: B; must be a multiple of the data-parallel devices
      data*fsdp*expert.
    seq_len, group_size: L and the MoE group size S; with ``global_batch`` they check
      that the G = B*L / S groups split evenly over data*fsdp*expert devices.
    d_ff: H of the experts; must be a multiple of ``model``.
    num_processes: with more than one process the mesh must span all devices.
    d_model: M; must be a multiple of ``fsdp`` (every weight with M is split along
      it over ``fsdp``).

  Returns:
    A list of one-line errors naming the keys and numbers involved (empty if valid).
  """
  errors = []
  sizes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert,
           "mesh.model": model}
  for key, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      errors.append(f"{key}={v!r} must be a positive integer.")
  if errors:
    return errors
  total = data * fsdp * expert * model
  if total > num_devices:
    errors.append(
        f"mesh.data*mesh.fsdp*mesh.expert*mesh.model = {data}*{fsdp}*{expert}*{model} = "
        f"{total} devices, but only {num_devices} are available; shrink the mesh to at "
        f"most {num_devices} devices.")
  elif num_processes > 1 and total != num_devices:
    errors.append(
        f"mesh.data*mesh.fsdp*mesh.expert*mesh.model = {total} devices, but a run over "
        f"{num_processes} processes must use all {num_devices} devices.")
  dp = data * fsdp * expert
  if num_experts is not None:
    if num_experts % expert and expert % num_experts:
      errors.append(
          f"num_experts={num_experts} does not fit mesh.expert={expert}: E must be a "
          f"multiple of the expert axis ({num_experts} % {expert} = "
          f"{num_experts % expert}) or divide it (experts are then replicated); use "
          f"e.g. mesh.expert={math.gcd(num_experts, expert)}.")
  if global_batch is not None and global_batch % dp:
    errors.append(
        f"global batch size {global_batch} is not divisible by the {dp} data-parallel "
        f"devices (mesh.data*mesh.fsdp*mesh.expert = {data}*{fsdp}*{expert}); use a "
        f"multiple of {dp}.")
  if (global_batch is not None and seq_len is not None and group_size is not None
      and not global_batch % dp):
    tokens = global_batch * seq_len
    size = min(group_size, tokens)
    if tokens % size or (tokens // size) % dp:
      errors.append(
          f"moe.group_size={group_size} does not split the {tokens} tokens (B*L = "
          f"{global_batch}*{seq_len}) into a multiple of the {dp} data-parallel devices' "
          f"worth of groups; use a divisor of the {tokens // dp} tokens per device.")
  if d_ff is not None and d_ff % model:
    errors.append(
        f"moe.d_ff={d_ff} is not divisible by mesh.model={model}; the expert hidden "
        f"width H is split over the model axis.")
  if d_model is not None and d_model % fsdp:
    errors.append(
        f"model.d_model={d_model} is not divisible by mesh.fsdp={fsdp}; every weight "
        f"is split along M over the fsdp axis; use a divisor of {d_model} for mesh.fsdp.")
  return errors


def _auto_axis_types(n: int):
  axis_type = getattr(jax.sharding, "AxisType", None)
  return None if axis_type is None else (axis_type.Auto,) * n


def make_mesh(data: int = 1, expert: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None, *, fsdp: int = 1) -> Mesh:
  """A ``(data, fsdp, expert, model)`` mesh with Auto axes (sharding by constraints).

  Args:
    data, expert, model, fsdp: axis sizes.
    devices: the devices to use; their number must equal data*fsdp*expert*model. By
      default the first data*fsdp*expert*model of ``jax.devices()`` (all of them when
      the run spans several processes).

  Raises:
    ValueError: naming both numbers when the product does not match the devices.
  """
  shape = (data, fsdp, expert, model)
  for name, v in zip(MESH_AXES, shape):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"mesh.{name}={v!r} must be a positive integer.")
  total = math.prod(shape)
  if devices is None:
    available = jax.devices()
    if total > len(available):
      raise ValueError(
          f"mesh data*fsdp*expert*model = {data}*{fsdp}*{expert}*{model} = {total} "
          f"devices, but only {len(available)} devices are available.")
    if jax.process_count() > 1 and total != len(available):
      raise ValueError(
          f"a multi-process mesh must span all devices: data*fsdp*expert*model = "
          f"{total}, "
          f"but the {jax.process_count()} processes have {len(available)} devices.")
    devices = available[:total]
  elif total != len(devices):
    raise ValueError(
        f"mesh data*fsdp*expert*model = {data}*{fsdp}*{expert}*{model} = {total} "
        f"devices, but {len(devices)} devices were given.")
  devices = list(devices)
  axis_types = _auto_axis_types(len(shape))
  try:
    if axis_types is None:
      return jax.make_mesh(shape, MESH_AXES, devices=devices)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except TypeError:  # make_mesh without devices= / axis_types=
    grid = _device_grid(shape, devices)
  except NotImplementedError:
    # A TPU torus whose physical axes do not factor into the mesh's (8 x 8 on
    # 4x4x4): split physical axes, else lay the devices out in their order.
    grid = _device_grid(shape, devices)
  if axis_types is None:
    return Mesh(grid, MESH_AXES)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _device_grid(shape, devices) -> np.ndarray:
  """The devices as an array of ``shape``, following the physical topology where
  jax can (splitting physical axes if needed), else in the devices' order."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  for kwargs in ({}, {"allow_split_physical_axes": True}):
    try:
      return mesh_utils.create_device_mesh(shape, devices, **kwargs)
    except (NotImplementedError, ValueError, TypeError):
      continue
  return np.asarray(devices, dtype=object).reshape(shape)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def check_mesh(mesh: Mesh) -> None:
  missing = [a for a in MESH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(
        f"mesh axes {mesh.axis_names} lack {missing}; build the mesh with "
        "moe_jax.parallel.sharding.make_mesh (axes data, fsdp, expert, model; size 1 "
        "is fine).")
  axis_types = getattr(mesh, "axis_types", None)
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  if explicit is not None and axis_types and explicit in axis_types:
    raise ValueError(
        "moe_jax shards with sharding constraints and needs Auto mesh axes, got "
        f"{axis_types}; build the mesh with moe_jax.parallel.sharding.make_mesh.")


# ------------------------------------------------------------------------------------
# MoE layout
# ------------------------------------------------------------------------------------


def experts_are_sharded(num_experts: int, mesh: Mesh) -> bool:
  """True when E is split over the expert axis, False when experts are replicated.

  Raises:
    ValueError: naming both numbers when E neither is a multiple of the expert axis
      nor divides it.
  """
  size = mesh.shape["expert"]
  if num_experts % size == 0:
    return True
  if size % num_experts == 0:
    return False
  raise ValueError(
      f"num_experts={num_experts} does not fit mesh.expert={size}: E must be a multiple "
      f"of the expert axis or divide it.")


class Layout:
  """Where MoeLayer's activations live; this default is one device and does nothing.

  :class:`MeshLayout` subclasses it. ``constrain`` pins the layouts
  between which the tokens move: ``"groups"`` ``[G, S, M]`` and ``"group_buffers"``
  ``[E, G, C, M]`` with G over the data-parallel devices (each device dispatches its own
  groups locally), and ``"expert_buffers"`` ``[E, G, C, M]`` with E over the expert
  axis. Pinning the buffers on both sides of the expert computation makes XLA emit one
  all-to-all at dispatch and one at combine (without the ``"group_buffers"`` step it
  may all-gather the tokens instead).
  A layout is static module data, so it must be hashable.

  Attributes:
    group_shards: D, the number of devices the G axis is split over.
    num_devices: devices of the layout's mesh.
    mesh: the ``jax.sharding.Mesh`` (None on one device); ``dispatch="dropless"``
      runs its per-device work in a ``shard_map`` over it.
    experts_sharded: E is split over the mesh's ``expert`` axis.
  """

  group_shards: int = 1
  num_devices: int = 1
  mesh = None
  experts_sharded: bool = False

  def constrain(self, x: jax.Array, name: str) -> jax.Array:
    del name
    return x


SINGLE_DEVICE = Layout()


@dataclasses.dataclass(frozen=True)
class MeshLayout(Layout):
  """MoeLayer activations on a mesh: groups over data*fsdp*expert, buffers over expert.

  Attributes:
    mesh: a mesh with axes ``data``, ``fsdp``, ``expert``, ``model`` (Auto axis types).
    experts_sharded: E is split over ``expert`` (else experts are replicated and the
      buffers stay split along G like the groups, so no all-to-all happens).
  """

  mesh: Mesh
  experts_sharded: bool = True

  @property
  def group_shards(self) -> int:  # type: ignore[override]
    return _axis_size(self.mesh, BATCH_AXES)

  @property
  def num_devices(self) -> int:  # type: ignore[override]
    return self.mesh.devices.size

  def spec(self, name: str) -> P:
    if name == "groups":  # [G, S, M]
      return P(BATCH_AXES, None, None)
    if name == "group_buffers":  # [E, G, C, M] as filled locally, before the all-to-all
      return P(None, BATCH_AXES, None, None)
    if name == "expert_buffers":  # [E, G, C, M]
      if self.experts_sharded:
        return P("expert", ("data", FSDP_AXIS), None, None)
      return P(None, BATCH_AXES, None, None)
    raise ValueError(f"unknown MoE layout name {name!r}; use 'groups', "
                     "'group_buffers' or 'expert_buffers'.")

  def constrain(self, x: jax.Array, name: str) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(name)))


def moe_layout(mesh: Mesh, num_experts: int) -> MeshLayout:
  check_mesh(mesh)
  return MeshLayout(mesh, experts_are_sharded(num_experts, mesh))


# ------------------------------------------------------------------------------------
# Logical axes
# ------------------------------------------------------------------------------------


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Iterable[tuple[str, Any]] = LOGICAL_RULES,
    *,
    where: str = "",
) -> P:
  """Maps logical axis names of an array of ``shape`` to a PartitionSpec on ``mesh``.

  A dimension is split only if its mesh axes divide it and no earlier dimension uses
  them. An ``expert`` dimension smaller than the expert axis that divides it is
  replicated; any other misfit of ``expert`` is an error. A ``kv_heads`` dimension
  (grouped-query attention's N_kv) that divides its axis is replicated silently, as
  Megatron replicates KV heads when there are fewer than tensor-parallel ranks.
  Other misfits are replicated with a warning.
  """
  rules = dict(rules)
  where = where or "array"
  if len(names) != len(shape):
    raise ValueError(f"{where}: logical axes {tuple(names)} do not match its shape "
                     f"{tuple(shape)}.")
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"{where}: unknown logical axis {name!r}; known: "
                       f"{', '.join(rules)}.")
    axes = rules[name]
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in used)
    size = _axis_size(mesh, axes)
    if not axes or size == 1:
      out.append(None)
      continue
    if dim % size:
      if name == "expert" and size % dim:
        raise ValueError(f"{where}: E={dim} experts do not fit the expert axis of size "
                         f"{size}; E must be a multiple of it or divide it.")
      if name != "expert" and not (name == "kv_heads" and size % dim == 0):
        log.warning("%s: dimension %d (%s) is not divisible by mesh axes %s of size %d; "
                    "replicating it.", where, dim, name, axes, size)
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def fsdp_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` of a weight of ``shape``, split over the ``fsdp`` axis as well, and over
  ``expert`` too when the weight is not an expert's.

  A weight whose logical axes put ``fsdp`` on a dimension already (``embed``: M) keeps
  that dimension. Any other weight (a norm's ``[M]``, Mamba's ``[K, D_in]`` conv kernel,
  ``[D_in, N]`` ``A_log``, ...) is split over ``fsdp`` along its largest dimension that
  is not split yet and that ``fsdp`` divides (the first of equal ones); a weight with
  none (a scalar, a ``[R]`` norm that ``fsdp`` does not divide) stays replicated over
  ``fsdp``. So a dimension ``fsdp`` does not divide is never padded or refused: only
  M must be a multiple of it (config validation).

  A weight that does not use the ``expert`` axis (attention, dense FFNs, embeddings,
  routers: everything but the experts' E) would otherwise be replicated over it, E/X
  copies of the dense model's weights and moments. With FSDP on (``fsdp > 1``) ZeRO-3
  splits those over every data-parallel device, so its ``fsdp`` dimension is split
  over ``(fsdp, expert)`` when ``fsdp * expert`` divides it (MaxText shards ``embed``
  over its expert axis too). Without FSDP they stay replicated (plain expert and data
  parallelism).
  """
  size = mesh.shape.get(FSDP_AXIS, 1)
  experts = mesh.shape.get(EXPERT_AXIS, 1)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries if e is not None
          for a in ((e,) if isinstance(e, str) else e)}
  if size == 1 or (FSDP_AXIS in used and EXPERT_AXIS in used):
    return spec
  if FSDP_AXIS in used:
    dim = next(i for i, e in enumerate(entries)
               if e == FSDP_AXIS or (not isinstance(e, str) and e and FSDP_AXIS in e))
  else:
    free = [i for i, (d, e) in enumerate(zip(shape, entries))
            if e is None and d % size == 0]
    if not free:
      return spec
    dim = max(free, key=lambda i: (shape[i], -i))
    entries[dim] = FSDP_AXIS
  if (experts > 1 and EXPERT_AXIS not in used and entries[dim] == FSDP_AXIS
      and shape[dim] % (size * experts) == 0):
    entries[dim] = (FSDP_AXIS, EXPERT_AXIS)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


# ------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """NamedSharding of ``[B, ...]`` batches: B over ``("data", "fsdp", "expert")``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_batch_rows(mesh: Mesh, global_batch: int) -> slice:
  """The rows ``[start, stop)`` of the global batch that this process must supply.

  Each process reads only these rows (its devices' shards) and passes them to
  :func:`shard_batch`. With one process this is the whole batch.
  """
  dp = _axis_size(mesh, BATCH_AXES)
  if global_batch % dp:
    raise ValueError(f"global batch size {global_batch} is not divisible by the {dp} "
                     "data-parallel devices (mesh.data*mesh.fsdp*mesh.expert).")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop
           for idx in index_map.values()]
  rows = slice(min(starts), max(stops))
  covered = set()
  for a, b in zip(starts, stops):
    covered.update(range(a, b))
  if len(covered) != rows.stop - rows.start:
    raise ValueError("this process's devices do not hold a contiguous block of the "
                     "batch; build the mesh with moe_jax.parallel.sharding.make_mesh.")
  return rows


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's host arrays ``[b, ...]`` -> global ``jax.Array`` s ``[B, ...]``.

  ``b`` is the process's share of the global batch B (all of it with one process;
  see :func:`process_batch_rows`). Works across hosts through
  ``jax.make_array_from_process_local_data``.

  Raises:
    ValueError: naming both numbers when B is not a multiple of data*fsdp*expert.
  """
  sharding = batch_sharding(mesh)
  dp = _axis_size(mesh, BATCH_AXES)
  num_procs = len({d.process_index for d in mesh.devices.flat})
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_batch = value.shape[0] * num_procs
    if global_batch % dp:
      raise ValueError(
          f"batch[{key!r}]: global batch size {global_batch} is not divisible by the "
          f"{dp} data-parallel devices (mesh.data*mesh.fsdp*mesh.expert); use a "
          f"multiple of {dp}.")
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, (global_batch,) + value.shape[1:])
  return out


# ------------------------------------------------------------------------------------
# Multi-host
# ------------------------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> tuple[int, int]:
  """Calls ``jax.distributed.initialize`` once; returns (process_index, process_count).

  Must run before any other JAX call. Arguments left as None are read from
  ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID`` and ``JAX_LOCAL_DEVICE_IDS`` (comma-separated); if none of them
  is set, JAX detects the cluster itself (Cloud TPU, SLURM, Open MPI).
  """
  is_init = getattr(jax.distributed, "is_initialized", None)
  if is_init is not None and is_init():
    return jax.process_index(), jax.process_count()
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=timeout_s)
  return jax.process_index(), jax.process_count()
