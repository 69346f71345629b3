"""Hugging Face checkpoints in and out: Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE.

* :func:`load` reads a directory's ``config.json`` (parsed as JSON, never executed;
  no remote code) and its safetensors (one file or sharded), and returns a moe_jax
  model and its LM config. With a mesh, each parameter is placed by its logical axes
  and every process reads only the slices its devices hold
  (``jax.make_array_from_callback`` over memory-mapped files).
* :func:`forward_logits` runs the model: ``f32[B, L, V]``.
* :func:`save` writes ``config.json`` and safetensors that ``transformers`` loads
  with ``from_pretrained``, after checking that the family can express every option
  of the model.

The families, their config keys and their tensor names are in
:mod:`moe_jax.interop.hf_families`; the file format in
:mod:`moe_jax.interop.safetensors_io`. Nothing here needs torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.interop import safetensors_io
from moe_jax.interop.hf_families import (FAMILIES, Family, family_of, hf_config,
                                         lm_config, tensors)
from moe_jax.interop.hf_tensors import LAYOUTS, ConversionError, Tensor
from moe_jax.layers.moe_config import DTYPES
from moe_jax.layers.router_families import SelectionBias
from moe_jax.training import build

# Tensors a checkpoint may hold that are not parameters (old rotary caches).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What a checkpoint holds of a model: its parameters and the routers' selection biases
# (DeepSeek-V3's e_score_correction_bias), which are routing state, not parameters.
WEIGHTS = nnx.Any(nnx.Param, SelectionBias)


def read_config(path: str) -> dict[str, Any]:
  """``path/config.json`` as a dict (JSON only)."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise ConversionError(f"{path!r} has no config.json; pass a Hugging Face model "
                          "directory (config.json and .safetensors weights).")
  with open(file, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ConversionError(f"{file}: not valid JSON ({e}).") from None


# -- Reading ------------------------------------------------------------------------


def _bounds(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
  """``[(start, stop)]`` of each axis of a basic-slice ``index`` into ``shape``."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided index {index} is not a shard")
    out.append((start, stop))
  return out


def _read(ckpt: safetensors_io.Checkpoint, t: Tensor, shape: tuple[int, ...],
          index: tuple, dtype) -> np.ndarray:
  bounds = _bounds(index, shape)
  read = LAYOUTS[t.layout].read
  if t.stacked:
    (e0, e1), rest = bounds[0], bounds[1:]
    out = np.stack([read(ckpt, t.names[e], rest, t.heads) for e in range(e0, e1)])
  else:
    out = read(ckpt, t.names[0], bounds, t.heads)
  return out.astype(dtype)


def _disk_shape(t: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape each of ``t``'s tensors must have on disk for a parameter of ``shape``."""
  return LAYOUTS[t.layout].disk_shape(shape[1:] if t.stacked else shape)


def _check_tensors(ckpt: safetensors_io.Checkpoint, table: list[Tensor],
                   shapes: dict[tuple, tuple[int, ...]], where: str) -> None:
  """Every tensor the model needs is there with its shape, and nothing else is."""
  on_disk = set(ckpt.names)
  used = set()
  for t in table:
    want = _disk_shape(t, shapes[t.path])
    for name in t.names:
      if name not in on_disk:
        raise ConversionError(f"{where}: tensor {name!r} is missing (needed for "
                              f"{'/'.join(map(str, t.path))}).")
      if ckpt.shape(name) != want:
        raise ConversionError(f"{where}: tensor {name!r} has shape {ckpt.shape(name)}, "
                              f"but config.json implies {want}.")
      ckpt.dtype(name)  # an unreadable dtype fails here, with its name
      used.add(name)
  extra = sorted(n for n in on_disk - used if not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise ConversionError(f"{where}: tensor {extra[0]!r} (and {len(extra) - 1} more) "
                          "is not part of the model config.json describes; the "
                          "checkpoint has an option this converter does not know.")


def _param_paths(state: nnx.State) -> dict[tuple, Any]:
  return {tuple(path): var for path, var in nnx.to_flat_state(state)}


def load(path: str, dtype: str = "float32", *, mesh: jax.sharding.Mesh | None = None,
         overrides: dict[str, Any] | None = None
         ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """``(model, config)`` of the Hugging Face model directory ``path``.

  Args:
    path: a directory with ``config.json`` and ``*.safetensors`` (or the shards of a
      ``model.safetensors.index.json``).
    dtype: "float32" or "bfloat16": the compute dtype and the dtype the weights are
      stored in (the router and the vectors stay float32).
    mesh: place the parameters on this mesh by their logical axes
      (:func:`moe_jax.models.param_sharding.shard_model`); each process reads only the
      slices its devices hold. None: one device.
    overrides: LM config keys to set after conversion (``{"mesh.expert": 8}``); only
      keys that keep the forward pass (mesh, training, data) make sense here.

  Raises:
    ConversionError: an unknown family, an option moe_jax cannot express, a missing
      tensor or a shape mismatch; one line naming it.
    safetensors_io.CheckpointError: no safetensors (pickle-based weights are refused).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ConversionError(f"dtype={dtype!r} is not a model dtype; use 'float32' or "
                          "'bfloat16'.")
  hf = read_config(path)
  family = family_of(hf, os.path.join(path, "config.json"))
  config = lm_config(hf, dtype=dtype, where=os.path.join(path, "config.json"))
  if overrides:
    from moe_jax.training.config import set_keys  # pylint: disable=import-outside-toplevel
    set_keys(config, overrides)
  ckpt = safetensors_io.Checkpoint(path)
  abstract = _weightless_model(config)
  if mesh is not None:
    from moe_jax.models.param_sharding import shard_model  # pylint: disable=import-outside-toplevel
    shard_model(abstract, mesh)
  graphdef, params, rest = nnx.split(abstract, WEIGHTS, ...)
  flat = _param_paths(params)
  table = tensors(config, family, abstract.cfg.is_moe_block)
  _check_coverage(table, flat)
  _check_tensors(ckpt, table, {p: tuple(v.get_value().shape) for p, v in flat.items()},
                 path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for t in table:
    if t.copy:
      continue
    var = flat[t.path]
    value = var.get_value()
    sharding = getattr(value, "sharding", None) or device
    np_dtype = np.dtype(value.dtype)
    var.set_value(jax.make_array_from_callback(
        tuple(value.shape), sharding,
        lambda index, t=t, shape=tuple(value.shape), d=np_dtype: _read(
            ckpt, t, shape, index, d)))
  return nnx.merge(graphdef, params, rest), config


def _weightless_model(config) -> nnx.Module:
  """The model of ``config`` with abstract weights (``jax.ShapeDtypeStruct``, filled
  from the checkpoint) and the rest (RNG streams, routing state) as a freshly built
  model has it, from one trace of its construction: the weights' initialisers are
  dead code in that jit and never run."""
  made = {}

  def rest_of_model():
    graphdef, weights, rest = nnx.split(build.make_model(config), WEIGHTS, ...)
    made["graphdef"] = graphdef
    made["weights"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                   weights)
    return rest

  rest = jax.jit(rest_of_model)()
  # Rebuilt here, so that they belong to this trace level and can be filled.
  weights = jax.tree.map(lambda a: a, made["weights"])
  return nnx.merge(made["graphdef"], weights, rest)


def _check_coverage(table: list[Tensor], flat: dict[tuple, Any]) -> None:
  missing = sorted(set(flat) - {t.path for t in table}, key=str)
  if missing:
    raise ConversionError(f"parameter {'/'.join(map(str, missing[0]))} has no tensor "
                          "in the family's table; the model has an option the family "
                          "cannot express.")


def forward_logits(model: nnx.Module, ids: Any) -> np.ndarray:
  """``f32[B, L, V]`` logits of ``i32[B, L]`` token ids (evaluation mode)."""
  logits, _ = model(jnp.asarray(ids, jnp.int32), deterministic=True)
  return np.asarray(logits, np.float32)


# -- Writing ------------------------------------------------------------------------


def _forward_keys(config) -> dict[str, Any]:
  """What decides a model's forward pass, resolved (the model and MoE configs' fields
  and its layer pattern), for comparing a model's config with its family's."""
  vocab = build.vocab_size_of(config)
  tcfg = build.transformer_config(config, vocab)
  keys = {f"model.{k}": getattr(tcfg, k) for k in (
      "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "activation",
      "position", "norm", "norm_eps", "tie_embeddings", "rope_base", "qk_norm",
      "qkv_bias", "mod_every", "causal", "mixer", "mla", "rope_scaling", "mtp_depth")}
  if tcfg.rope_scaling != "none":
    keys.update({f"model.{k}": getattr(tcfg, k) for k in (
        "rope_factor", "rope_original_max_len", "yarn_beta_fast", "yarn_beta_slow",
        "yarn_mscale", "yarn_mscale_all_dim")})
  keys["model.layer pattern"] = tuple(tcfg.layers)
  if any(kind.ffn == "dense" for kind in tcfg.layers):
    keys["model.d_ff"] = tcfg.d_ff
  if tcfg.moe is not None:
    keys.update({f"moe.{k}": getattr(tcfg.moe, k) for k in (
        "num_experts", "top_k", "d_ff", "activation", "router", "score_fn",
        "normalize_gates", "expert_groups", "top_groups", "gate_scale",
        "num_shared_experts", "shared_expert_gate", "noop_experts")})
    keys["moe.selection bias"] = tcfg.moe.bias_update_rate > 0
  return keys


def _family_mismatch(config, family: Family, vocab: int) -> str | None:
  """The first forward key on which ``config`` and its image in ``family`` differ."""
  try:
    image = lm_config(hf_config(config, family, vocab))
    image.data.vocab_size = vocab
    theirs = _forward_keys(image)
  except (KeyError, ValueError) as e:
    return str(e)
  ours = _forward_keys(config)
  for key, value in ours.items():
    if theirs.get(key) != value:
      return (f"{key}={value!r}, which {family.model_type} cannot express (it would be "
              f"{theirs.get(key)!r})")
  return None


def family_for(config, family: str | None = None) -> Family:
  """The family that expresses ``config``'s forward pass exactly: ``family`` checked,
  or the one of :data:`FAMILIES` that fits.

  Raises:
    ConversionError: no family (or not ``family``) can express it; one line naming
      the key.
  """
  vocab = build.vocab_size_of(config)
  if family is not None:
    if family not in FAMILIES:
      raise ConversionError(f"family={family!r} is unknown; use one of "
                            f"{', '.join(FAMILIES)}.")
    why = _family_mismatch(config, FAMILIES[family], vocab)
    if why:
      raise ConversionError(f"cannot export as {family}: {why}.")
    return FAMILIES[family]
  reasons = {}
  for name, fam in FAMILIES.items():
    why = _family_mismatch(config, fam, vocab)
    if why is None:
      return fam
    reasons[name] = why
  raise ConversionError("no Hugging Face family expresses this model: "
                        + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + ".")


def _to_disk(t: Tensor, value: np.ndarray) -> dict[str, np.ndarray]:
  """``{name: tensor}`` of one parameter in the Hugging Face layout."""
  one = LAYOUTS[t.layout].to_disk
  if t.stacked:
    return {name: np.ascontiguousarray(one(value[e])) for e, name in enumerate(t.names)}
  return {t.names[0]: np.ascontiguousarray(one(value))}


def save(model: nnx.Module, config, path: str, *, family: str | None = None,
         dtype: str | None = None, max_shard_bytes: int = 5 * 2 ** 30) -> Family:
  """Writes ``model`` as a Hugging Face checkpoint in ``path``: ``config.json`` and
  safetensors (sharded with an index past ``max_shard_bytes``).

  Args:
    model: an unscanned moe_jax Transformer (``model.unrolled()`` for a scanned one)
      without LoRA adapters (merge them first).
    config: its LM config.
    family: the family to write; None picks the one that expresses the model.
    dtype: "float32" | "bfloat16" for every tensor; None keeps each parameter's.

  Returns:
    The family written.

  Raises:
    ConversionError: the model has an option the family cannot express (one line).
  """
  fam = family_for(config, family)
  model = model.unrolled() if hasattr(model, "unrolled") else model
  params = _param_paths(nnx.state(model, WEIGHTS))
  table = tensors(config, fam, model.cfg.is_moe_block)
  _check_coverage(table, params)
  out = {}
  for t in table:
    value = np.asarray(jax.device_get(params[t.path].get_value()))
    if dtype is not None:
      value = value.astype(DTYPES[dtype])
    out.update(_to_disk(t, value))
  os.makedirs(path, exist_ok=True)
  written = safetensors_io.save_sharded(out, path, max_shard_bytes=max_shard_bytes)
  safetensors_io.remove_weights(path, keep=written)
  hf = hf_config(config, fam, build.vocab_size_of(config))
  hf["dtype"] = dtype or config.model.get("param_dtype", "float32")
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return fam
