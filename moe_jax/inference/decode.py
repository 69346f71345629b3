"""KV-cached batched decoding: ``prefill`` the prompts, then ``step`` one token at a time.

Every block type owns its decode state behind one small interface
(:class:`DecodeBlock`): ``init_cache(batch, max_len, dtype)`` preallocates it as nnx
``Cache`` variables, and ``decode(x, positions, mask, prefill=)`` runs the block on new
tokens while reading and writing that state (a scanned model decodes as its
unrolled twin, ``model.unrolled()``). The decoder loops over ``model.blocks``
and never asks which kind of block it has, so a Mamba mixer (its conv and SSM states)
or a Mixture-of-Depths block (a KV cache it writes only for the tokens it routes) plugs
in by implementing the same two methods.

:class:`Decoder` jits two functions, traced once each whatever the prompts:

* **prefill**: the prompts padded to a fixed ``[B, prefill_len]`` (left or right, each
  row with its own length and positions) fill an empty cache and sample each row's
  first new token;
* **step**: the B newest tokens, at their rows' next positions, go through the model
  against the cache, and the next tokens are sampled (greedy, temperature, top-k,
  top-p; an optional stop id per row).

A token sits in the cache slot of its position, so left and right padding give the
same cache, and a row's positions are its own (rotary angles and learned positions are
those of the unpadded row). When a row reaches ``max_len`` it alone is re-prefilled
from its last ``min(prefill_len, max_len // 2)`` tokens, at positions from 0, as the
uncached sampler's window does at every token; one prefill then serves many steps.

MoE blocks decode in evaluation mode. Prefill routes with ``eval_capacity_factor``
(padding takes no capacity); a step routes the B new tokens with capacity S = the new
tokens of one data-parallel device, so no token is dropped for capacity. Cached
logits therefore equal the full forward pass exactly when the full pass drops no token
either (docs/inference.md). Non-causal routers are refused by ``init_cache``.
Mixture-of-Depths routed blocks route with their predictors (:mod:`moe_jax.models.mod`);
the reference is then the full forward pass with ``use_predictor=True``.

:func:`generate_uncached` is the reference sampler that re-runs the model on the whole
window for every token (the method before the cache); benchmarks compare against it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.layers.router_families import TokenContext

PADDINGS = ("right", "left")


class DecodeBlock(Protocol):
  """What a block of ``model.blocks`` implements to be decoded with a cache."""

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    """Preallocates this block's decode state as nnx ``Cache`` variables (emptied),
    each with the batch as its leading axis (the decoder empties single rows).

    Raises :class:`moe_jax.errors.ConfigError` if the block cannot decode causally.
    """

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
             prefill: bool, context: TokenContext | None = None) -> jax.Array:
    """x: [B, L, M] new tokens at positions i32[B, L]; mask bool[B, L] is False on
    padding (which must leave the state as it was) -> [B, L, M]. ``context`` holds
    the new tokens' ids for the MoE layers."""


def init_cache(model, batch: int, max_len: int, dtype=None) -> None:
  """Calls ``init_cache`` of every block of ``model`` (a Transformer), in place."""
  dtype = dtype or model.cfg.compute_dtype
  for block in model.blocks:
    block.init_cache(batch, max_len, dtype)


