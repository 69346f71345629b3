"""The model's projections as written before ``moe_jax.layers.projection``: N-D einsums.

``with einsum_forms(): ...`` makes every model built and traced inside it compute
its dense FFN, experts, router and unembedding as einsums on the N-D activations
(``"BLM,MH->BLH"``, ``"EGCM,EMH->EGCH"``), as moe_jax did before it switched to 2-D
matmuls on token rows. Same parameters, same numbers up to float
rounding; only the form XLA is handed differs. ``train_throughput.py --forms`` uses it
to time the former and the current forms in one process.
"""

from __future__ import annotations

import contextlib
import string

import jax.numpy as jnp

from moe_jax.layers import experts, moe_layer
from moe_jax.models import transformer


def project_einsum(x, w, *, contract: int = 1, **dot_kwargs):
  """:func:`moe_jax.layers.projection.project` as one einsum on the N-D ``x``."""
  lead = x.ndim - contract
  letters = string.ascii_letters
  x_axes = letters[:x.ndim]
  out_axes = letters[x.ndim:x.ndim + w.ndim - contract]
  spec = f"{x_axes},{x_axes[lead:]}{out_axes}->{x_axes[:lead]}{out_axes}"
  return jnp.einsum(spec, x, w, **dot_kwargs)


def _experts_einsum(self, x, *, deterministic=None):
  """The former ``Experts.__call__``: einsums on the ``[E, G, C, M]`` buffers."""
  x = x.astype(self.dtype)
  h = jnp.einsum("EGCM,EMH->EGCH", x, self.wi[...].astype(self.dtype))
  gate = None
  if self.wi_gate is not None:
    gate = jnp.einsum("EGCM,EMH->EGCH", x, self.wi_gate[...].astype(self.dtype))
  h = experts.activate(self.activation, h, gate)
  h = self.dropout(h, deterministic=deterministic)
  return jnp.einsum("EGCH,EHM->EGCM", h, self.wo[...].astype(self.dtype))


@contextlib.contextmanager
def einsum_forms():
  """Swaps the model's projections for their einsum forms while inside."""
  modules = (experts, moe_layer, transformer)
  saved = [m.project for m in modules], experts.Experts.__call__
  try:
    for m in modules:
      m.project = project_einsum
    experts.Experts.__call__ = _experts_einsum
    yield
  finally:
    for m, f in zip(modules, saved[0]):
      m.project = f
    experts.Experts.__call__ = saved[1]
