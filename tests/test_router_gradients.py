"""Router gradients against central finite differences (moe_jax.routing).

``jax.grad`` of a loss built from the gates and both auxiliary losses is compared,
coordinate by coordinate, with ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for

* :func:`routing.noisy_top_k` with its noise on: the clean logits and ``noise_std``
  (the noise enters the gates, and the load loss through ``Phi((clean - thr) / std)``);
* :func:`routing.route` with sigmoid scores, a selection bias and group-limited
  routing: the logits, and the bias (which must get no gradient: it only steers the
  choice).

The routing math runs in float32, or in float64 for float64 inputs, so the checks run
under ``jax.enable_x64`` with float64 inputs and ``eps = 1e-6``: the truncation error
is O(eps^2) and the rounding O(1e-16 / eps), so the tolerance is 1e-7 absolute +
1e-6 relative; a gradient cut by a misplaced stop_gradient differed by 0.01 to 0.8.
The noise of ``noisy_top_k`` is drawn in float32 whatever the dtype, so it is the same
draw. The inputs are drawn away from ties, and every perturbed evaluation is checked
to make the same choices and keep the same choices as the unperturbed one, so the
loss is smooth within eps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import routing

G, S = 2, 4
EPS = 1e-6
ATOL = 1e-7


def _central_differences(fn, args, argnum):
  """f64[size of args[argnum]]: central differences of the scalar ``fn`` (which
  returns (loss, expert_index, kept)) along each coordinate, and whether every
  perturbed evaluation made the unperturbed choices."""
  x = args[argnum]
  n = x.size
  steps = EPS * jnp.eye(n, dtype=x.dtype).reshape((n,) + x.shape)

  def at(delta):
    moved = list(args)
    moved[argnum] = x + delta
    return fn(*moved)

  # One batch of 2n evaluations, the unperturbed one last.
  deltas = jnp.concatenate([steps, -steps, jnp.zeros((1,) + x.shape, x.dtype)])
  loss, index, kept = jax.jit(jax.vmap(at))(deltas)
  same = bool(jnp.all(index == index[-1:])) and bool(jnp.all(kept == kept[-1:]))
  loss = np.asarray(loss, np.float64)
  diff = (loss[:n] - loss[n:2 * n]) / (2 * EPS)
  return diff.reshape(x.shape), same


def _check(fn, args, argnums):
  loss = lambda *a: fn(*a)[0]
  grads = jax.jit(jax.grad(loss, argnums=argnums))(*args)
  for argnum, grad in zip(argnums, grads):
    numeric, same = _central_differences(fn, args, argnum)
    assert same, f"argument {argnum}: a choice flips within eps; move the inputs"
    assert grad.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=ATOL, rtol=1e-6,
                               err_msg=f"argument {argnum}")
  return grads


@jax.enable_x64(True)
def test_noisy_top_k_gradients_match_finite_differences():
  num_experts, top_k = 6, 2
  keys = jax.random.split(jax.random.key(0), 4)
  clean = jax.random.normal(keys[0], (G, S, num_experts), jnp.float64)
  noise_std = 0.3 + jax.random.uniform(keys[1], (G, S, num_experts), jnp.float64)
  weights = jax.random.normal(keys[2], (G, S, top_k), jnp.float64)

  def fn(clean, noise_std):
    out = routing.noisy_top_k(clean, noise_std, top_k, capacity=S, rng=keys[3])
    loss = jnp.sum(weights * out.gates) + out.aux_loss + out.z_loss
    return loss, out.expert_index, out.kept

  grad_clean, grad_std = _check(fn, (clean, noise_std), (0, 1))
  # noise_std reaches the loss (through the noisy gates and the smooth load).
  assert float(jnp.max(jnp.abs(grad_std))) > 1e-2
  assert float(jnp.max(jnp.abs(grad_clean))) > 1e-2


@jax.enable_x64(True)
def test_sigmoid_route_with_bias_and_groups_gradients_match_finite_differences():
  num_experts, top_k = 8, 2
  keys = jax.random.split(jax.random.key(1), 3)
  logits = 1.5 * jax.random.normal(keys[0], (G, S, num_experts), jnp.float64)
  bias = 0.1 * jax.random.normal(keys[1], (num_experts,), jnp.float64)
  weights = jax.random.normal(keys[2], (G, S, top_k), jnp.float64)

  def fn(logits, bias):
    out = routing.route(logits, top_k=top_k, capacity=S, score_fn="sigmoid",
                        selection_bias=bias, expert_groups=4, top_groups=2,
                        gate_scale=2.5, normalize_gates=True, balance_choices="all")
    loss = jnp.sum(weights * out.gates) + out.aux_loss + out.z_loss
    return loss, out.expert_index, out.kept

  # The bias and the groups change the choices: against plain sigmoid top-k, some
  # token chooses differently.
  plain = routing.route(logits, top_k=top_k, capacity=S, score_fn="sigmoid")
  assert bool(jnp.any(plain.expert_index != fn(logits, bias)[1]))
  grad_logits, grad_bias = _check(fn, (logits, bias), (0, 1))
  assert float(jnp.max(jnp.abs(grad_logits))) > 1e-2
  np.testing.assert_array_equal(np.asarray(grad_bias), 0.0)