def forward(model, tokens: jax.Array, positions: jax.Array, mask: jax.Array, *,
            prefill: bool) -> jax.Array:
  """i32[B, L] new tokens -> [B, L, M] last hidden states, updating every cache.

  The MoE layers receive the token ids in their
  :class:`~moe_jax.layers.router_families.TokenContext`, as in the full forward pass.
  """
  x = model.embed(tokens, positions)
  context = TokenContext(token_ids=tokens)
  for block in model.blocks:
    x = block.decode(x, positions, mask, prefill=prefill, context=context)
  return x


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k,
                  top_p) -> jax.Array:
  """f32[B, V] logits -> i32[B] tokens.

  ``temperature`` 0 is greedy (argmax). Otherwise the logits are divided by the
  temperature, cut to the ``top_k`` largest (0: all; ties at the cut are kept) and then
  to the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et
  al. 2020; 1.0: all), and a token is drawn per row. All three are traced values, so
  changing them does not recompile.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  desc = -jnp.sort(-scaled, axis=-1)  # [B, V], largest first
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  rank = jnp.arange(vocab)
  desc = jnp.where(rank < k, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
  keep = (rank == 0) | (before < top_p) | (top_p >= 1.0)
  keep &= rank < k
  cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  scaled = jnp.where(scaled >= cut, scaled, -jnp.inf)
  sampled = jax.random.categorical(key, scaled, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """A batch of prompts padded to ``[B, P]`` (host arrays).

  Attributes:
    tokens: i32[B, P], padding holds ``pad_id``.
    positions: i32[B, P], each row's own positions from 0 (0 on padding).
    mask: bool[B, P], True on prompt tokens.
    last: i32[B], column of each row's last prompt token.
    lengths: i32[B], prompt lengths.
  """

  tokens: np.ndarray
  positions: np.ndarray
  mask: np.ndarray
  last: np.ndarray
  lengths: np.ndarray


def layout_prompts(prompts: Sequence[Sequence[int] | None], prefill_len: int, *,
                   padding: str = "right", pad_id: int = 0) -> PromptLayout:
  """Pads ``prompts`` (each 1 to ``prefill_len`` tokens) on the left or the right.

  A ``None`` prompt is a row of padding only (a row that is not being prefilled).
  """
  if padding not in PADDINGS:
    raise ValueError(f"padding={padding!r} must be one of {PADDINGS}.")
  batch = len(prompts)
  tokens = np.full((batch, prefill_len), pad_id, np.int32)
  positions = np.zeros((batch, prefill_len), np.int32)
  mask = np.zeros((batch, prefill_len), bool)
  lengths = np.array([0 if p is None else len(p) for p in prompts], np.int32)
  for b, prompt in enumerate(prompts):
    if prompt is None:
      continue
    n = len(prompt)
    if not 1 <= n <= prefill_len:
      raise ValueError(f"prompt {b} has {n} tokens; prompts need 1 to prefill_len="
                       f"{prefill_len} tokens (start an empty one with a BOS/EOS id).")
    cols = slice(0, n) if padding == "right" else slice(prefill_len - n, prefill_len)
    tokens[b, cols] = prompt
    positions[b, cols] = np.arange(n)
    mask[b, cols] = True
  last = np.maximum(lengths - 1, 0) if padding == "right" else np.full(
      batch, prefill_len - 1)
  return PromptLayout(tokens, positions, mask, last.astype(np.int32), lengths)


class Decoder:
  """Cached decoding of batches of up to ``batch_size`` prompts with one model.

  ``decoder.prefill(prompts)`` then ``decoder.step(tokens)`` give next-token logits
  (teacher forcing); ``decoder.generate(prompts, n)`` samples. ``traces`` counts how
  often each function was traced (1 each, whatever the prompts).

  Rows are independent: a row that fills the cache is re-prefilled on its own while
  the others step, so a row's tokens do not depend on the other prompts of the batch
  (beyond MoE capacity at prefill, as in evaluation).

  Args:
    model: a :class:`moe_jax.models.transformer.Transformer` (left unchanged: the
      decoder works on a view of its arrays with caches added).
    batch_size: B, rows of the cache; smaller batches are filled with idle rows.
    max_len: cache length, the longest row before its window slides.
    prefill_len: P, the fixed padded prompt length (default ``max_len``).
    prefill_chunk: run the prefill ``prefill_chunk`` columns at a time (a divisor of
      P; 0: all P at once), each chunk writing its tokens to the cache and attending
      to it, so each pass holds a chunk's activations. The same numbers as one pass for
      attention, MLA, Mamba and dropless MoE; capacity-bounded MoE routing and
      Mixture-of-Depths route each chunk's tokens as their own group.
    dtype: cache dtype (default the model's compute dtype).
    pad_id: token written on padding and after a row stops.
  """

  def __init__(self, model, *, batch_size: int, max_len: int,
               prefill_len: int | None = None, dtype=None, pad_id: int = 0,
               prefill_chunk: int = 0):
    cfg = model.cfg
    prefill_len = max_len if prefill_len is None else prefill_len
    if prefill_chunk < 0 or (prefill_chunk and prefill_len % prefill_chunk):
      raise ValueError(f"prefill_chunk={prefill_chunk} must divide prefill_len="
                       f"{prefill_len}; use a divisor of it, or 0 for one pass.")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} must be >= 2.")
    if not 1 <= prefill_len <= max_len:
      raise ValueError(f"prefill_len={prefill_len} must be in [1, max_len={max_len}].")
    if cfg.position == "learned" and max_len > cfg.max_len:
      raise ValueError(f"max_len={max_len} exceeds the model's {cfg.max_len} learned "
                       f"positions; use max_len <= {cfg.max_len}.")
    self.batch_size, self.max_len, self.prefill_len = batch_size, max_len, prefill_len
    self.prefill_chunk = prefill_chunk or prefill_len
    self.pad_id = pad_id
    # A scanned model decodes as its unrolled copy (the same arrays, one cache per block).
    view = nnx.merge(*nnx.split(model.unrolled()))  # new Variables, the same arrays
    init_cache(view, batch_size, max_len, dtype)
    self._graphdef, self._params, self._empty, self._rest = nnx.split(
        view, nnx.Param, nnx.Cache, ...)
    self.traces = {"prefill": 0, "step": 0}
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("all_logits",))
    self._step = jax.jit(self._step_fn, donate_argnums=(2,))
    self.chunk = 32  # steps one call of the step function can run on the device
    self.layout: PromptLayout | None = None
    self._cache = None
    self._positions = None  # i32[B], each row's next position

  # -- the two jitted functions -----------------------------------------------------

  def _prefill_fn(self, params, rest, cache, empty, reset, tokens, positions, mask,
                  last, key, sampling, *, all_logits):
    self.traces["prefill"] += 1
    # Every Cache variable has the batch as its leading axis: reset rows start empty.
    cache = jax.tree.map(
        lambda c, e: jnp.where(reset.reshape((-1,) + (1,) * (c.ndim - 1)), e, c),
        cache, empty)
    model = nnx.merge(self._graphdef, params, cache, rest)
    # Chunk by chunk, each writing its tokens to the cache and attending to it.
    c = self.prefill_chunk
    x = jnp.concatenate([forward(model, tokens[:, i:i + c], positions[:, i:i + c],
                                 mask[:, i:i + c], prefill=True)
                         for i in range(0, tokens.shape[1], c)], axis=1)
    rows = jnp.arange(x.shape[0])
    logits = model.head(x[rows, last][:, None])[:, 0]  # f32[B, V]
    token = sample_logits(logits, key, *sampling)
    out = model.head(x) if all_logits else logits
    return out, token, nnx.state(model, nnx.Cache)

  def _step_fn(self, params, rest, cache, tokens, positions, active, done, stop_ids,
               key, start, num_steps, sampling):
    """Runs ``num_steps`` (<= ``chunk``, traced) steps in a device loop, feeding each
    sampled token back; the first step feeds ``tokens``. Rows that are not ``active``
    or are ``done`` write nothing and emit ``pad_id``."""
    self.traces["step"] += 1
    batch = tokens.shape[0]
    last = self.max_len - 1

    def body(i, carry):
      # ``rest`` (RNG counts among it, e.g. of second_policy="random") is carried too:
      # a module state cannot be updated across the loop's trace boundary.
      cache, rest, token, positions, done, _, out = carry
      model = nnx.merge(self._graphdef, params, cache, rest)
      live = active & ~done
      x = forward(model, token[:, None], jnp.minimum(positions, last)[:, None],
                  live[:, None], prefill=False)
      logits = model.head(x)[:, 0]
      sampled = sample_logits(logits, jax.random.fold_in(key, start + i), *sampling)
      token = jnp.where(live, sampled, self.pad_id)
      done = done | (live & (token == stop_ids))
      positions = positions + active.astype(jnp.int32)
      out = out.at[i].set(token)
      _, _, cache, rest = nnx.split(model, nnx.Param, nnx.Cache, ...)
      return cache, rest, token, positions, done, logits, out

    vocab = self._params["embedding"].shape[0]
    init = (cache, rest, tokens, positions, done,
            jnp.zeros((batch, vocab), jnp.float32),
            jnp.full((self.chunk, batch), self.pad_id, jnp.int32))
    cache, _, token, positions, done, logits, out = jax.lax.fori_loop(
        0, num_steps, body, init)
    return logits, out, token, positions, done, cache

  # -- teacher forcing --------------------------------------------------------------

  def _pad_rows(self, prompts):
    if not 1 <= len(prompts) <= self.batch_size:
      raise ValueError(f"{len(prompts)} prompts for a decoder of batch_size="
                       f"{self.batch_size}; pass 1 to {self.batch_size}.")
    idle = self.batch_size - len(prompts)
    return list(prompts) + [[self.pad_id]] * idle

  def prefill(self, prompts: Sequence[Sequence[int] | None], *, padding: str = "right",
              all_logits: bool = False, key: jax.Array | None = None,
              sampling=(0.0, 0, 1.0), rows: np.ndarray | None = None):
    """Runs the prompts into an emptied cache. Returns ``(logits, first_tokens)``.

    ``logits`` is f32[B, V] at each row's last prompt token, or with ``all_logits``
    f32[B, P, V] at every column of :attr:`layout`. ``first_tokens`` i32[B] are sampled
    from the former with ``sampling = (temperature, top_k, top_p)``. With ``rows``
    (bool[B]) only those rows are emptied and prefilled (``prompts`` has B entries,
    None for the other rows, which keep their state).
    """
    if rows is None:
      prompts = self._pad_rows(prompts)
      rows = np.ones(self.batch_size, bool)
    layout = layout_prompts(prompts, self.prefill_len, padding=padding,
                            pad_id=self.pad_id)
    self.layout = layout
    key = jax.random.key(0) if key is None else key
    cache = self._empty if self._cache is None else self._cache
    out, token, self._cache = self._prefill(
        self._params, self._rest, cache, self._empty, rows, layout.tokens,
        layout.positions, layout.mask, layout.last, key, _sampling(*sampling),
        all_logits=all_logits)
    lengths = jnp.asarray(layout.lengths)
    self._positions = (lengths if self._positions is None
                       else jnp.where(rows, lengths, self._positions))
    return out, token

  def step(self, tokens, *, key: jax.Array | None = None, sampling=(0.0, 0, 1.0),
           active=None, done=None, stop_ids=None):
    """Feeds i32[B] tokens at each row's next position (rows where ``active`` is
    False are left alone). Returns ``(logits f32[B, V], next_tokens i32[B], done
    bool[B])``; a row is done once it has sampled its stop id."""
    logits, _, token, done = self.run_steps(tokens, 1, key=key, sampling=sampling,
                                       active=active, done=done, stop_ids=stop_ids)
    return logits, token, done

  def run_steps(self, tokens, num_steps, *, key=None, start=0, sampling=(0.0, 0, 1.0),
           active=None, done=None, stop_ids=None):
    """Runs ``num_steps`` (1 to ``chunk``) steps in one call on the device, feeding
    ``tokens`` and then each sampled token back (fold ``start + i`` into ``key`` at
    step i). Returns ``(logits f32[B, V] of the last step, i32[chunk, B] tokens whose
    first num_steps rows are new, the last tokens i32[B], done bool[B])``."""
    if self._cache is None:
      raise ValueError("Decoder.step needs a prefill first.")
    if not 1 <= num_steps <= self.chunk:
      raise ValueError(f"num_steps={num_steps} must be in [1, {self.chunk}].")
    batch = self.batch_size
    active = np.ones(batch, bool) if active is None else active
    done = jnp.zeros(batch, jnp.bool_) if done is None else done
    stop_ids = jnp.full(batch, -1, jnp.int32) if stop_ids is None else stop_ids
    key = jax.random.key(0) if key is None else key
    logits, out, token, self._positions, done, self._cache = self._step(
        self._params, self._rest, self._cache, jnp.asarray(tokens, jnp.int32),
        self._positions, active, done, stop_ids, key, np.int32(start),
        np.int32(num_steps), _sampling(*sampling))
    return logits, out, token, done

  def step_memory(self) -> dict[str, int]:
    """Bytes of the compiled step from XLA's memory analysis: ``arguments`` (weights,
    cache, inputs), ``outputs``, ``temp`` and ``peak`` = arguments + outputs + temp -
    aliased (the donated cache is updated in place)."""
    batch = self.batch_size
    zeros = np.zeros(batch, np.int32)
    compiled = self._step.lower(
        self._params, self._rest, self._empty, zeros, zeros, np.ones(batch, bool),
        np.zeros(batch, bool), zeros, jax.random.key(0), np.int32(0), np.int32(1),
        _sampling(0.0, 0, 1.0)).compile()
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes),
           "outputs": int(m.output_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] + out["temp"] - out["aliased"]
    return out

  def cache_bytes(self) -> int:
    """Bytes of every block's decode state for ``batch_size`` rows of ``max_len``."""
    return int(sum(x.nbytes for x in jax.tree.leaves(self._empty)))

  # -- sampling ---------------------------------------------------------------------

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, stop_ids: Sequence[int | None] | int | None = None,
               padding: str = "right") -> list[list[int]]:
    """Samples up to ``max_new_tokens`` tokens after each prompt.

    ``stop_ids``: one id for every row, or one per row (None: no stop); a row ends
    with its stop id included. A row that reaches ``max_len`` continues from its last
    ``min(prefill_len, max_len // 2)`` tokens, re-prefilled at positions from 0.
    Returns one list of new tokens per prompt.
    """
    for name, value, ok, fix in (
        ("temperature", temperature, temperature >= 0, "must be >= 0 (0 is greedy)"),
        ("top_k", top_k, top_k >= 0, "must be >= 0 (0 is off)"),
        ("top_p", top_p, 0 < top_p <= 1, "must be in (0, 1] (1 is off)"),
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 0, "must be >= 0")):
      if not ok:
        raise ValueError(f"{name}={value!r} {fix}.")
    self._pad_rows(prompts)  # checks the batch size
    num, batch = len(prompts), self.batch_size
    if max_new_tokens == 0:
      return [[] for _ in range(num)]
    if not isinstance(stop_ids, (list, tuple)):
      stop_ids = [stop_ids] * num
    if len(stop_ids) != num:
      raise ValueError(f"{len(stop_ids)} stop ids for {num} prompts.")
    stops = np.full(batch, -1, np.int32)
    stops[:num] = [-1 if s is None else s for s in stop_ids]
    stops = jnp.asarray(stops)
    sampling = (temperature, top_k, top_p)
    key = jax.random.key(seed)
    history = [list(map(int, p)) for p in prompts]
    keep = min(self.prefill_len, self.max_len // 2)
    idle = np.arange(batch) >= num

    _, token = self.prefill(prompts, padding=padding, key=jax.random.fold_in(key, 0),
                            sampling=sampling)
    done = jnp.asarray(idle) | (token == stops)
    next_pos = self.layout.lengths.copy()  # host copy of each row's next position
    # Device arrays not yet copied into ``history``: (i32[B] or i32[chunk, B], rows).
    # Sliced on the host, so that no shape-dependent op is compiled per length.
    pending = [(token, None)]
    new = [[] for _ in range(num)]

    def flush():
      if pending:
        block = np.concatenate([np.asarray(a)[None] if n is None else np.asarray(a)[:n]
                                for a, n in pending])  # [T, B]
        for b in range(num):
          new[b].extend(block[:, b].tolist())
          history[b].extend(block[:, b].tolist())
        pending.clear()

    t = 1  # tokens generated per row so far
    while t < max_new_tokens:
      full = (next_pos >= self.max_len) & ~idle
      if full.any():  # slide: those rows restart from their last ``keep`` tokens
        step_key = jax.random.fold_in(key, t)
        flush()
        _, fresh = self.prefill(
            [history[b][-keep:] if full[b] else None for b in range(batch)],
            padding=padding, key=step_key, sampling=sampling, rows=full)
        fresh = jnp.where(done, self.pad_id, fresh)
        fresh_done = done | (fresh == stops)
        if (~full & ~idle).any():
          _, _, token, done = self.run_steps(token, 1, key=key, start=t,
                                             sampling=sampling, active=~full, done=done,
                                             stop_ids=stops)
        token = jnp.where(full, fresh, token)
        done = jnp.where(full, fresh_done, done)
        next_pos = np.where(full, keep, next_pos + 1)
        pending.append((token, None))
        t += 1
      else:  # as many steps as fit before the next slide, in one call
        room = self.max_len - int(next_pos[~idle].max())
        n = min(self.chunk, max_new_tokens - t, room)
        _, out, token, done = self.run_steps(token, n, key=key, start=t,
                                             sampling=sampling, done=done, stop_ids=stops)
        next_pos = next_pos + n
        pending.append((out, n))
        t += n
      if bool(jnp.all(done)):
        break
    flush()
    return [_cut(row, stop) for row, stop in zip(new, stop_ids)]


def _sampling(temperature, top_k, top_p):
  return (np.float32(temperature), np.int32(top_k), np.float32(top_p))


def _cut(tokens: list[int], stop: int | None) -> list[int]:
  """Tokens up to and including the first ``stop``."""
  if stop is not None and stop in tokens:
    return tokens[:tokens.index(stop) + 1]
  return tokens


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             max_len: int, prefill_len: int | None = None, **kwargs) -> list[list[int]]:
  """One-call cached sampling: a :class:`Decoder` for ``len(prompts)`` rows, then
  :meth:`Decoder.generate` with ``kwargs``."""
  decoder = Decoder(model, batch_size=len(prompts), max_len=max_len,
                    prefill_len=prefill_len)
  return decoder.generate(prompts, max_new_tokens, **kwargs)


