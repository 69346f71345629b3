"""Slow, loop-based references that the fast paths are compared against.

Written in plain Python/NumPy straight from the routing contract, one token and one
choice at a time, with no cumsum tricks, so a bug in the vectorised code cannot hide in
a shared helper.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _group_limited(u, expert_groups, top_groups):
  """u: f64[E] selection scores of one token -> u with the experts outside the
  ``top_groups`` best groups at -inf (a group scores the sum of its two best u)."""
  per_group = len(u) // expert_groups
  group_scores = []
  for j in range(expert_groups):
    members = sorted(u[j * per_group:(j + 1) * per_group], reverse=True)
    group_scores.append(sum(members[:2]))
  kept = sorted(range(expert_groups), key=lambda j: (-group_scores[j], j))[:top_groups]
  out = np.full_like(u, -np.inf)
  for j in kept:
    out[j * per_group:(j + 1) * per_group] = u[j * per_group:(j + 1) * per_group]
  return out


def _queue(dispatch, combine, g, choices, order, capacity, queue_order="choice_major"):
  """Fills group g's slots: choices[s] is token s's list of (expert, gate, wanted);
  choice-major (every wanted first choice in ``order``, then every second one, ...)
  or token-major (token ``order[0]``'s choices 0, 1, ..., then token ``order[1]``'s,
  ...), each expert's slots in arrival order, arrivals past ``capacity`` dropped."""
  num_experts = dispatch.shape[2]
  queue_len = [0] * num_experts
  num_choices = len(choices[0])
  if queue_order == "choice_major":
    arrivals = [(s, k) for k in range(num_choices) for s in order]
  else:
    arrivals = [(s, k) for s in order for k in range(num_choices)]
  for s, k in arrivals:
    e, gate, wanted = choices[s][k]
    if not wanted:
      continue
    slot = queue_len[e]
    queue_len[e] += 1
    if slot < capacity:
      dispatch[g, s, e, slot] = True
      combine[g, s, e, slot] = gate


def route_loop(probs, *, top_k, capacity, second_policy="all", second_threshold=0.2,
               normalize_gates=True, batch_priority=False, token_mask=None,
               selection_bias=None, expert_groups=1, top_groups=None, gate_scale=1.0,
               queue_order="choice_major"):
  """Reference routing on f32[G, S, E] scores (softmax or sigmoid of the logits).

  The selection bias and the group limit change which experts are chosen, never the
  gates, which are the unbiased scores (renormalised, then scaled by ``gate_scale``).
  Returns (dispatch bool[G, S, E, C], combine f32[G, S, E, C]). The "random" policy is
  not covered here (it needs the fast path's random numbers).
  """
  probs = np.asarray(probs, np.float64)
  num_groups, group_size, num_experts = probs.shape
  bias = (np.zeros(num_experts) if selection_bias is None
          else np.asarray(selection_bias, np.float64))
  dispatch = np.zeros((num_groups, group_size, num_experts, capacity), bool)
  combine = np.zeros((num_groups, group_size, num_experts, capacity), np.float64)
  for g in range(num_groups):
    choices = []  # per token: list of (expert, gate, wanted)
    for s in range(group_size):
      u = probs[g, s] + bias
      if expert_groups > 1:
        u = _group_limited(u, expert_groups, top_groups)
      experts, gates = [], []
      for _ in range(top_k):
        e = int(np.argmax(u))  # first occurrence on ties
        experts.append(e)
        gates.append(probs[g, s, e])
        u[e] = -np.inf
      if normalize_gates and top_k > 1:
        total = sum(gates)
        gates = [x / total for x in gates]
      valid = token_mask is None or bool(token_mask[g, s])
      wanted = [valid] * top_k
      for k in range(1, top_k):
        if second_policy == "threshold":
          wanted[k] = valid and gates[k] > second_threshold
      gates = [x * gate_scale for x in gates]
      choices.append(list(zip(experts, gates, wanted)))
    if batch_priority:
      order = sorted(range(group_size),
                     key=lambda s: (-probs[g, s, choices[s][0][0]], s))
    else:
      order = list(range(group_size))
    _queue(dispatch, combine, g, choices, order, capacity, queue_order)
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


def _ffn(x, wi, wo, wi_gate, activation):
  """One FFN on one token, in float64."""
  h = activation_loop(activation, x @ wi,
                      x @ wi_gate if activation == "swiglu" else None)
  return h @ wo


