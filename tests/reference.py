"""Slow, loop-based references that the fast paths are compared against.

Written in plain Python/NumPy straight from the routing contract, one token and one
choice at a time, with no cumsum tricks, so a bug in the vectorised code cannot hide in
a shared helper.
"""

import jax
import jax.numpy as jnp
import numpy as np


def route_loop(probs, *, top_k, capacity, second_policy="all", second_threshold=0.2,
               normalize_gates=True, batch_priority=False, token_mask=None):
  """Reference routing on f32[G, S, E] probabilities.

  Returns (dispatch bool[G, S, E, C], combine f32[G, S, E, C]). The "random" policy is
  not covered here (it needs the fast path's random numbers).
  """
  probs = np.asarray(probs, np.float64)
  num_groups, group_size, num_experts = probs.shape
  dispatch = np.zeros((num_groups, group_size, num_experts, capacity), bool)
  combine = np.zeros((num_groups, group_size, num_experts, capacity), np.float64)
  for g in range(num_groups):
    choices = []  # per token: list of (expert, gate, wanted)
    for s in range(group_size):
      p = probs[g, s].copy()
      experts, gates = [], []
      for _ in range(top_k):
        e = int(np.argmax(p))  # first occurrence on ties
        experts.append(e)
        gates.append(probs[g, s, e])
        p[e] = -np.inf
      if normalize_gates and top_k > 1:
        total = sum(gates)
        gates = [x / total for x in gates]
      valid = token_mask is None or bool(token_mask[g, s])
      wanted = [valid] * top_k
      for k in range(1, top_k):
        if second_policy == "threshold":
          wanted[k] = valid and gates[k] > second_threshold
      choices.append(list(zip(experts, gates, wanted)))
    if batch_priority:
      order = sorted(range(group_size), key=lambda s: (-probs[g, s].max(), s))
    else:
      order = list(range(group_size))
    queue_len = [0] * num_experts
    for k in range(top_k):
      for s in order:
        e, gate, wanted = choices[s][k]
        if not wanted:
          continue
        slot = queue_len[e]
        queue_len[e] += 1
        if slot < capacity:
          dispatch[g, s, e, slot] = True
          combine[g, s, e, slot] = gate
  return dispatch, combine


def moe_layer_loop(x, router_kernel, wi, wo, *, top_k, capacity, group_size,
                   activation="relu", **route_kwargs):
  """Reference MoE layer: route with :func:`route_loop`, then run each kept
  (token, expert) pair through its expert one token at a time.

  x: [T, M] with T a multiple of group_size. Returns [T, M].
  """
  x = np.asarray(x, np.float64)
  router_kernel = np.asarray(router_kernel, np.float64)
  wi, wo = np.asarray(wi, np.float64), np.asarray(wo, np.float64)
  num_tokens, d_model = x.shape
  logits = (x @ router_kernel).reshape(num_tokens // group_size, group_size, -1)
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  _, combine = route_loop(probs, top_k=top_k, capacity=capacity, **route_kwargs)
  y = np.zeros_like(x)
  for t in range(num_tokens):
    g, s = divmod(t, group_size)
    for e in range(wi.shape[0]):
      gate = combine[g, s, e].sum()
      if gate == 0:
        continue
      h = x[t] @ wi[e]
      if activation == "relu":
        h = np.maximum(h, 0)
      else:
        raise NotImplementedError(activation)
      y[t] += gate * (h @ wo[e])
  return y


def mamba_loop(p, u, *, d_state, dt_rank, d_conv, inner_norms=True, eps=1e-6):
  """Reference Mamba mixer: a ``lax.scan`` over tokens, one token at a time.

  Written from the equations (Gu & Dao 2023, Alg. 2; Jamba's norms) on the raw
  parameter arrays ``p`` (name -> array, as the mixer names them), with the conv as an
  explicit window of the last ``d_conv`` inputs. u: [B, L, M] -> (y [B, L, M], the SSM
  state h [B, D_in, N] after the last token), in u's dtype.
  """
  batch, _, _ = u.shape
  d_inner = p["D"].shape[0]

  def rms(v, scale):
    return v / jnp.sqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps) * scale

  def token(carry, u_t):  # u_t: [B, M]
    window, h = carry  # [B, d_conv, D_in] (newest last), [B, D_in, N]
    xz = u_t @ p["in_proj"]
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    window = jnp.concatenate([window[:, 1:], x[:, None]], axis=1)
    conv = p["conv_bias"] + jnp.sum(window * p["conv_kernel"][None], axis=1)
    x = conv * jax.nn.sigmoid(conv)
    proj = x @ p["x_proj"]
    dt = proj[:, :dt_rank]
    bm = proj[:, dt_rank:dt_rank + d_state]
    cm = proj[:, dt_rank + d_state:]
    if inner_norms:
      dt, bm, cm = rms(dt, p["dt_norm"]), rms(bm, p["b_norm"]), rms(cm, p["c_norm"])
    dt = jnp.log1p(jnp.exp(dt @ p["dt_proj"] + p["dt_bias"]))  # softplus
    a = -jnp.exp(p["A_log"])
    h = jnp.exp(dt[:, :, None] * a[None]) * h + (dt * x)[:, :, None] * bm[:, None, :]
    y = jnp.sum(h * cm[:, None, :], axis=-1) + p["D"] * x
    y = y * (z * jax.nn.sigmoid(z))
    return (window, h), y @ p["out_proj"]

  init = (jnp.zeros((batch, d_conv, d_inner), u.dtype),
          jnp.zeros((batch, d_inner, d_state), u.dtype))
  (_, h), ys = jax.lax.scan(token, init, u.swapaxes(0, 1))
  return ys.swapaxes(0, 1), h
