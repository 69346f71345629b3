"""Parameter precision: which parameters a model stores in ``model.param_dtype``.

The compute dtype (``model.dtype``) is what the matmuls run in; every module casts its
weights to it where it uses them. The parameter dtype is what the weights are stored,
differentiated and updated in. :func:`cast_params` applies it to a built model:

* stored in ``param_dtype``: every weight matrix (embedding, learned positions,
  attention, dense FFNs, experts, shared experts, Mamba's projections and conv
  kernel, the unembedding);
* always float32: the routers (the MoE router's kernel and ``W_noise``, and the
  Mixture-of-Depths router and predictor), whose logits decide discrete choices and
  are computed in float32 from float32 weights whatever the dtypes; every vector and
  scalar (norm scales and biases, Mamba's ``dt_bias``, ``conv_bias`` and ``D``), small
  and read in float32 math; Mamba's ``A_log``, which the scan exponentiates. The
  DeepSeek selection bias is routing state, not a parameter: float32 too.

Parameters are drawn in float32 and then rounded to ``param_dtype``, so a bfloat16
model starts from the float32 model's initialisation, rounded.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import DTYPES
from moe_jax.layers.moe_layer import Router
from moe_jax.models.mamba import NO_WEIGHT_DECAY
from moe_jax.models.mod import DepthRouter, MlpPredictor

# Modules whose parameters stay float32 whatever ``param_dtype`` says.
FLOAT32_MODULES = (Router, DepthRouter, MlpPredictor)
# Parameters (by attribute name) that stay float32 although they are matrices.
FLOAT32_NAMES = frozenset({"A_log"}) | frozenset(NO_WEIGHT_DECAY)


def keeps_float32(path: tuple, value, router_paths: set[tuple]) -> bool:
  """Whether the parameter at ``path`` (its graph path) stays float32: inside a router
  (``router_paths``: paths of :data:`FLOAT32_MODULES`), a vector or scalar, or one of
  :data:`FLOAT32_NAMES`."""
  return (value.ndim < 2 or path[-1] in FLOAT32_NAMES
          or any(path[:i] in router_paths for i in range(len(path))))


def cast_params(model: nnx.Module, param_dtype: str) -> nnx.Module:
  """Stores ``model``'s parameters in ``param_dtype`` ("float32" | "bfloat16"), except
  those :func:`keeps_float32` keeps; in place, and returns ``model``. "float32" leaves
  the model untouched."""
  dtype = DTYPES[param_dtype]
  if dtype == jnp.float32:
    return model
  nodes = list(nnx.iter_graph(model))
  router_paths = {tuple(path) for path, node in nodes
                  if isinstance(node, FLOAT32_MODULES)}
  for path, node in nodes:
    if isinstance(node, nnx.Param):
      value = node.get_value()
      if (jnp.issubdtype(value.dtype, jnp.floating)
          and not keeps_float32(tuple(path), value, router_paths)):
        node.set_value(value.astype(dtype))
  return model


def param_dtypes(model: nnx.Module) -> dict[str, str]:
  """``{"a/b/c": dtype name}`` of every parameter of ``model`` (for tests and
  reports)."""
  return {"/".join(map(str, path)): str(node.get_value().dtype)
          for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}