def moe_layer_loop(x, router_kernel, wi, wo, *, top_k=1, capacity, group_size,
                   activation="relu", wi_gate=None, router="topk", score_fn="softmax",
                   noise_kernel=None, noise=None, noise_scale=1.0, shared=None,
                   **route_kwargs):
  """Reference MoE layer: route with the loop reference of ``router``, then run each
  kept (token, expert) pair through its expert one token at a time, and add the shared
  experts' output of every token.

  Args:
    x: [T, M] with T a multiple of group_size.
    router_kernel: [M, E]; wi, wo (and wi_gate for SwiGLU): the stacked experts.
    router: "topk" (scores by ``score_fn``, :func:`route_loop` with ``route_kwargs``),
      "noisy_topk" (``noise``: f32[G, S, E] standard normal draws, scaled by
      ``(softplus(x noise_kernel) + 1e-2) * noise_scale``; None routes the clean
      logits) or "expert_choice".
    shared: None or ``(wi, wo, wi_gate)`` of the shared experts' dense FFN.

  Returns [T, M].
  """
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
  x, router_kernel, wi, wo, wi_gate = map(f64, (x, router_kernel, wi, wo, wi_gate))
  num_tokens, d_model = x.shape
  shape = (num_tokens // group_size, group_size, -1)
  logits = (x @ router_kernel).reshape(shape)
  if router == "topk":
    scores = (np.exp(logits - logits.max(-1, keepdims=True)) if score_fn == "softmax"
              else 1 / (1 + np.exp(-logits)))
    if score_fn == "softmax":
      scores = scores / scores.sum(-1, keepdims=True)
    _, combine = route_loop(scores, top_k=top_k, capacity=capacity, **route_kwargs)
  elif router == "noisy_topk":
    std = np.ones_like(logits)
    if noise is not None:
      std = (np.logaddexp(0.0, x @ f64(noise_kernel)).reshape(shape) + 1e-2) * noise_scale
    combine = noisy_top_k_loop(logits, std, noise, top_k=top_k, capacity=capacity,
                               **route_kwargs)["combine"]
  elif router == "expert_choice":
    combine = expert_choice_loop(logits, capacity=capacity, **route_kwargs)["combine"]
  else:
    raise NotImplementedError(router)
  y = np.zeros_like(x)
  for t in range(num_tokens):
    g, s = divmod(t, group_size)
    for e in range(wi.shape[0]):
      gate = combine[g, s, e].sum()
      if gate == 0:
        continue
      y[t] += gate * _ffn(x[t], wi[e], wo[e], None if wi_gate is None else wi_gate[e],
                          activation)
    if shared is not None:
      s_wi, s_wo, s_gate = map(f64, shared)
      y[t] += _ffn(x[t], s_wi, s_wo, s_gate, activation)
  return y


# ----------------------------------------------------------------------------
# Router zoo references (token choice with scores/bias/groups, expert choice, noisy)
# ----------------------------------------------------------------------------


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


def _argmax_first(values, allowed):
  """Index of the largest allowed value; the lowest index on ties."""
  best = None
  for i, v in enumerate(values):
    if allowed[i] and (best is None or v > values[best]):
      best = i
  return best


def route_zoo_loop(logits, *, top_k, capacity, score_fn="softmax", selection_bias=None,
                   expert_groups=1, top_groups=None, gate_scale=1.0,
                   balance_choices="first", normalize_gates=True, second_policy="all",
                   second_threshold=0.2, batch_priority=False, token_mask=None,
                   queue_order="choice_major"):
  """Reference token-choice routing, one token at a time, from the issue's steps 1-9.

  Returns a dict with ``dispatch`` bool[G, S, E, C], ``combine`` f64[G, S, E, C],
  ``aux_loss``, ``choice_counts`` f64[E] and ``expert_index`` int[G, S, K].
  """
  logits = np.asarray(logits, np.float64)
  num_groups, group_size, num_experts = logits.shape
  per_group = num_experts // expert_groups
  dispatch = np.zeros((num_groups, group_size, num_experts, capacity), bool)
  combine = np.zeros((num_groups, group_size, num_experts, capacity))
  counts = np.zeros(num_experts)
  all_index = np.zeros((num_groups, group_size, top_k), int)
  group_losses = []
  num_choices = 1 if balance_choices == "first" else top_k
  for g in range(num_groups):
    tokens = []  # per token: (experts, gates, wanted, first score)
    c = np.zeros(num_experts)
    p_sum = np.zeros(num_experts)
    num_valid = 0
    for s in range(group_size):
      valid = token_mask is None or bool(token_mask[g, s])
      if score_fn == "softmax":
        score = _softmax(logits[g, s])
        p = score
      else:
        score = 1.0 / (1.0 + np.exp(-logits[g, s]))
        p = score / score.sum()
      u = [score[e] + (0.0 if selection_bias is None else float(selection_bias[e]))
           for e in range(num_experts)]
      allowed = [True] * num_experts
      if expert_groups > 1:
        group_scores = []
        for q in range(expert_groups):
          members = sorted((u[e] for e in range(q * per_group, (q + 1) * per_group)),
                           reverse=True)
          group_scores.append(members[0] + (members[1] if per_group > 1 else 0.0))
        kept_groups = []
        for _ in range(top_groups):
          kept_groups.append(_argmax_first(
              group_scores, [q not in kept_groups for q in range(expert_groups)]))
        allowed = [e // per_group in kept_groups for e in range(num_experts)]
      experts = []
      for _ in range(top_k):
        e = _argmax_first(u, [allowed[i] and i not in experts
                              for i in range(num_experts)])
        experts.append(e)
      gates = [score[e] for e in experts]
      if normalize_gates and top_k > 1:
        total = sum(gates)
        gates = [x / total for x in gates]
      wanted = [valid] + [valid and (second_policy != "threshold"
                                     or gates[k] > second_threshold)
                          for k in range(1, top_k)]
      tokens.append((experts, gates, wanted, score[experts[0]]))
      all_index[g, s] = experts
      if valid:
        num_valid += 1
        p_sum += p
        for k, e in enumerate(experts):
          counts[e] += 1
          if k < num_choices:
            c[e] += 1
    if num_valid:
      group_losses.append(num_experts / (num_choices * num_valid)
                          * sum(c[e] * p_sum[e] / num_valid for e in range(num_experts)))
    if batch_priority:
      order = sorted(range(group_size), key=lambda s: (-tokens[s][3], s))
    else:
      order = list(range(group_size))
    choices = [list(zip(experts, [x * gate_scale for x in gates], wanted))
               for experts, gates, wanted, _ in tokens]
    _queue(dispatch, combine, g, choices, order, capacity, queue_order)
  aux = float(np.mean(group_losses)) if group_losses else 0.0
  return dict(dispatch=dispatch, combine=combine, aux_loss=aux, choice_counts=counts,
              expert_index=all_index)


def expert_choice_loop(logits, *, capacity, token_mask=None):
  """Reference expert choice: each expert sorts its group's valid tokens by score.

  Returns a dict with ``dispatch`` bool[G, S, E, C], ``combine`` f64[G, S, E, C],
  ``dropped_fraction``, ``experts_per_token`` and ``z_loss``.
  """
  logits = np.asarray(logits, np.float64)
  num_groups, group_size, num_experts = logits.shape
  dispatch = np.zeros((num_groups, group_size, num_experts, capacity), bool)
  combine = np.zeros((num_groups, group_size, num_experts, capacity))
  picked = np.zeros((num_groups, group_size), int)
  z, n = 0.0, 0
  for g in range(num_groups):
    scores = [_softmax(logits[g, s]) for s in range(group_size)]
    valid = [token_mask is None or bool(token_mask[g, s]) for s in range(group_size)]
    for e in range(num_experts):
      candidates = sorted((s for s in range(group_size) if valid[s]),
                          key=lambda s: (-scores[s][e], s))
      for slot, s in enumerate(candidates[:capacity]):
        dispatch[g, s, e, slot] = True
        combine[g, s, e, slot] = scores[s][e]
        picked[g, s] += 1
    for s in range(group_size):
      if valid[s]:
        m = logits[g, s].max()
        z += (m + np.log(np.exp(logits[g, s] - m).sum())) ** 2
        n += 1
  mask = np.ones((num_groups, group_size), bool) if token_mask is None else (
      np.asarray(token_mask, bool))
  return dict(dispatch=dispatch, combine=combine,
              dropped_fraction=float(np.sum((picked == 0) & mask) / max(n, 1)),
              experts_per_token=float(np.sum(picked * mask) / max(n, 1)),
              z_loss=z / max(n, 1))


def noisy_top_k_loop(clean, noise_std, noise, *, top_k, capacity, token_mask=None,
                     queue_order="choice_major"):
  """Reference noisy top-k gating (Shazeer et al. 2017) for a given standard-normal
  ``noise`` sample (None: no noise, load by counts).

  Returns a dict with ``dispatch``, ``combine``, ``aux_loss``, ``importance`` and
  ``load`` (both f64[G, E]).
  """
  import math
  clean = np.asarray(clean, np.float64)
  std = np.asarray(noise_std, np.float64)
  num_groups, group_size, num_experts = clean.shape
  noisy = clean if noise is None else clean + np.asarray(noise, np.float64) * std
  dispatch = np.zeros((num_groups, group_size, num_experts, capacity), bool)
  combine = np.zeros((num_groups, group_size, num_experts, capacity))
  importance = np.zeros((num_groups, num_experts))
  load = np.zeros((num_groups, num_experts))

  def cv2(x):
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return var / (mean ** 2 + 1e-10)

  aux = 0.0
  for g in range(num_groups):
    tokens = []
    for s in range(group_size):
      valid = token_mask is None or bool(token_mask[g, s])
      experts = []
      for _ in range(top_k):
        experts.append(_argmax_first(noisy[g, s], [i not in experts
                                                   for i in range(num_experts)]))
      gates = _softmax([noisy[g, s, e] for e in experts])
      tokens.append((experts, gates, valid))
      if not valid:
        continue
      for e, gate in zip(experts, gates):
        importance[g, e] += gate
      ranked = sorted(noisy[g, s], reverse=True)
      for e in range(num_experts):
        if noise is not None and top_k < num_experts:
          thr = ranked[top_k] if e in experts else ranked[top_k - 1]
          z = (clean[g, s, e] - thr) / std[g, s, e]
          load[g, e] += 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        elif e in experts:
          load[g, e] += 1
    aux += (cv2(importance[g]) + cv2(load[g])) / num_groups
    choices = [list(zip(experts, gates, [valid] * top_k))
               for experts, gates, valid in tokens]
    _queue(dispatch, combine, g, choices, range(group_size), capacity, queue_order)
  return dict(dispatch=dispatch, combine=combine, aux_loss=aux, importance=importance,
              load=load)


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


def _rms_norm(x, scale, eps=1e-6):
  """RMSNorm of one token, float64."""
  return x / np.sqrt(np.mean(x * x) + eps) * scale


def _rotate(v, position, base):
  """RoFormer rotary of one head's vector v [D] at ``position`` (rotate-half form)."""
  half = len(v) // 2
  freq = base ** (-np.arange(half) / half)
  cos, sin = np.cos(position * freq), np.sin(position * freq)
  return np.concatenate([v[:half] * cos - v[half:] * sin, v[half:] * cos + v[:half] * sin])


def routed_block_loop(x, *, router, capacity, wq, wk, wv, wo, attn_scale, ffn_wi, ffn_wo,
                      ffn_scale, activation="gelu", rope_base=10000.0):
  """Reference Mixture-of-Depths routed block (Raposo et al. 2024), one token at a time.

  x: [B, L, M]; router: [M]; wq: [M, N, D]; wk, wv: [M, N_kv, D] (query head ``n``
  reads KV head ``n // (N / N_kv)``); wo: [N, D, M]; the RMSNorm scales
  of the attention and FFN branches; a dense FFN ``ffn_wi [M, H]``, ``ffn_wo [H, M]``.
  Per row: ``r_i = x_i . router``; the ``k = ceil(capacity * L)`` largest ``r`` are
  picked by sorting on ``(-r_i, i)`` (ties to the lower position); each picked token
  attends to the picked tokens at or before its position with rotary angles of the
  original positions; ``f_i = h_i + ffn(norm(x_i + h_i))``; ``out_i = x_i + r_i f_i``
  for picked tokens and ``x_i`` for the others. Returns (out f64[B, L, M], the picked
  positions of each row).
  """
  x = np.asarray(x, np.float64)
  batch, length, _ = x.shape
  k = int(np.ceil(capacity * length - 1e-9))
  head_dim = wq.shape[-1]
  groups = wq.shape[1] // wk.shape[1]  # query heads per KV head
  out = x.copy()
  picked_rows = []
  for b in range(batch):
    r = x[b] @ router
    picked = sorted(sorted(range(length), key=lambda i: (-r[i], i))[:k])
    picked_rows.append(picked)
    normed = {i: _rms_norm(x[b, i], attn_scale) for i in picked}
    q = {i: np.einsum("M,MND->ND", normed[i], wq) for i in picked}
    key = {i: np.einsum("M,MND->ND", normed[i], wk) for i in picked}
    val = {i: np.einsum("M,MND->ND", normed[i], wv) for i in picked}
    for i in picked:
      h = np.zeros(x.shape[-1])
      for n in range(wq.shape[1]):
        qi = _rotate(q[i][n], i, rope_base)
        earlier = [j for j in picked if j <= i]
        kv = n // groups
        scores = np.array([qi @ _rotate(key[j][kv], j, rope_base) for j in earlier])
        p = _softmax(scores / np.sqrt(head_dim))
        mixed = sum(pj * val[j][kv] for pj, j in zip(p, earlier))
        h += mixed @ wo[n]
      y = _ffn(_rms_norm(x[b, i] + h, ffn_scale), ffn_wi, ffn_wo, None, activation)
      out[b, i] = x[b, i] + r[i] * (h + y)
  return out, picked_rows
