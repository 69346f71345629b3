"""A sharded train step, end to end: the model and loop the sharding tests compare.

``train_demo`` trains :class:`DemoModel` on a (data, expert, model) mesh and returns
what a test compares with the 1x1x1 run. Test scaffolding only; it also runs in the
two-process test's worker processes (``from tests.sharding_demo import train_demo``).
"""

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax.layers import moe_config, moe_layer
from moe_jax.models import param_sharding
from moe_jax.parallel import sharding


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) global array as numpy, on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class DemoModel(nnx.Module):
  """Embedding -> MoE blocks (residual) -> RMSNorm -> vocabulary logits.

  One MoE block per entry of ``num_experts``, so a single compiled step covers several
  expert counts. Small enough to compile in seconds on fake CPU devices, yet every
  parameter kind of the layout (experts, router, embedding, norm, output projection)
  is in it.
  """

  def __init__(self, cfg: moe_config.MoeConfig, vocab_size: int,
               num_experts: Sequence[int], *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, cfg.d_model, rngs=rngs,
                           embedding_metadata={"logical_axes": ("vocab", "embed")})
    self.moe = nnx.List([
        moe_layer.MoeLayer(dataclasses.replace(cfg, num_experts=e), rngs=rngs)
        for e in num_experts])
    self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs,
                            scale_metadata={"logical_axes": ("norm",)})
    self.head = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.d_model, vocab_size)) / cfg.d_model**0.5,
        logical_axes=("embed", "vocab"))

  def __call__(self, tokens: jax.Array):
    """tokens: i32[B, L] -> (f32[B, L, V] logits, summed aux loss, summed z-loss)."""
    x = self.embed(tokens)
    aux_loss = z_loss = 0.0
    for layer in self.moe:
      y, aux = layer(x)
      x = x + y
      aux_loss, z_loss = aux_loss + aux.aux_loss, z_loss + aux.z_loss
    logits = jnp.einsum("BLM,MV->BLV", self.norm(x), self.head[...])
    return logits, aux_loss, z_loss


def train_demo(
    data: int = 1,
    expert: int = 1,
    model: int = 1,
    *,
    num_experts: int | Sequence[int] = 8,
    steps: int = 3,
    batch_size: int = 16,
    seq_len: int = 8,
    d_model: int = 16,
    d_ff: int = 32,
    vocab_size: int = 32,
    group_size: int = 8,
    dispatch: str = "einsum",
    learning_rate: float = 1e-2,
    seed: int = 0,
    moe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Trains :class:`DemoModel` with Adam for ``steps`` steps on a (data, expert, model)
  mesh and returns what a test compares with the 1x1x1 run.

  ``num_experts`` is E of the single MoE block, or a sequence with one E per block.
  ``moe`` overrides more :class:`~moe_jax.layers.moe_config.MoeConfig` fields (the
  router family and its settings, shared experts, dtype, ...).

  The loss is next-token cross-entropy on random tokens plus 0.01 times the Switch
  load-balancing loss and 0.001 times the z-loss.

  Returns:
    ``losses`` (one float per step), ``aux_losses`` (the MoE blocks' summed
    ``aux_loss`` of each step, unscaled), ``logits`` (the first step's forward pass,
    numpy), ``grads`` (the first step's gradients, ``{path: numpy}``) and ``specs``
    (:func:`moe_jax.models.param_sharding.describe_sharding` of the model).
  """
  num_experts = (num_experts,) if isinstance(num_experts, int) else tuple(num_experts)
  for e in num_experts:
    for msg in sharding.validate_mesh(
        jax.device_count(), data, expert, model, e, batch_size, seq_len=seq_len,
        group_size=group_size, d_ff=d_ff, num_processes=jax.process_count()):
      raise ValueError(msg)
  cfg = moe_config.MoeConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts[0],
                            group_size=group_size, dispatch=dispatch,
                            **{"capacity_factor": 1.0, "init_scale": 0.1,
                               "router_init_scale": 0.1, **dict(moe or {})})
  net = DemoModel(cfg, vocab_size, num_experts, rngs=nnx.Rngs(seed))
  mesh = sharding.make_mesh(data, expert, model)
  param_sharding.shard_model(net, mesh)
  # Placing the optimizer too puts its step counters on the mesh; left on one device,
  # their sharding would change after the first step and force a second compile.
  opt = param_sharding.shard_model(
      nnx.Optimizer(net, optax.adam(learning_rate), wrt=nnx.Param), mesh)
  rng = np.random.default_rng(seed)

  def loss_fn(net, tokens):
    logits, aux_loss, z_loss = net(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + 0.01 * aux_loss + 0.001 * z_loss, (logits, aux_loss)

  @nnx.jit
  def step(net, opt, tokens):
    (loss, (logits, aux_loss)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        net, tokens)
    opt.update(net, grads)
    return loss, logits, grads, aux_loss

  losses, aux_losses, first = [], [], None
  for i in range(steps):
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    rows = sharding.process_batch_rows(mesh, batch_size)
    tokens = sharding.shard_batch({"tokens": tokens[rows]}, mesh)["tokens"]
    loss, logits, grads, aux_loss = step(net, opt, tokens)
    losses.append(float(loss))
    aux_losses.append(float(aux_loss))
    if i == 0:
      first = (logits, grads)
  logits, grads = first
  flat = {"/".join(str(p) for p in path): to_host(v.get_value())
          for path, v in nnx.to_flat_state(grads)}
  return {"losses": losses, "aux_losses": aux_losses,
          "logits": to_host(logits), "grads": flat,
          "specs": param_sharding.describe_sharding(net)}
