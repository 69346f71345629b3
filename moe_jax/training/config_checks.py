"""The config check's parts that concern more than one key: the data sources and
mixtures, the objective's causality, routed Mixture-of-Depths, microbatch groups and
the mesh. Each returns its sentences (naming the key and the fix);
:func:`moe_jax.training.config.validate_config` collects them."""

from __future__ import annotations

import math
import os

from moe_jax.errors import ConfigError
from moe_jax.layers.router_families import ROUTERS, causality
from moe_jax.models.layer_pattern import MAMBA
from moe_jax.training.config_views import is_int, is_real, model_pattern


def dataset_name_error(name) -> str | None:
  """Why the data module cannot serve ``name`` (listing what is available), or None."""
  try:
    from moe_jax.data import sources  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - the data package is part of moe_jax
    return f"the data package cannot be imported ({e})"
  if not isinstance(name, str) or not name:
    return ("must name a dataset; available: "
            f"{', '.join(sources.AVAILABLE_BUILTIN)}, a TFDS text dataset, or "
            f"'{sources.TEXT_PREFIX}<glob>'.")
  if name in sources.AVAILABLE_BUILTIN or name.startswith(sources.TEXT_PREFIX):
    return None
  if name.startswith("tokens:"):  # pretokenized shards (experiments/pretokenize.py)
    path = os.path.expanduser(name[len("tokens:"):])
    return (None if os.path.isfile(os.path.join(path, "meta.json")) else
            f"{path} holds no meta.json; write it with experiments/pretokenize.py.")
  try:
    sources.check_tfds_name(name)
  except ValueError as e:
    return str(e)
  return None


def streaming_errors(d, datasets) -> list[str]:
  """``data.streaming``, ``data.num_workers`` and ``data.mixture`` (its form, weights
  and sources), one line each."""
  errors = []
  if not isinstance(d.get("streaming", False), bool):
    errors.append(f"data.streaming={d.get('streaming')!r} must be True or False.")
  workers = d.get("num_workers", 0)
  if not (is_int(workers) and workers >= 0):
    errors.append(f"data.num_workers={workers!r} must be a non-negative integer "
                  "(0: read and tokenize in the training process).")
  if d.get("mixture", ""):
    from moe_jax.data.streaming import parse_mixture  # pylint: disable=import-outside-toplevel
    try:
      spec = parse_mixture(d.mixture)
    except ConfigError as e:
      return errors + e.errors
    for name, _ in spec:
      why = (None if name in datasets else "not a known dataset; available: "
             f"{', '.join(datasets)}.") if datasets is not None else dataset_name_error(name)
      if why:
        errors.append(f"data.mixture={d.mixture!r}: source {name!r}: {why}")
  elif str(d.get("name", "")).startswith("tokens:") and not d.get("streaming", False):
    errors.append(f"data.name={d.name!r} (pretokenized shards) is read by the streaming "
                  "pipeline only; set data.streaming=True.")
  return errors


