"""Ahead-of-time plans: a config's train step (or its prefill and decode steps)
compiled for a TPU or GPU target, and what the compiler says about it.

:func:`plan` builds the model abstractly (``nnx.eval_shape``: no weight is
allocated), places it on the config's mesh over the target's compile-only devices,
lowers and compiles the real step (:func:`moe_jax.training.steps.make_train_step`), and
reads the compiled module: memory per device (``memory_analysis``), FLOPs, HBM traffic
and collectives (:mod:`moe_jax.planner.hlo`). Every ``"auto"`` choice is resolved for
the target (:func:`moe_jax.parallel.backend.compile_target`).

The roofline (``step_s_bound``, ``mfu_bound``) is a bound, not a measurement: the step
cannot run faster than its compiled FLOPs at the chip's peak, nor than reading its
arguments and writing its results once at the chip's HBM bandwidth.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.errors import ConfigError
from moe_jax.inference import decode
from moe_jax.models.param_sharding import shard_model
from moe_jax.models.sizes import count_params, flops_per_token
from moe_jax.parallel import backend, optimizer_sharding, sharding
from moe_jax.planner import hlo, memory_report
from moe_jax.planner.targets import Target
from moe_jax.training import build
from moe_jax.training.config import validate_config
from moe_jax.training.run_state import TrainState, model_state, split_trainable
from moe_jax.training.steps import make_train_step

MODES = ("train", "serve")
# What a compiler's refusal raises (jax.errors.JaxRuntimeError in jax >= 0.4.36).
_COMPILER_ERRORS = (getattr(jax.errors, "JaxRuntimeError", RuntimeError), RuntimeError)
MESH_KEYS = ("data", "fsdp", "expert", "model")


class PlanError(ConfigError):
  """The step does not compile or does not fit: one line with the cause and a knob;
  ``buffers``: the compiler's largest buffers, when it reported them
  (:func:`moe_jax.planner.memory_report.largest_buffers`)."""

  def __init__(self, message: str, buffers: list[dict] | None = None):
    super().__init__([message])
    self.buffers = buffers or []


def resolve_mesh(config, num_devices: int) -> dict[str, int]:
  """The config's mesh on ``num_devices``: as given when its product matches, else
  ``mesh.data`` grows to fill the devices (the other axes as the config sets them).

  Raises:
    PlanError: when fsdp*expert*model does not divide the devices.
  """
  mesh = {k: int(config.mesh.get(k, 1)) for k in MESH_KEYS}
  if math.prod(mesh.values()) == num_devices:
    return mesh
  rest = mesh["fsdp"] * mesh["expert"] * mesh["model"]
  if num_devices % rest:
    raise PlanError(
        f"mesh fsdp*expert*model = {mesh['fsdp']}*{mesh['expert']}*{mesh['model']} = "
        f"{rest} does not divide the target's {num_devices} devices; set "
        "--config.mesh.* to a factorisation of the device count.")
  mesh["data"] = num_devices // rest
  return mesh


def _with_sharding(x, s):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of every array of ``tree`` (ShapeDtypeStructs with
  shardings): the largest shard of each."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape"):
      continue
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize if not jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else 0
  return int(total)


def abstract_model(config, mesh):
  """The config's model with ShapeDtypeStruct leaves, placed on ``mesh`` (abstractly)."""
  vocab = build.vocab_size_of(config)
  model = nnx.eval_shape(lambda: build.make_model(config, vocab_size=vocab))
  return shard_model(model, mesh)


def _abstract_train_state(model, tx, mesh):
  _, params, _, _ = split_trainable(model, nnx.Param)
  opt_sharding = optimizer_sharding.optimizer_state_sharding(tx, params)
  opt_state = jax.tree.map(_with_sharding, jax.eval_shape(tx.init, params), opt_sharding)
  replicated = NamedSharding(mesh, P())
  rng = _with_sharding(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                       replicated)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     params=params, opt_state=opt_state, rng=rng,
                     model_state=jax.tree.map(lambda x: _with_sharding(x, replicated),
                                              model_state(model)))
  return state, jax.tree.map(lambda x: x.sharding, state)


