"""The LM config's module sections: how its ``model``, ``moe``, ``mamba`` (and ``mla``) sections
mirror :class:`~moe_jax.models.model_config.TransformerConfig`,
:class:`~moe_jax.layers.moe_config.MoeConfig` and
:class:`~moe_jax.models.mamba.MambaConfig` (:data:`SECTIONS`), which own those keys and
their defaults. :func:`section` builds a section from its dataclass's fields,
:func:`derive` builds the module config back from a section without naming the fields
again, and :class:`SectionView` shows a section as its module config to that module's
own checks. So a field added to a module config is an LM key with no other edit.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models.model_config import TransformerConfig
from moe_jax.models.mamba import MambaConfig
from moe_jax.models.mla_config import MlaConfig


@dataclasses.dataclass(frozen=True)
class Section:
  """How an LM config section mirrors a module config.

  Attributes:
    cls: the module config dataclass; each of its fields is a key of the section with
      the field's default, except ``resolved``.
    resolved: fields a run resolves from other keys (``moe.d_model`` is
      ``model.d_model``), not keys of the section.
    values: the LM's values of fields without a default (``model.d_model``), and the
      LM-only values that a run resolves (``moe.d_ff=0``: ``model.d_ff``;
      ``moe.queue_order="auto"``). No other default lives here.
  """

  cls: type
  resolved: tuple[str, ...] = ()
  values: dict = dataclasses.field(default_factory=dict)


SECTIONS = {
    "model": Section(TransformerConfig, ("vocab_size", "max_len", "moe", "mamba", "causal",
                                        "mla"),
                     {"num_layers": 4, "d_model": 256, "num_heads": 4, "d_ff": 1024}),
    "moe": Section(MoeConfig, ("d_model", "dtype", "model_init_scale"),
                   {"num_experts": 8, "d_ff": 0, "activation": "", "queue_order": "auto"}),
    "mamba": Section(MambaConfig, ("d_model", "init_scale")),
    "mla": Section(MlaConfig),  # model.mixer="mla"
}

def section(name: str) -> ml_collections.ConfigDict:
  """The ``name`` section of :data:`SECTIONS` as a ConfigDict: every field of its
  module config (but the resolved ones) with its default, or the section's value;
  a None default becomes a typed placeholder (``--config.moe.top_groups=4`` works)."""
  spec = SECTIONS[name]
  hints = typing.get_type_hints(spec.cls)
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(spec.cls):
    if f.name in spec.resolved:
      continue
    if f.name in spec.values:
      value = spec.values[f.name]
    elif f.default is not dataclasses.MISSING:
      value = f.default
    else:
      raise TypeError(f"{spec.cls.__name__}.{f.name} has no default; give the LM's value "
                      f"in SECTIONS[{name!r}].values.")
    if value is None:
      kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
      value = config_dict.placeholder(kinds[0] if len(kinds) == 1 else object)
    c[f.name] = value
  return c


def derive(cls, values, **resolved):
  """An instance of the dataclass ``cls`` from an LM config section ``values``: each
  field takes the section's key of its name, ``resolved`` gives the fields a run
  resolves (and overrides LM-only values like ``"auto"``), and fields in neither (a
  config saved before the field existed) take the dataclass default."""
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = set(resolved) - set(names)
  if unknown:
    raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}.")
  kwargs = {n: values[n] for n in names if n not in resolved and n in values}
  return cls(**kwargs, **resolved)


class SectionView:
  """A config section seen as the module config ``cls``, for that module's checks:
  ``values`` first (what a run resolves from other keys), then the section's keys,
  then the dataclass defaults (keys a config saved before they existed lacks)."""

  def __init__(self, cls, values, **resolved):
    self._section, self._resolved = values, resolved
    self._defaults = {f.name: f.default for f in dataclasses.fields(cls)
                      if f.default is not dataclasses.MISSING}

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    for source in (self._resolved, self._section, self._defaults):
      if name in source:
        return source[name]
    raise AttributeError(name)