def objective_errors(config, moe_view) -> list[str]:
  """``model.objective``, and the routers that see later tokens of their group
  (expert choice, ``moe.batch_priority``, choice-major queues with ``top_k > 1`` and a
  capacity; :func:`moe_jax.layers.router_families.causality`): a causal LM needs
  ``moe.allow_noncausal_routing`` for them, masked LM allows them."""
  from moe_jax.training.objectives import OBJECTIVES  # pylint: disable=import-outside-toplevel
  m, moe = config.model, config.moe
  name = m.get("objective", "causal_lm")
  objective = OBJECTIVES.get(name) if isinstance(name, str) else None
  if objective is None:
    return [f"model.objective={name!r} is unknown; use one of "
            f"{', '.join(map(repr, OBJECTIVES))}."]
  errors = []
  if not objective.causal:
    try:
      mamba = any(kind.mixer == MAMBA for kind in model_pattern(config))
    except (TypeError, ValueError):  # bad pattern keys are reported on their own
      mamba = False
    if mamba:
      errors.append(f"model.objective={name!r} needs bidirectional attention in every "
                    "block, but model.attn_layer_period="
                    f"{m.get('attn_layer_period', 1)!r} makes some blocks Mamba (a "
                    "causal scan); use model.attn_layer_period=1 or "
                    "model.objective='causal_lm'.")
    if m.get("mod_every", 0):
      errors.append(f"model.mod_every={m.mod_every!r} routes blocks with a causal "
                    f"predictor, which model.objective={name!r} has no use for; use "
                    "model.mod_every=0 or model.objective='causal_lm'.")
    if m.get("mtp_depth", 0):
      errors.append(f"model.mtp_depth={m.mtp_depth!r} predicts later tokens, which "
                    f"model.objective={name!r} does not; use model.mtp_depth=0 or "
                    "model.objective='causal_lm'.")
  priority = moe.get("batch_priority", False)
  if not isinstance(priority, bool):
    errors.append(f"moe.batch_priority={priority!r} must be True or False.")
  if (m.moe_every and not objective.noncausal_routing
      and not moe.allow_noncausal_routing and moe.router in ROUTERS
      and isinstance(priority, bool)):
    try:
      reason = causality(moe_view)
    except (TypeError, ValueError):  # bad sizes are reported on their own
      reason = None
    if reason is not None:
      key = ("moe.router" if not ROUTERS[moe.router].tokens_choose else
             "moe.batch_priority" if priority else "moe.queue_order")
      fix = ("use --config.moe.queue_order=token_major (or auto), "
             if key == "moe.queue_order" else "")
      errors.append(
          f"{key}={moe.get(key.split('.')[1])!r} is not causal: {reason}, so a causal LM "
          f"trained with it cannot generate the same way; {fix}use "
          "--config.model.objective=masked_lm, or set "
          "--config.moe.allow_noncausal_routing=True to train it anyway.")
  return errors