def _compile(fn, args, what: str, target: Target):
  """``(compiled, seconds, largest buffers)``; the compiler's refusal becomes one
  PlanError line. The compiler dumps into a temporary folder, for its memory usage
  report (:mod:`moe_jax.planner.memory_report`), which an OOM's line quotes too."""
  start = time.perf_counter()
  try:
    lowered = fn.lower(*args)
  except ValueError as e:  # a layout the model's own checks refuse while tracing
    raise PlanError(f"{what} on {target.name}: {' '.join(str(e).split())[:400]}"
                    ) from None
  with tempfile.TemporaryDirectory(prefix="moe_jax_plan_") as dump:
    try:
      compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
      error = None
    except _COMPILER_ERRORS as e:
      error = " ".join(str(e).split())
    buffers = memory_report.largest_buffers(dump)
  if error is not None:
    _refused(error, what, target, buffers)
  return compiled, time.perf_counter() - start, buffers


def _refused(msg: str, what: str, target: Target, buffers: list[dict]):
  """Raises the PlanError line of a compiler's refusal ``msg``."""
  if "RESOURCE_EXHAUSTED" in msg or "exceeds available" in msg.lower():
    m = re.search(r"\(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)",
                  msg)
    if m:
      scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
      need = float(m.group(1)) * scale[m.group(2)]
      have = float(m.group(3)) * scale[m.group(4)]
      detail = (f"needs {need / 2**30:.2f} GiB of its {have / 2**30:.2f} GiB HBM "
                f"({(need - have) / 2**30:.2f} GiB over)")
    else:
      detail = "does not fit its HBM"
    largest = (f"; its largest buffer is {memory_report.describe(buffers[0])}"
               if buffers else "")
    raise PlanError(
        f"{what} on {target.name}: the step {detail} per device{largest}; shard it "
        "over more devices (--config.mesh.fsdp), recompute activations "
        "(--config.model.remat=full), tile attention (--config.model."
        "attention_kernel=blocked), chunk the loss (--config.loss_chunk) or lower "
        "--config.batch_size.", buffers)
  first = msg[:400]
  raise PlanError(f"{what} on {target.name}: the compiler refuses the step "
                  f"({first}); try another --config.moe.dispatch or "
                  "--config.moe.ragged_exchange, or another topology.")


def _memory(compiled) -> dict[str, int]:
  """XLA's memory analysis per device. ``peak`` is the compiler's own peak
  (``peak_memory_in_bytes``, from its buffer assignment) where it reports one: on
  TPU the temporary allocations overlap in time, so arguments + outputs + temp -
  alias overstates the peak (Mixtral's v5p-128 step: 126.5 GiB against the
  compiler's 84.3), and the compiler refuses a program whose peak passes the HBM.
  ``peak_source`` says which (``"compiler"`` or ``"sum"``)."""
  m = compiled.memory_analysis()
  args, out, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                     int(m.temp_size_in_bytes))
  alias = int(m.alias_size_in_bytes)
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  return {"arguments": args, "outputs": out, "temp": temp, "alias": alias,
          "peak": peak or args + out + temp - alias,
          "peak_source": "compiler" if peak else "sum"}


