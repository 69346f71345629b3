"""Slow, loop-based references that the fast paths are compared against.

Written in plain Python/NumPy straight from the routing contract, one token and one
choice at a time, with no cumsum tricks, so a bug in the vectorised code cannot hide in
a shared helper.
"""

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


def activation_loop(activation, h, gate=None):
  """One token's hidden activation, written out from the papers' formulas."""
  if activation == "relu":
    return np.maximum(h, 0)
  if activation == "gelu":  # tanh approximation (Hendrycks & Gimpel 2016), jax's default
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  if activation == "swiglu":  # Shazeer 2020: silu(x W_gate) * (x W_in)
    return gate / (1 + np.exp(-gate)) * h
  raise NotImplementedError(activation)


def moe_layer_loop(x, router_kernel, wi, wo, *, top_k, capacity, group_size,
                   activation="relu", wi_gate=None, **route_kwargs):
  """Reference MoE layer: route with :func:`route_loop`, then run each kept
  (token, expert) pair through its expert one token at a time.

  x: [T, M] with T a multiple of group_size. ``wi_gate`` [E, M, H] is needed for
  swiglu only. Returns [T, M].
  """
  x = np.asarray(x, np.float64)
  router_kernel = np.asarray(router_kernel, np.float64)
  wi, wo = np.asarray(wi, np.float64), np.asarray(wo, np.float64)
  if activation == "swiglu":
    wi_gate = np.asarray(wi_gate, np.float64)
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
      h = activation_loop(activation, x[t] @ wi[e],
                          x[t] @ wi_gate[e] if activation == "swiglu" else None)
      y[t] += gate * (h @ wo[e])
  return y
