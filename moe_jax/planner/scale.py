"""Full-size plans: the smallest topology on which a config trains or serves, found by
compiling (:func:`moe_jax.planner.compile.plan`), and the dispatch paths compared.

The search walks a ladder of topologies per chip, smallest first, starting at the first
rung where the training state alone (fp32 weights and Adam moments) would take at most
half of the devices' HBM, and compiles there: a step that fits moves one rung down (if
the rung below was not tried yet), one that does not fit moves up. So every answer is a
compile that fit next to one that did not (or the ladder's first rung). A search also
stops when two failing rungs in a row show a peak per device that doubling the devices
cut by less than a fifth: what does not shrink with the devices (a sequence's attention
scores, KV heads replicated over ``model``) will not fit higher up either.

The mesh on ``D`` devices (:func:`choose_mesh`): the experts over ``expert``, as many
shards as divide both E and D (each device holds E/X experts and their moments, and a
dropless exchange crosses X devices); everything else ZeRO-3 over ``fsdp`` (weights,
gradients and moments split D ways); the batch over all D devices; no tensor
parallelism (``model=1``), which the widths here do not need once FSDP splits them.
When X = D leaves ``fsdp = 1``, the dense weights are replicated, unless their
training state would pass a quarter of the HBM: then X is halved so that ``fsdp = 2``
splits them over every device.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from moe_jax.planner.compile import PlanError, plan
from moe_jax.planner.targets import CHIPS, make_target
from moe_jax.errors import ConfigError

# Topology ladders: v5p tori (chips = product); H100: one host of 1 to 8 GPUs, then
# hosts of 8.
LADDERS = {
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8",
            "8x8x16", "8x16x16"],
    "h100": ["1x1", "1x2", "1x4", "1x8", "2x8", "4x8", "8x8", "16x8", "32x8", "64x8", "128x8"],
}
# Bytes per parameter of the training state: fp32 weights and two fp32 Adam moments.
TRAIN_STATE_BYTES = 12
# The share of a device's HBM that the dense weights' training state may take
# replicated (fsdp = 1) before the mesh gives up expert parallelism for ZeRO-3.
REPLICATED_DENSE_LIMIT = 0.25


def choose_mesh(num_experts: int, devices: int, d_model: int,
                dense_state_bytes: float = 0.0,
                hbm_bytes: float = math.inf) -> dict[str, int]:
  """``{data, fsdp, expert, model}`` for ``devices`` (see the module docstring).

  ``dense_state_bytes`` is the training state of every weight that is not an expert's
  (attention, dense FFNs, embeddings, shared experts). With ``fsdp == 1`` it would be
  replicated on every device (:func:`moe_jax.parallel.sharding.fsdp_spec` splits it
  over ``(fsdp, expert)`` only when ``fsdp > 1``), so when it passes
  :data:`REPLICATED_DENSE_LIMIT` of ``hbm_bytes`` the expert axis is halved to give
  ``fsdp = 2``, and ZeRO-3 then splits it over every device."""
  expert = math.gcd(max(num_experts, 1), devices)
  if (expert == devices and expert > 1
      and dense_state_bytes > REPLICATED_DENSE_LIMIT * hbm_bytes):
    expert //= 2
  fsdp = devices // expert
  while fsdp > 1 and d_model % fsdp:  # fsdp splits M: keep it a divisor
    fsdp //= 2
  return {"data": devices // (expert * fsdp), "fsdp": fsdp, "expert": expert, "model": 1}


def mesh_reason(mesh: dict[str, int], num_experts: int) -> str:
  devices = mesh["data"] * mesh["fsdp"] * mesh["expert"] * mesh["model"]
  if mesh["expert"] < math.gcd(max(num_experts, 1), devices):
    why = [f"expert={mesh['expert']}: half of gcd(E={num_experts}, devices), so that "
           "fsdp splits the dense weights too (replicated, their state would pass "
           f"{REPLICATED_DENSE_LIMIT:.0%} of HBM)"]
  else:
    why = [f"expert={mesh['expert']}: gcd(E={num_experts}, devices)"]
  if mesh["fsdp"] > 1:
    why.append(f"fsdp={mesh['fsdp']}: ZeRO-3 over the rest")
  if mesh["data"] > 1:
    why.append(f"data={mesh['data']}: fsdp must divide d_model")
  return "; ".join(why)


def _devices(chip: str, topology: str) -> int:
  per_chip = 2 if chip in ("v4",) else 1  # compile-only v4 devices are TensorCores
  return math.prod(int(d) for d in topology.split("x")) * per_chip


# The attention kernel of training plans: the dense kernel's score matrix (one
# sequence's B * N * L * L float32, saved for the backward pass) was the largest
# buffer of Grok-1's 8K step (12 GiB per v5p chip) and 72 GiB of MaxText's Mixtral
# recipe; the blocked kernel keeps a tile's (moe_jax/models/attention_kernel.py), as
# the flash kernels of MaxText and Megatron-Core do.
TRAIN_ATTENTION_KERNEL = "blocked"
# The loss chunk of training plans (positions per chunk, ``loss_chunk``): the logits
# (L * V float32 per sequence, 4 GiB at Grok-1's 8K x 131K) are made a chunk at a
# time, and remade in the backward pass.
TRAIN_LOSS_CHUNK = 1024


def training_overrides(config, devices: int, global_tokens: int,
                       seq_len: int, dense_params: float = 0.0,
                       hbm_bytes: float = math.inf) -> dict[str, Any]:
  """The keys of a full-size training plan on ``devices``: bf16 compute over fp32
  weights, full rematerialisation, scanned layers, the blocked attention kernel and a
  chunked loss (:data:`TRAIN_ATTENTION_KERNEL`, :func:`train_loss_chunk`), and
  ``global_tokens`` per step in microbatches of one sequence per device
  (``grad_accum_steps``). ``dense_params`` (the weights that are not experts') and
  ``hbm_bytes`` choose between replicating them and ZeRO-3 (:func:`choose_mesh`)."""
  sequences = max(devices, -(-global_tokens // seq_len))
  sequences = -(-sequences // devices) * devices
  mesh = choose_mesh(config.moe.num_experts if config.model.moe_every else 1, devices,
                     config.model.d_model, dense_params * TRAIN_STATE_BYTES, hbm_bytes)
  return {"data.seq_len": seq_len, "batch_size": sequences,
          "grad_accum_steps": sequences // devices, "model.dtype": "bfloat16",
          "model.param_dtype": "float32", "model.remat": "full",
          "model.scan_layers": True, "model.attention_kernel": TRAIN_ATTENTION_KERNEL,
          "loss_chunk": train_loss_chunk(seq_len),
          **{f"mesh.{k}": v for k, v in mesh.items()}}


def train_loss_chunk(seq_len: int) -> int:
  """:data:`TRAIN_LOSS_CHUNK` positions, or fewer so that chunks tile ``seq_len``
  (the largest divisor of both: a sequence of 512 is one chunk of 512, whose logits
  are still remade in the backward pass rather than kept)."""
  return math.gcd(TRAIN_LOSS_CHUNK, seq_len)


def tensor_serving_mesh(config, devices: int, batch: int) -> dict[str, int]:
  """Tensor parallelism first: over ``model`` as far as the heads allow (every
  weight split along heads, H or V, the batch whole on each device), then the
  experts over ``expert`` and the rest over ``fsdp``, both batch axes, so their
  product must divide ``batch`` (the MoE groups are never split across devices)."""
  model = math.gcd(devices, config.model.num_heads)
  rest = devices // model
  experts = config.moe.num_experts if config.model.moe_every else 1
  expert = math.gcd(math.gcd(rest, experts), batch)
  return {"data": 1, "fsdp": rest // expert, "expert": expert, "model": model}


def expert_serving_mesh(config, devices: int, batch: int) -> dict[str, int]:
  """Expert parallelism first: the experts over ``expert``, as many shards as divide
  E, the devices and ``batch`` (the axis splits the batch's rows too, so each device
  routes its own rows' tokens and the MoE layers exchange them), then tensor
  parallelism over ``model`` as far as the heads allow, the rest over ``fsdp``.
  Tensor parallelism alone keeps every row's activations on every device: the MoE
  token buffers of a prefill chunk do not shrink with the devices."""
  experts = config.moe.num_experts if config.model.moe_every else 1
  expert = math.gcd(math.gcd(devices, experts), batch)
  model = math.gcd(devices // expert, config.model.num_heads)
  return {"data": 1, "fsdp": devices // (expert * model), "expert": expert,
          "model": model}


# Serving meshes by name (scale_plan's per-config choice; rows carry the name).
SERVING_MESHES = {"tensor": tensor_serving_mesh, "expert": expert_serving_mesh}


# The attention kernel of serving plans: a long prefill's dense score matrix
# (B * N * L * L float32) does not fit any device at 32K (moe_jax/models/attention_kernel.py).
SERVE_ATTENTION_KERNEL = "blocked"
# The prefill chunk of serving plans (tokens per row): the prompt goes through the
# model 1,024 tokens per row at a time (8,192 per pass at batch 8, the size of a
# serving engine's chunked-prefill budget), each chunk attending to the cache, so the
# activations (the MoE's token buffers above all, which tensor parallelism does not
# split) are a chunk's, not the whole context's. 4,096 left DeepSeek-V3's prefill at
# 362 GiB per device on 64 H100s.
SERVE_CHUNK = 1024


def serving_overrides(config, devices: int, batch: int,
                      mesh_rule: str = "tensor") -> dict[str, Any]:
  """bf16 weights and compute, scanned layers, the blocked attention kernel
  (:data:`SERVE_ATTENTION_KERNEL`), the mesh of :data:`SERVING_MESHES` ``[mesh_rule]``."""
  mesh = SERVING_MESHES[mesh_rule](config, devices, batch)
  return {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
          "model.scan_layers": True, "model.attention_kernel": SERVE_ATTENTION_KERNEL,
          **{f"mesh.{k}": v for k, v in mesh.items()}}


def try_plan(make_config: Callable[[int], Any], chip: str, topology: str,
         **plan_kwargs) -> dict[str, Any]:
  """One compile; a refusal or an OOM becomes a row with ``fits`` False."""
  target = make_target(f"{chip}:{topology}")
  config = make_config(len(target.devices))
  row: dict[str, Any] = {"chip": chip, "topology": topology,
                         "devices": len(target.devices)}
  try:
    row.update(plan(config, target, **plan_kwargs))
  except PlanError as e:  # does not fit, or the compiler refuses the step
    row.update({"fits": False, "error": str(e), "largest_buffers": e.buffers})
    need = re.search(r"needs ([0-9.]+) GiB", str(e))
    if need:  # the TPU compiler's own figure for the peak
      row["peak_needed"] = float(need.group(1)) * 2 ** 30
  except ConfigError as e:  # the config itself is wrong here: no point going on
    row.update({"fits": False, "error": str(e), "config_error": True})
  return row


def smallest_fit(make_config: Callable[[int], Any], chip: str, params_total: float,
                 bytes_per_param: float, log: Callable[[dict], None] = lambda r: None,
                 known: dict[str, dict[str, Any]] | None = None,
                 **plan_kwargs) -> list[dict[str, Any]]:
  """Every compile of the search for the smallest rung of ``LADDERS[chip]`` where the
  step fits; the last fitting row is the answer (none fit: the ladder ran out).
  ``known`` (topology -> row) holds compiles of an interrupted search, reused."""
  known = known or {}
  ladder = LADDERS[chip]
  hbm = CHIPS[chip].hbm_bytes
  start = 0
  while (start < len(ladder) - 1 and params_total * bytes_per_param
         / _devices(chip, ladder[start]) > 0.5 * hbm):
    start += 1
  rows, tried, i = [], {}, start
  while 0 <= i < len(ladder) and i not in tried:
    if ladder[i] in known:
      row = known[ladder[i]]
    else:
      row = try_plan(make_config, chip, ladder[i], **plan_kwargs)
      row["rung"] = i
      log(row)
    rows.append(row)
    tried[i] = row["fits"]
    if row.get("config_error") or _not_shrinking(rows):
      break
    if row["fits"]:
      if i - 1 in tried or i == 0:
        break
      i -= 1
    else:
      if i + 1 in tried:
        break
      i += 1
  return rows


def _peak(row: dict[str, Any]) -> float | None:
  return row.get("bytes_per_device", {}).get("peak") or row.get("peak_needed")


def _not_shrinking(rows: list[dict[str, Any]]) -> bool:
  """Two failing compiles in a row whose peak per device fell by less than a fifth
  from twice the devices: what does not shrink with more devices (an attention
  score matrix per sequence, replicated KV heads) will not fit higher up either."""
  if len(rows) < 2 or rows[-1].get("fits") or rows[-2].get("fits"):
    return False
  before, after = _peak(rows[-2]), _peak(rows[-1])
  return (before is not None and after is not None and rows[-1]["devices"] > rows[-2]["devices"]
          and after > 0.8 * before)


def search_done(rows: list[dict[str, Any]], chip: str) -> bool:
  """Whether the compiles ``rows`` of one search settle it: a fitting rung whose rung
  below failed (or the first rung), the top rung failing, or a config error."""
  ladder = LADDERS[chip]
  fits = {r["topology"]: r.get("fits") for r in rows}
  if any(r.get("config_error") for r in rows):
    return True
  for i, topology in enumerate(ladder):
    if fits.get(topology) and (i == 0 or fits.get(ladder[i - 1]) is False):
      return True
  tried = sorted((r for r in rows if r["topology"] in ladder),
                 key=lambda r: ladder.index(r["topology"]))
  return fits.get(ladder[-1]) is False or _not_shrinking(tried)


def answer(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The smallest fitting row of a search (None when nothing fit)."""
  fits = [r for r in rows if r.get("fits")]
  return min(fits, key=lambda r: r["devices"]) if fits else None