def _xla_flops(compiled) -> float | None:
  """XLA's HLO cost analysis of the compiled module (loop bodies counted once); the
  CUDA executable reports none itself, so its module is analysed on the host."""
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0] if analysis else None
    if not analysis:
      from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
      from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
      analysis = _jax.hlo_module_cost_analysis(
          xla_bridge.get_backend("cpu"), compiled.runtime_executable().hlo_modules()[0])
    return float(analysis.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None  # an analysis this jax does not offer: the HLO count alone


def _step_report(compiled, target: Target, model_flops: float, tokens: int,
                 compile_s: float) -> dict[str, Any]:
  """The compiled step's memory, FLOPs, collectives and roofline bound."""
  devices = len(target.devices)
  mem = _memory(compiled)
  costs = hlo.analyze(compiled.as_text())
  xla_flops = _xla_flops(compiled)
  # Two lower bounds of the work: the matmuls with every loop weighted, and XLA's
  # count of everything with loop bodies once (it also sees matrix-vector products
  # that the GPU compiler rewrites into multiplies and reductions). The larger one.
  flops = max(costs.flops, xla_flops or 0.0)
  compute_s = flops / target.peak_flops_per_device
  # At least the arguments are read and the results written once.
  traffic_s = (mem["arguments"] + mem["outputs"] - mem["alias"]) / (
      target.bandwidth_per_device)
  step_s = max(compute_s, traffic_s)
  peak_total = devices * target.peak_flops_per_device
  return {
      "compile_s": round(compile_s, 2),
      "memory": mem,
      "flops_per_step": flops * devices,
      "flops_per_device": flops,
      "flops_per_step_model": model_flops,
      "hlo_matmul_flops_per_device": costs.flops,
      "xla_cost_analysis_flops_per_device": xla_flops,
      "tokens_per_step": tokens,
      "step_s_bound": step_s,
      "bound_by": "compute" if compute_s >= traffic_s else "memory",
      "mfu_bound": (model_flops / (peak_total * step_s)) if step_s > 0 else None,
      "collectives": costs.collectives,
      "loops_without_trip_count": costs.unknown_loops,
  }


def plan(config, target: Target, *, mode: str = "train", serve_batch: int = 8,
         serve_len: int = 0, serve_chunk: int = 0) -> dict[str, Any]:
  """Compiles the config's step for ``target`` and returns the plan's JSON dict.

  Serving compiles the prefill of ``serve_chunk`` tokens per row (0: the whole
  ``serve_len`` at once) against the full-length cache, the last chunk of a chunked
  prefill (every chunk has its shapes), and one decode step.

  Raises:
    ConfigError: a bad config (every problem, one line each) or mesh.
    PlanError: the compiler refuses the step or it does not fit (one line).
  """
  if mode not in MODES:
    raise ConfigError([f"--mode={mode!r} is unknown; use train or serve."])
  if mode == "serve" and (serve_batch < 1 or serve_len < 0):
    raise ConfigError([f"--serve_batch={serve_batch} --serve_len={serve_len}: the batch "
                       "must be >= 1 and the context >= 0 (0: data.seq_len)."])
  context = serve_len or config.data.seq_len
  if mode == "serve" and (serve_chunk < 0 or (serve_chunk and context % serve_chunk)):
    raise ConfigError([f"--serve_chunk={serve_chunk} must divide the context "
                       f"{context}; use a divisor of it, or 0 to prefill it at once."])
  devices = len(target.devices)
  mesh_shape = resolve_mesh(config, devices)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for k, v in mesh_shape.items():
      config.mesh[k] = v
    if mode == "serve":  # the training batch plays no part: one row per device
      config.batch_size = devices
      config.grad_accum_steps = 1
  errors = validate_config(config, num_devices=devices)
  if errors:
    raise ConfigError(errors)
  mesh = sharding.make_mesh(mesh_shape["data"], mesh_shape["expert"],
                            mesh_shape["model"], devices=target.devices,
                            fsdp=mesh_shape["fsdp"])
  with backend.compile_target(target.platform):
    model = abstract_model(config, mesh)
    params = count_params(model)
    out: dict[str, Any] = {
        "target": target.name, "chip": target.chip.name, "platform": target.platform,
        "devices": devices, "mesh": mesh_shape, "mode": mode,
        "params_total": int(params["total"]), "params_active": int(params["active"]),
        "chip_source": target.chip.source,
    }
    if mode == "train":
      out.update(_plan_train(config, target, mesh, model))
    else:
      out.update(_plan_serve(config, target, mesh, model, serve_batch, context,
                             serve_chunk or context))
  return out


def _plan_train(config, target, mesh, model) -> dict[str, Any]:
  tx, _ = build.make_optimizer(config)
  state, state_sharding = _abstract_train_state(model, tx, mesh)
  step = make_train_step(model, tx, config, state_sharding=state_sharding)
  batch_shape = (config.batch_size, config.data.seq_len)
  batch_spec = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_spec)
           for k in ("inputs", "targets")}
  tokens = config.batch_size * config.data.seq_len
  per_token = flops_per_token(model, config.data.seq_len)
  model_flops = 3.0 * (per_token["active"] + per_token["router"]) * tokens
  compiled, seconds, buffers = _compile(step, (state, batch), "train step", target)
  report = _step_report(compiled, target, model_flops, tokens, seconds)
  report["largest_buffers"] = buffers
  mem = report["memory"]
  report["bytes_per_device"] = {
      "params": _shard_bytes(state.params), "optimizer": _shard_bytes(state.opt_state),
      "temp": mem["temp"], "peak": mem["peak"], "hbm": int(target.hbm_per_device)}
  report["fits"] = mem["peak"] <= target.hbm_per_device
  return report


