"""Read-outs for looking at MoE models: routing per token, labels, memory, collectives.

Small host-side helpers used by the notebooks in ``notebooks/``. Nothing here is needed
to train a model; everything works on the public API of the other modules:

* :func:`capacity_sweep`: dropped fraction of :func:`moe_jax.routing.route` against the
  capacity factor, for fixed logits.
* :func:`trace_routing`: runs any nnx model once and returns, for every
  :class:`~moe_jax.moe_layer.MoeLayer` in it, which expert each token went to
  (``[B, L, K]`` arrays), read from the router logits with ``nnx.capture``.
* :func:`char_labels`, :func:`word_class_labels`, :func:`script_role_labels`,
  :func:`speaker_labels`, :func:`routing_table`, :func:`mutual_information`: per-byte
  categories of a play script, the expert distribution of each category, and how
  much a category tells about the expert.
* :func:`load_history`: per-layer expert load over training, from ``metrics.jsonl``.
* :func:`experts_by_device`, :func:`placed_bytes_per_device`,
  :func:`planned_bytes_per_device`: where experts and parameters live on a mesh.
* :func:`hlo_collectives`, :func:`moe_comm_bytes`: the collectives of a compiled
  program and a simple model of the bytes an MoE layer moves.

Shapes use the project legend: B, L batch and length; G, S groups and tokens per
group; E, C, K experts, capacity, choices per token; M, H model and expert width.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import moe_layer, routing

# ------------------------------------------------------------------------------------
# Capacity
# ------------------------------------------------------------------------------------


def capacity_sweep(
    logits: Any,
    capacity_factors: Sequence[float],
    *,
    top_k: int = 1,
    min_capacity: int = 1,
    **route_kwargs: Any,
) -> dict[str, np.ndarray]:
  """Routes fixed ``logits`` at each capacity factor; one entry per factor.

  Args:
    logits: f32[G, S, E] router logits.
    capacity_factors: the factors to try; ``C = expert_capacity(S, E, cf, min_capacity)``.
    top_k: K.
    min_capacity: lower bound on C (1 so that small factors really bite).
    **route_kwargs: passed to :func:`moe_jax.routing.route` (``second_policy``,
      ``second_threshold``, ``batch_priority``, ``rng``, ...).

  Returns:
    ``capacity`` i64[n], and f64[n] ``dropped_fraction`` (tokens with no kept choice),
    ``second_kept_fraction`` and ``kept_gate_mass`` (sum of kept gates over the sum of
    all gates the policy wanted, i.e. how much of the router's weight survives).
  """
  logits = jnp.asarray(logits, jnp.float32)
  _, group_size, num_experts = logits.shape
  out = collections.defaultdict(list)
  full = routing.route(logits, top_k=top_k, capacity=group_size, **route_kwargs)
  wanted_mass = float(jnp.sum(full.gates))
  for cf in capacity_factors:
    cap = routing.expert_capacity(group_size, num_experts, cf, min_capacity)
    r = routing.route(logits, top_k=top_k, capacity=cap, **route_kwargs)
    out["capacity"].append(cap)
    out["dropped_fraction"].append(float(r.metrics["dropped_fraction"]))
    out["second_kept_fraction"].append(float(r.metrics["second_kept_fraction"]))
    out["kept_gate_mass"].append(float(jnp.sum(r.gates)) / max(wanted_mass, 1e-30))
  return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------
# Per-token routing of a model
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerRouting:
  """Where the tokens of one MoE layer went, as host numpy arrays.

  Attributes:
    path: the layer's path in the model, e.g. ``"blocks/1/ffn"``.
    logits: f32[B, L, E] router logits.
    expert_index: i32[B, L, K] the expert of each choice (choice 0 is the argmax).
    kept: bool[B, L, K] the choice survived the second-expert policy and capacity.
    gates: f32[B, L, K] combine weight of each choice (0 where not kept).
    capacity: C of the call.
  """

  path: str
  logits: np.ndarray
  expert_index: np.ndarray
  kept: np.ndarray
  gates: np.ndarray
  capacity: int

  @property
  def num_experts(self) -> int:
    return self.logits.shape[-1]

  @property
  def probs(self) -> np.ndarray:
    """f32[B, L, E] router probabilities."""
    z = self.logits - self.logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)

  @property
  def top1(self) -> np.ndarray:
    """i32[B, L] first-choice expert, before capacity."""
    return self.expert_index[..., 0]

  @property
  def confidence(self) -> np.ndarray:
    """f32[B, L] probability of the first choice."""
    return self.probs.max(axis=-1)

  @property
  def entropy(self) -> np.ndarray:
    """f32[B, L] entropy of the routing distribution, nats."""
    p = self.probs
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=-1)

  @property
  def dropped(self) -> np.ndarray:
    """bool[B, L] tokens with no kept choice (their MoE output is 0)."""
    return ~self.kept.any(axis=-1)


def _path_str(path: Iterable[Any]) -> str:
  return "/".join(str(p) for p in path)


def _captured(intermediates: Any, path: tuple) -> tuple:
  node = intermediates
  for key in path:
    node = node[key]
  value = node.get_value() if isinstance(node, nnx.Variable) else node
  return tuple(value)


def _trace(model, inputs, rng, deterministic, call_kwargs):
  _, intermediates = nnx.capture(model, nnx.Intermediate,
                                 method_outputs=nnx.Intermediate)(
                                     *inputs, deterministic=deterministic,
                                     **dict(call_kwargs))
  out = {}
  for path, layer in nnx.iter_modules(model):
    if not isinstance(layer, moe_layer.MoeLayer):
      continue
    calls = _captured(intermediates, tuple(path) + ("__call__",))
    logits_calls = _captured(intermediates, tuple(path) + ("router", "__call__"))
    if len(calls) != 1 or len(logits_calls) != 1:
      raise ValueError(f"MoE layer {_path_str(path)!r} ran {len(calls)} times in one "
                       "forward pass; trace_routing needs exactly one call per layer.")
    y, _ = calls[0]
    logits = logits_calls[0]  # f32[G, S, E]
    batch_shape = y.shape[:-1]
    num_tokens = math.prod(batch_shape)
    num_groups, group_size = logits.shape[:2]
    noise_std = None
    if not deterministic:  # noisy top-k: the learned noise scale of this call
      noise_std = _captured(intermediates, tuple(path) + ("router", "noise_std"))[0]
    r = layer.route(logits, num_tokens, deterministic=deterministic, rng=rng,
                    noise_std=noise_std)

    def per_token(a):
      a = a.reshape((num_groups * group_size,) + a.shape[2:])[:num_tokens]
      return a.reshape(batch_shape + a.shape[1:])

    out[_path_str(path)] = {
        "logits": per_token(logits), "expert_index": per_token(r.expert_index),
        "kept": per_token(r.kept), "gates": per_token(r.gates),
        "capacity": jnp.asarray(r.capacity, jnp.int32)}
  return out


# One compiled program per model structure and mode (eager tracing of a model compiles
# every operation separately, which is much slower the first time).
_trace_jit = nnx.jit(_trace, static_argnames=("deterministic", "call_kwargs"))


def trace_routing(model: nnx.Module, *inputs: Any, deterministic: bool = True,
                  rng: jax.Array | None = None,
                  **call_kwargs: Any) -> dict[str, LayerRouting]:
  """Runs ``model(*inputs, deterministic=..., **call_kwargs)`` once and returns the
  routing of every :class:`~moe_jax.moe_layer.MoeLayer` in it, by path.

  The router logits of each layer are recorded with ``nnx.capture`` (no change to the
  model) and routed again with :func:`moe_jax.routing.route` and the layer's own
  settings, so ``expert_index``, ``kept`` and ``gates`` are those of the forward pass.
  Each MoE layer must be called exactly once per forward pass. The forward pass is
  jitted; the model's RNG state advances as in a normal call.

  Args:
    model: any nnx module containing MoE layers (a ``Transformer``, a ``MoeLayer``).
    *inputs: the model's positional inputs; the leading dimensions of each MoE layer's
      input ``[B, L, M]`` become the ``[B, L]`` of the result.
    deterministic: evaluation mode (``eval_capacity_factor``, no jitter), the default.
      With ``False`` the jittered logits of this call are the ones recorded.
    rng: key for ``second_policy="random"`` and the gating noise of "noisy_topk"
      (its draws differ from the forward pass).
    **call_kwargs: more keyword arguments for the model (hashable values).

  Returns:
    ``{path: LayerRouting}`` in the model's graph order.
  """
  if rng is None:
    rng = jax.random.key(0)
  out = _trace_jit(model, inputs, rng, deterministic=deterministic,
                   call_kwargs=tuple(sorted(call_kwargs.items())))
  return {path: LayerRouting(path=path, capacity=int(v.pop("capacity")),
                             **{k: np.asarray(a) for k, a in v.items()})
          for path, v in out.items()}


# ------------------------------------------------------------------------------------
# Token categories of a play script
# ------------------------------------------------------------------------------------


def _as_text(data: str | bytes | np.ndarray | Sequence[int]) -> str:
  """One character per byte (latin-1), so that string indices are token positions."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  if not isinstance(data, bytes):
    ids = np.asarray(data).ravel()
    data = bytes(int(i) if 0 <= i < 256 else 0 for i in ids)
  return data.decode("latin-1")


CHAR_CLASSES = ("vowel", "consonant", "capital", "space", "newline", "punctuation",
                "digit", "other")


def char_labels(data: str | bytes | np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """Character class of each byte: i32[N] indices into :data:`CHAR_CLASSES`.

  ``data`` is text (UTF-8 encoded first) or byte token ids (ids >= 256, the special
  tokens, count as ``other``).
  """
  text = _as_text(data)
  table = {}
  for ch in "aeiouy":
    table[ch] = 0
  for ch in "bcdfghjklmnpqrstvwxz":
    table[ch] = 1
  for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    table[ch] = 2
  table[" "] = 3
  table["\n"] = 4
  for ch in ".,;:!?'\"-()[]&":
    table[ch] = 5
  for ch in "0123456789":
    table[ch] = 6
  labels = np.fromiter((table.get(ch, 7) for ch in text), np.int32, len(text))
  return labels, CHAR_CLASSES


# Closed word classes of Early Modern English, small and by hand; any other word is
# "other word". Each byte of a word gets the word's class; the bytes between words get
# "space" or "punctuation".
WORD_CLASS_LISTS: dict[str, frozenset[str]] = {
    "pronoun": frozenset(
        "i me my mine myself we us our ours you your yours thou thee thy thine ye he "
        "him his himself she her hers it its itself they them their theirs who whom "
        "whose this these that those".split()),
    "article": frozenset("a an the".split()),
    "preposition": frozenset(
        "of to in on at by for with from into upon unto about against before after "
        "under over through between without within among o'er".split()),
    "conjunction": frozenset(
        "and or but nor if than as though although while whilst when where yet so "
        "because since unless till until".split()),
    "auxiliary": frozenset(
        "is am are was were be been being art hath have has had doth do does did "
        "shall shalt will wilt would wouldst should shouldst can canst could couldst "
        "may mayst might must".split()),
    "negation": frozenset("not no nay never none".split()),
}
WORD_CLASSES = tuple(WORD_CLASS_LISTS) + ("other word", "space", "punctuation")
_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def word_class_labels(data: str | bytes | np.ndarray
                      ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Word class of each byte: i32[N] indices into :data:`WORD_CLASSES`.

  Words are runs of letters (with inner apostrophes); their class comes from
  :data:`WORD_CLASS_LISTS`, case-insensitively. Whitespace is ``space``, anything
  else between words is ``punctuation``.
  """
  text = _as_text(data)
  index = {name: i for i, name in enumerate(WORD_CLASSES)}
  labels = np.array([index["space"] if ch.isspace() else index["punctuation"]
                     for ch in text], np.int32)
  for m in _WORD_RE.finditer(text):
    word = m.group(0).lower()
    cls = next((name for name, words in WORD_CLASS_LISTS.items() if word in words),
               "other word")
    labels[m.start():m.end()] = index[cls]
  return labels, WORD_CLASSES


SCRIPT_ROLES = ("speech", "speaker name", "stage direction", "heading", "blank")
_DIRECTION_RE = re.compile(r"^\s*(\[|Enter\b|Exit\b|Exeunt\b|Re-enter\b|Manet\b|"
                           r"Flourish\b|Alarum|Sennet\b|Trumpets?\b|Music\b)")
_HEADING_RE = re.compile(r"^\s*(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b")


_LOWER_NAME_WORDS = frozenset("of the and de la le du to".split())
_DIRECTION_WORD_RE = re.compile(r"\b(Enter|Exit|Exeunt|Re-enter)\b")


def _is_speaker_line(line: str) -> bool:
  """``MACBETH``, ``First Witch``, ``KING HENRY V``, ``Duke of Venice``: short,
  capitalised words, no final punctuation, not a direction or heading."""
  line = line.strip()
  words = line.split()
  return (0 < len(line) <= 40 and len(words) <= 5 and line[-1].isalnum()
          and all(w[0].isupper() or w in _LOWER_NAME_WORDS for w in words)
          and words[0][0].isupper() and not _DIRECTION_RE.match(line)
          and not _HEADING_RE.match(line))


def _is_direction_line(line: str) -> bool:
  return bool(_DIRECTION_RE.match(line) or _DIRECTION_WORD_RE.search(line))


def _script_lines(text: str):
  """(start, end, role, speaker) per line; ``speaker`` is the speech's speaker.

  A speech is a paragraph of two or more lines whose first line is a speaker's name;
  its other lines are speech, except lines that look like directions (``[Aside]``).
  A speech interrupted by a stage direction goes on, without the name, in the next
  paragraph of two or more lines. Other paragraphs are stage directions, except
  ACT/SCENE headings, which also end the current speech.
  """
  lines = []
  start = 0
  for line in text.split("\n"):
    end = min(start + len(line) + 1, len(text))  # with its newline
    lines.append((start, end, line))
    start = end
  out = []
  speaker = None
  i = 0
  while i < len(lines):
    if not lines[i][2].strip():
      out.append((lines[i][0], lines[i][1], "blank", None))
      i += 1
      continue
    j = i
    while j < len(lines) and lines[j][2].strip():
      j += 1
    para = lines[i:j]
    first = para[0][2]
    if _HEADING_RE.match(first):
      speaker, in_speech = None, False
    elif len(para) >= 2 and _is_speaker_line(first):
      speaker, in_speech = first.strip(), True
      out.append((para[0][0], para[0][1], "speaker name", speaker))
      para = para[1:]
    else:  # a speech going on after a direction, or a direction
      in_speech = (speaker is not None and len(para) >= 2
                   and not _is_direction_line(first))
    for s, e, line in para:
      if in_speech:
        role = "stage direction" if _DIRECTION_RE.match(line) else "speech"
      else:
        role = "heading" if _HEADING_RE.match(line) else "stage direction"
      out.append((s, e, role, speaker if in_speech else None))
    i = j
  return out


def script_role_labels(data: str | bytes | np.ndarray
                       ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Role of each byte in the play script: i32[N] indices into :data:`SCRIPT_ROLES`.

  The corpus writes a speech as a paragraph whose first line is the speaker's name
  (``MACBETH``, ``First Witch``); paragraphs that are not speeches are stage
  directions, except ``ACT`` / ``SCENE`` headings. The newline ending a line belongs
  to that line. ``data`` should start at a paragraph boundary (a speech cut off at the
  start would be read as a direction).
  """
  text = _as_text(data)
  index = {name: i for i, name in enumerate(SCRIPT_ROLES)}
  labels = np.full(len(text), index["blank"], np.int32)
  for start, end, role, _ in _script_lines(text):
    labels[start:end] = index[role]
  return labels, SCRIPT_ROLES


def speaker_labels(data: str | bytes | np.ndarray, *, top: int = 8
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Speaker of each byte of speech: i32[N] indices into the returned names.

  The ``top`` speakers with the most bytes of speech get their own label; the other
  speakers share ``"others"``, and bytes that are not speech (names, directions,
  headings, blank lines) get -1.
  """
  text = _as_text(data)
  spans = [(s, e, who) for s, e, role, who in _script_lines(text) if role == "speech"]
  volume = collections.Counter()
  for s, e, who in spans:
    volume[who] += e - s
  names = tuple(who for who, _ in volume.most_common(top))
  index = {who: i for i, who in enumerate(names)}
  others = len(names)
  labels = np.full(len(text), -1, np.int32)
  for s, e, who in spans:
    labels[s:e] = index.get(who, others)
  if len(volume) > len(names):
    names = names + ("others",)
  return labels, names


def routing_table(labels: np.ndarray, experts: np.ndarray, num_labels: int,
                  num_experts: int, *, weights: np.ndarray | None = None
                  ) -> np.ndarray:
  """Counts of (label, expert) pairs: f64[num_labels, num_experts].

  Args:
    labels: int[...] category per token; negative labels are skipped.
    experts: int[...] expert per token, same shape (e.g. ``LayerRouting.top1``).
    num_labels, num_experts: the table's shape.
    weights: optional per-token weights (e.g. ``~dropped``).

  Divide each row by its sum for "where does category c go", each column by its sum
  for "what does expert e see".
  """
  labels = np.asarray(labels).ravel()
  experts = np.asarray(experts).ravel()
  if labels.shape != experts.shape:
    raise ValueError(f"labels and experts must have the same size, got {labels.size} "
                     f"and {experts.size}.")
  w = np.ones(labels.shape) if weights is None else np.asarray(weights, float).ravel()
  table = np.zeros((num_labels, num_experts))
  ok = labels >= 0
  np.add.at(table, (labels[ok], experts[ok]), w[ok])
  return table


def normalize_rows(table: np.ndarray) -> np.ndarray:
  """Each row divided by its sum (rows of zeros stay zero)."""
  table = np.asarray(table, float)
  sums = table.sum(axis=-1, keepdims=True)
  return np.divide(table, sums, out=np.zeros_like(table), where=sums > 0)


def mutual_information(table: np.ndarray, *, normalize: bool = False) -> float:
  """I(label; expert) in nats from a count table ``[num_labels, num_experts]``.

  With ``normalize`` it is divided by the entropy of the expert marginal H(expert):
  the share of the uncertainty about a token's expert that its label removes (0: the
  label says nothing, 1: it decides the expert).
  """
  p = np.asarray(table, float)
  total = p.sum()
  if total <= 0:
    return 0.0
  p = p / total
  pl = p.sum(axis=1, keepdims=True)
  pe = p.sum(axis=0, keepdims=True)
  nz = p > 0
  mi = float(np.sum(p[nz] * np.log(p[nz] / (pl @ pe)[nz])))
  if not normalize:
    return mi
  pe = pe[pe > 0]
  h = float(-np.sum(pe * np.log(pe)))
  return mi / h if h > 0 else 0.0


# ------------------------------------------------------------------------------------
# Training history
# ------------------------------------------------------------------------------------


def load_history(rows: Sequence[Mapping[str, Any]], key: str = "expert_load"
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Per-layer expert load over training from ``metrics.jsonl`` train lines.

  Args:
    rows: lines from :func:`moe_jax.metrics.read_metrics` (``split="train"``); lines
      without ``key`` are skipped.
    key: ``"expert_load"`` (first choices before capacity) or ``"expert_fill"``.

  Returns:
    ``steps`` i64[T] and ``{layer name: f64[T, E]}``, layers in the order of the file.
  """
  rows = [r for r in rows if isinstance(r.get(key), Mapping)]
  steps = np.array([r["step"] for r in rows], np.int64)
  layers: dict[str, list] = {}
  for r in rows:
    for name, load in r[key].items():
      layers.setdefault(name, []).append(load)
  return steps, {name: np.asarray(v, np.float64) for name, v in layers.items()}


# ------------------------------------------------------------------------------------
# Meshes: expert placement and memory
# ------------------------------------------------------------------------------------


def _value(x: Any) -> Any:
  return x.get_value() if isinstance(x, nnx.Variable) else x


def experts_by_device(layer: Any) -> dict[jax.Device, list[int]]:
  """The experts whose weights each device holds (all of them where replicated).

  Args:
    layer: a :class:`~moe_jax.moe_layer.MoeLayer`, its ``experts`` module, or a
      placed ``[E, ...]`` array.
  """
  if isinstance(layer, moe_layer.MoeLayer):
    layer = layer.experts
  arr = _value(getattr(layer, "wi", layer))
  num_experts = arr.shape[0]
  out = {}
  for device, index in arr.sharding.devices_indices_map(arr.shape).items():
    start, stop, _ = index[0].indices(num_experts)
    out[device] = list(range(start, stop))
  return out


def _params_with_parents(model: Any):
  nodes = dict(nnx.iter_graph(model))
  for path, node in nodes.items():
    if isinstance(node, nnx.Param) and hasattr(node.get_value(), "shape"):
      yield path, nodes.get(path[:-1]), node


def placed_bytes_per_device(model: Any) -> dict[jax.Device, int]:
  """Bytes of ``nnx.Param`` data that each device actually holds (read off the
  arrays' shards; a replicated parameter counts on every device)."""
  out: dict[jax.Device, int] = collections.Counter()
  for _, _, var in _params_with_parents(model):
    for shard in var.get_value().addressable_shards:
      out[shard.device] += shard.data.nbytes
  return dict(out)


def planned_bytes_per_device(model: Any, mesh: jax.sharding.Mesh) -> dict[str, int]:
  """Bytes of parameters per device if ``model`` were placed on ``mesh``.

  Uses the same logical-axis rules as :func:`moe_jax.sharding.shard_model`, but only
  shapes, so ``model`` may be abstract (``nnx.eval_shape``) and nothing is allocated.
  Every device holds the same amount under these rules.

  Returns:
    ``{"experts": ..., "other": ..., "total": ...}`` bytes per device; ``experts`` are
    the parameters of :class:`~moe_jax.experts.Experts` modules.
  """
  from moe_jax import experts as experts_lib  # pylint: disable=import-outside-toplevel
  from moe_jax import sharding  # pylint: disable=import-outside-toplevel

  out = {"experts": 0, "other": 0}
  for path, parent, var in _params_with_parents(model):
    value = var.get_value()
    names = sharding.logical_axes_of(parent, path[-1], var)
    if names is None:
      spec = jax.sharding.PartitionSpec()
    else:
      spec = sharding.logical_to_spec(names, value.shape, mesh, where=_path_str(path))
    shard = NamedSharding(mesh, spec).shard_shape(tuple(value.shape))
    nbytes = math.prod(shard) * np.dtype(value.dtype).itemsize
    out["experts" if isinstance(parent, experts_lib.Experts) else "other"] += nbytes
  out["total"] = out["experts"] + out["other"]
  return out


# ------------------------------------------------------------------------------------
# Collectives in compiled HLO, and a cost model
# ------------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
COLLECTIVE_OPS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                  "collective-permute")
_OP_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled (partitioned) HLO module, per device.

  Attributes:
    name: the instruction name, e.g. ``"all-to-all.1"``.
    op: one of :data:`COLLECTIVE_OPS`.
    shapes: result shapes as ``(dtype, dims)``, one per tuple element.
    group_size: n, devices in each replica group.
    source: the ``op_name`` metadata (the jax operation it came from), if any.
  """

  name: str
  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  group_size: int
  source: str

  @property
  def result_bytes(self) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in self.shapes)

  @property
  def bytes_sent(self) -> float:
    """Bytes each device sends, with the usual (ring / direct) algorithms.

    all-to-all and all-gather: ``(n-1)/n`` of the result; reduce-scatter: ``n-1``
    results; all-reduce: ``2(n-1)/n`` of the result; collective-permute: the result.
    """
    n = self.group_size
    b = self.result_bytes
    if self.op in ("all-to-all", "all-gather"):
      return b * (n - 1) / n
    if self.op == "reduce-scatter":
      return float(b * (n - 1))
    if self.op == "all-reduce":
      return 2.0 * b * (n - 1) / n
    return float(b)


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)  # iota form [a,b]<=[n]
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:  # mesh form: mesh['axis_0'=2,...] [device_ids=(...)] {'axis_1'}
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    named = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(int(sizes[a]) for a in named)
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)  # explicit {{0,1},{2,3}}
  if m:
    return len([t for t in m.group(1).split(",") if t])
  m = re.search(r"source_target_pairs=", line)
  if m:
    return 2
  return 1


def hlo_collectives(hlo_text: str) -> list[Collective]:
  """The collectives of compiled HLO text (``jitted.lower(...).compile().as_text()``).

  Async pairs (``all-to-all-start`` / ``-done``) count once. Shapes are per device,
  since the text is after SPMD partitioning.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _OP_RE.match(line)
    if not m:
      continue
    shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                   for dt, dims in _SHAPE_RE.findall(m.group("type")))
    src = re.search(r'op_name="([^"]*)"', line)
    out.append(Collective(name=m.group("name"), op=m.group("op"), shapes=shapes,
                          group_size=_group_size(line),
                          source=src.group(1) if src else ""))
  return out


def moe_comm_bytes(
    *,
    tokens_per_device: int,
    d_model: int,
    num_experts: int,
    expert_axis: int,
    group_size: int,
    capacity_factor: float,
    top_k: int = 1,
    min_capacity: int = 4,
    bytes_per_element: int = 4,
) -> dict[str, float]:
  """Bytes one device sends per MoE layer and forward pass, in a simple model.

  A device holds ``T = tokens_per_device`` tokens in ``G_d = T / S`` groups. With
  capacity dispatch (GShard / Switch) it builds ``[E, G_d, C, M]`` buffers and sends
  the slots of the experts on the other ``X - 1`` devices of its expert axis, padding
  included; the combine sends the same amount back::

      dispatch = combine = (X - 1) / X * E * G_d * C * M * bytes

  With ``C = ceil(cf * S / E)`` this is about ``(X-1)/X * cf * T * M`` elements: it
  grows with the capacity factor, not with K (a top-2 layer needs about twice the cf
  of a top-1 layer to drop as few tokens, hence twice the bytes). ``routed`` is the
  lower bound of sending only the K choices of each token, none dropped and experts
  evenly loaded: ``(X-1)/X * K * T * M * bytes`` each way. The backward pass moves the
  same again (the gradients of the two all-to-alls).

  Returns:
    ``capacity`` (C), ``dispatch``, ``combine``, ``total`` (= dispatch + combine) and
    ``routed_total`` (both directions of the lower bound), in bytes.
  """
  size = min(group_size, tokens_per_device)
  if tokens_per_device % size:
    raise ValueError(f"tokens_per_device={tokens_per_device} is not a multiple of "
                     f"group_size={size}.")
  groups = tokens_per_device // size
  cap = routing.expert_capacity(size, num_experts, capacity_factor, min_capacity)
  remote = (expert_axis - 1) / expert_axis
  one_way = remote * num_experts * groups * cap * d_model * bytes_per_element
  routed = remote * top_k * tokens_per_device * d_model * bytes_per_element
  return {"capacity": cap, "dispatch": one_way, "combine": one_way,
          "total": 2 * one_way, "routed_total": 2 * routed}
