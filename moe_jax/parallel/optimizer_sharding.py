"""Where the optimizer state lives: every moment on the devices of its parameter's
shards (:func:`optimizer_state_sharding`), scalars replicated."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

def optimizer_state_sharding(tx: optax.GradientTransformation, params: Any) -> Any:
  """The sharding of every leaf of ``tx.init(params)``, from the parameters' shardings.

  ``jax.jit(tx.init)`` alone leaves the placement of its outputs to the compiler, and
  as Adam's moments are ``zeros_like`` (they never read the parameters' values) they
  land on one device; placed as replicated, every device would then hold the moments
  of every expert and each step would all-gather the expert gradients to update them.
  Here every copy of the parameter tree inside the state (``optax.tree_map_params``:
  Adam's ``mu`` and ``nu``, Adafactor's ``v``, ``v_row`` and ``v_col``, ...) follows
  the parameters leaf by leaf:

  * a leaf of its parameter's shape (Adam's moments, Adafactor's unfactored ``v``)
    gets the parameter's sharding;
  * a leaf with one axis of its parameter removed (Adafactor's factored ``v_row``,
    ``v_col`` of an ``[E, M, H]`` expert weight: ``[E, M]`` or ``[E, H]``) keeps the
    parameter's spec on the axes it keeps, so E stays split over ``expert``. Where
    the removed axis is ambiguous (equal adjacent sizes), an axis on which the
    candidates disagree is replicated;
  * anything else (Adafactor's ``[1]`` placeholders, step counts, ...) is replicated.

  Args:
    tx: the optimizer.
    params: the parameters (``jax.Array`` s, placed), or ``jax.ShapeDtypeStruct`` s
      with shardings.

  Returns:
    A pytree like ``tx.init(params)`` of shardings: NamedShardings on the parameters'
    mesh when they have one; for parameters on one device, that device.
  """
  shardings = jax.tree.map(lambda x: x.sharding, params)
  first = jax.tree.leaves(shardings)[0]
  replicated = (NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding)
                else first)
  abstract = jax.eval_shape(tx.init, params)

  def follow(leaf, param, param_sharding):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    return _stat_sharding(leaf.shape, param.shape, param_sharding, replicated)

  return optax.tree_map_params(
      tx, follow, abstract, params, shardings,
      transform_non_params=lambda x: jax.tree.map(lambda _: replicated, x),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _stat_sharding(shape, param_shape, param_sharding, replicated):
  """Sharding of an optimizer statistic of ``shape`` kept for a parameter."""
  if tuple(shape) == tuple(param_shape):
    return param_sharding
  if (not isinstance(param_sharding, NamedSharding)
      or len(shape) != len(param_shape) - 1):
    return replicated
  spec = tuple(param_sharding.spec) + (None,) * (len(param_shape)
                                                 - len(param_sharding.spec))
  candidates = [spec[:i] + spec[i + 1:] for i in range(len(param_shape))
                if tuple(param_shape[:i]) + tuple(param_shape[i + 1:]) == tuple(shape)]
  if not candidates:
    return replicated
  kept = [a if all(c[k] == a for c in candidates) else None
          for k, a in enumerate(candidates[0])]
  while kept and kept[-1] is None:
    kept.pop()
  return NamedSharding(param_sharding.mesh, P(*kept))


def init_optimizer_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` placed by :func:`optimizer_state_sharding`: every moment on
  the devices of its parameter's shards, scalars replicated."""
  return jax.jit(tx.init, out_shardings=optimizer_state_sharding(tx, params))(params)