# ------------------------------------------------------------------------------------
# Serving: prefill and one decode step with the KV cache at (serve_batch, serve_len)
# ------------------------------------------------------------------------------------


def _cache_spec(shape, mesh) -> P:
  """Cache rows over the batch axes, KV heads (axis 2 of [B, L, N_kv, D]) over model."""
  batch_devices = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  spec = [sharding.BATCH_AXES if shape and shape[0] % batch_devices == 0 else None]
  spec += [None] * (len(shape) - 1)
  if len(shape) == 4 and shape[2] % mesh.shape["model"] == 0:
    spec[2] = "model"
  return P(*spec)


def _plan_serve(config, target, mesh, model, batch: int, length: int,
                chunk: int) -> dict[str, Any]:
  dtype = jnp.dtype(config.model.get("dtype", "float32"))
  vocab = build.vocab_size_of(config)

  def cached():
    m = build.make_model(config, vocab_size=vocab)
    view = nnx.merge(*nnx.split(m.unrolled()))
    decode.init_cache(view, batch, length, dtype)
    return view

  view = shard_model(nnx.eval_shape(cached), mesh)
  graphdef, params, cache, rest = nnx.split(view, nnx.Param, nnx.Cache, ...)
  cache = jax.tree.map(
      lambda x: _with_sharding(x, NamedSharding(mesh, _cache_spec(x.shape, mesh))), cache)
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES)) if batch % math.prod(
      mesh.shape[a] for a in sharding.BATCH_AXES) == 0 else replicated

  def prefill(params, rest, cache, tokens, positions, mask):
    m = nnx.merge(graphdef, params, cache, rest)
    x = decode.forward(m, tokens, positions, mask, prefill=True)
    logits = m.head(x[:, -1:])[:, 0]
    return logits, nnx.state(m, nnx.Cache)

  def step(params, rest, cache, token, positions, mask):
    m = nnx.merge(graphdef, params, cache, rest)
    x = decode.forward(m, token[:, None], positions[:, None], mask[:, None],
                       prefill=False)
    return m.head(x)[:, 0], nnx.state(m, nnx.Cache)

  cache_sharding = jax.tree.map(lambda x: x.sharding, cache)
  grid = lambda dtype_, *shape: jax.ShapeDtypeStruct(shape, dtype_, sharding=rows)
  per_token = flops_per_token(model, length)
  out: dict[str, Any] = {"serve_batch": batch, "serve_len": length,
                         "serve_chunk": chunk, "prefill_chunks": length // chunk}
  fits, peaks = True, []
  for name, fn, args, tokens in (
      ("prefill", prefill, (grid(jnp.int32, batch, chunk), grid(jnp.int32, batch, chunk),
                            grid(jnp.bool_, batch, chunk)), batch * chunk),
      ("decode", step, (grid(jnp.int32, batch), grid(jnp.int32, batch),
                        grid(jnp.bool_, batch)), batch)):
    jitted = jax.jit(fn, donate_argnums=(2,), out_shardings=(None, cache_sharding))
    compiled, seconds, buffers = _compile(jitted, (params, rest, cache) + args,
                                          f"serve {name} step", target)
    flops = (per_token["active"] + per_token["router"]) * tokens
    report = _step_report(compiled, target, flops, tokens, seconds)
    report["largest_buffers"] = buffers
    report["fits"] = report["memory"]["peak"] <= target.hbm_per_device
    fits &= report["fits"]
    peaks.append(report["memory"]["peak"])
    out[name] = report
  # The top-level numbers are the decode step's; both steps must fit.
  out.update({k: v for k, v in out["decode"].items() if k != "fits"})
  out["compile_s"] = out["prefill"]["compile_s"] + out["decode"]["compile_s"]
  out["fits"] = fits
  # The buffers of the step with the larger peak (the prefill, as a rule).
  out["largest_buffers"] = max((out["prefill"], out["decode"]),
                               key=lambda r: r["memory"]["peak"])["largest_buffers"]
  out["bytes_per_device"] = {
      "params": _shard_bytes(params), "optimizer": 0, "kv_cache": _shard_bytes(cache),
      "temp": max(out["prefill"]["memory"]["temp"], out["decode"]["memory"]["temp"]),
      "peak": max(peaks), "hbm": int(target.hbm_per_device)}
  return out