def routed_moe_errors(config) -> list[str]:
  """An MoE layer in a Mixture-of-Depths routed block routes the ``B*k`` selected
  tokens, ``k = ceil(mod_capacity * L)``: a fixed ``moe.group_size`` must split them
  over the data-parallel devices too (``moe.group_size=0``, one group per sequence,
  always does)."""
  m, moe = config.model, config.moe
  every, capacity = m.get("mod_every", 0), m.get("mod_capacity", 0.125)
  batch, seq_len, size = config.batch_size, config.data.seq_len, moe.group_size
  accum = config.get("grad_accum_steps", 1)
  if is_int(batch) and is_int(accum) and accum > 1 and batch % accum == 0:
    batch //= accum  # the MoE layers route one microbatch at a time
  mesh = config.mesh
  if not (is_int(every) and every >= 2 and is_real(capacity) and 0 < capacity <= 1
          and all(is_int(v) and v >= 1 for v in (batch, seq_len, size, mesh.data,
                                                  mesh.fsdp, mesh.expert,
                                                  m.num_layers))):
    return []
  try:
    pattern = model_pattern(config)
  except (TypeError, ValueError):  # bad pattern keys are reported on their own
    return []
  if not any(kind.ffn == "moe" and i % every == every - 1
             for i, kind in enumerate(pattern)):
    return []
  k = math.ceil(capacity * seq_len - 1e-9)
  tokens, dp = batch * k, mesh.data * mesh.fsdp * mesh.expert
  group = min(size, tokens)
  if k >= 1 and (tokens % group or (tokens // group) % dp):
    return [f"moe.group_size={size} does not split the {tokens} tokens that the MoE "
            f"layers of routed blocks see (B*k = {batch}*{k}, k = ceil(model.mod_capacity"
            f" * {seq_len})) into a multiple of the {dp} data-parallel devices' worth of "
            "groups; use moe.group_size=0 (one group per sequence)."]
  return []


def microbatch_group_errors(config, per_device: int, dp: int) -> list[str]:
  """With ``grad_accum_steps`` N > 1 the MoE layers route microbatches of
  ``batch_size / N`` rows: a fixed ``moe.group_size`` must split their tokens over the
  data-parallel devices as it splits the global batch's."""
  accum, size, seq_len = (config.get("grad_accum_steps", 1), config.moe.group_size,
                          config.data.seq_len)
  if not (config.model.moe_every and per_device and is_int(accum) and accum > 1
          and per_device % accum == 0 and is_int(size) and size >= 1
          and is_int(seq_len) and seq_len >= 1):
    return []
  group = min(size, per_device * dp * seq_len)  # the global batch's groups
  tokens = per_device // accum * seq_len  # a microbatch's, per device
  if tokens % group:
    return [f"grad_accum_steps={accum} leaves {tokens} tokens per device in a "
            f"microbatch, not a multiple of the {group}-token routing groups "
            f"(moe.group_size={size}), so the microbatches would route in other groups "
            "than the global batch; use fewer grad_accum_steps, a smaller "
            "moe.group_size, or 0 (one group per sequence)."]
  return []


def mesh_errors(config, num_devices, process_count) -> list[str]:
  mesh = config.mesh
  num_experts = config.moe.num_experts if config.model.moe_every else None
  batch = config.batch_size if is_int(config.batch_size) and config.batch_size > 0 else None
  try:
    from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
    validate_mesh = sharding.validate_mesh
  except (ImportError, AttributeError):
    validate_mesh = None
  errors = []
  size = mesh.data * mesh.fsdp * mesh.expert * mesh.model
  if num_devices is not None and validate_mesh is not None:
    seq_len = config.data.seq_len
    seq_len = seq_len if is_int(seq_len) and seq_len > 0 else None
    group_size = config.moe.group_size if num_experts else None
    if is_int(group_size) and group_size == 0:
      group_size = seq_len  # one group per sequence
    if not (is_int(group_size) and group_size >= 1):
      group_size = None  # reported by the MoE rules
    # Both hidden widths are split over the model axis: the dense FFNs' model.d_ff
    # and, when set, the experts' moe.d_ff (0: the experts use model.d_ff).
    d_ff, expert_width = config.model.d_ff, config.moe.get("d_ff", 0)
    d_ff_ok = is_int(d_ff) and d_ff >= 1
    expert_width_set = num_experts and is_int(expert_width) and expert_width >= 1
    d_model = config.model.d_model
    for msg in validate_mesh(num_devices=num_devices, data=mesh.data, expert=mesh.expert,
                             model=mesh.model, num_experts=num_experts,
                             global_batch=batch, seq_len=seq_len, group_size=group_size,
                             d_ff=expert_width if expert_width_set else None,
                             fsdp=mesh.fsdp,
                             d_model=d_model if is_int(d_model) and d_model >= 1
                             else None):
      errors.append(msg if msg.startswith("mesh.") else f"mesh: {msg}")
    if d_ff_ok and d_ff % mesh.model:
      errors.append(f"mesh: model.d_ff={d_ff} is not divisible by mesh.model="
                    f"{mesh.model}; the FFN hidden width is split over the model axis.")
  elif num_devices is not None:
    if size != num_devices:
      errors.append(f"mesh.data*mesh.fsdp*mesh.expert*mesh.model={size} must equal the "
                    f"{num_devices} available device(s); change --config.mesh.*.")
  # validate_mesh checks how the batch splits over the mesh; without it, check here.
  shards = (process_count if validate_mesh
            else mesh.data * mesh.fsdp * mesh.expert * process_count)
  if batch and batch % shards:
    errors.append(f"batch_size={batch} must be divisible by {shards} (the batch shards "
                  "over mesh.data*mesh.fsdp*mesh.expert and the processes); change "
                  "--config.batch_size.")
  return errors