def generate_uncached(model, prompt: Sequence[int], length: int, *,
                      temperature: float = 0.8, top_k: int = 40, seed: int = 0,
                      window: int = 256, stop_id: int | None = None) -> list[int]:
  """The sampler without a cache: every token re-runs the model on the last
  ``window`` tokens, padded to a fixed ``[1, window]`` so one compilation serves every
  position. The padding is masked (``token_mask``): MoE layers never route it, so it
  takes no expert slot; causal attention and Mamba's causal scan keep it from the real
  tokens, and Mixture-of-Depths blocks route with their predictors, so that too is
  causal. Temperature and top-k on the host; 0 is greedy.

  Kept as the reference the cache is measured and tested against.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_get(params)
  rng = np.random.default_rng(seed)
  ids = [int(t) for t in prompt]
  out = []
  for _ in range(length):
    ctx = ids[-window:]
    buf = np.zeros((1, window), np.int32)
    buf[0, :len(ctx)] = ctx
    logits = np.asarray(_window_logits(graphdef, params, rest, buf, len(ctx) - 1),
                        np.float64)
    if temperature <= 0:
      tok = int(np.argmax(logits))
    else:
      logits = logits / temperature
      if 0 < top_k < logits.size:
        cut = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= cut, logits, -np.inf)
      p = np.exp(logits - logits.max())
      tok = int(rng.choice(p.size, p=p / p.sum()))
    ids.append(tok)
    out.append(tok)
    if stop_id is not None and tok == stop_id:
      break
  return out


@functools.partial(jax.jit, static_argnums=0)
def _window_logits(graphdef, params, rest, tokens, pos):
  """f32[V] logits at ``pos`` of the full forward pass over ``tokens`` i32[1, W], the
  tokens after ``pos`` masked as padding.

  Mixture-of-Depths blocks route with their predictors (``use_predictor``), as the
  cache does: their top-k would look at later tokens."""
  model = nnx.merge(graphdef, params, rest, copy=True)
  token_mask = jnp.arange(tokens.shape[1])[None, :] <= pos  # the padding after pos
  logits, _ = model(tokens, deterministic=True, token_mask=token_mask,
                    use_predictor=True)
  return logits[0, pos]
