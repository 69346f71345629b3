"""Projections as one 2-D matmul on the token rows.

Every projection of the model (dense FFN, experts, attention q/k/v/o, router,
unembedding) multiplies activations ``[..., K]`` by a weight ``[K, N]``. Written as an
einsum on the N-D activations (``"BLM,MH->BLH"``) or as a reshape to ``[B*L, M]``, a
2-D matmul and a reshape back, it is the same sum of the same products (the order of
the additions may differ, so results agree to float rounding): XLA lowers both to one
``dot_general``.

They cost differently on XLA:CPU, in the backward pass. The weight gradient of the
N-D form contracts over two token axes (``"BLM,BLH->MH"``), and XLA:CPU materialises
a transposed copy of the activations (``[M, B, L]``, ``[H, B, L]``) to turn that into
one matmul; the 2-D form contracts over its single row axis and the matmul reads the
activations in place. ``benchmarks/matmul_forms.py`` measures each projection both ways
(``docs/benchmarks.md``); the model uses the 2-D form where it measured faster on CPU:
the dense FFN (and shared experts), the router and the unembedding here, the experts
in :class:`~moe_jax.layers.experts.Experts` as ``[E, G*C, M]`` rows. Attention's q/k/v
and output projections measured the same both ways and stay einsums.

It should not cost more on GPU or TPU (not measured: no such device was at hand). The
dot emitters want one batch, one contracting and one free axis per operand; XLA's
DotDecomposer pass rewrites other dots into that form with transposes and exactly these
reshapes, so the 2-D form is already what the N-D form becomes, and writing it by hand
only leaves the layout passes less to transpose (for TPU, whose compiler is not public,
this is reasoning, not a reading of its passes). The reshapes merge contiguous axes and
are bitcasts (on TPU's tiled layouts as long as the merged minor axis, L here, is a
multiple of the tile, as sequence lengths are). The sharding is unchanged: of the
merged token axes only the major one is split (B, or the groups G, over the batch
axes), which the partitioner carries through a reshape without moving data; the
weights are not reshaped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, *, contract: int = 1,
            **dot_kwargs) -> jax.Array:
  """``x [..., K1..Kc] @ w [K1..Kc, N...] -> [..., N...]`` as one 2-D matmul.

  Args:
    x: activations; their last ``contract`` axes are contracted.
    w: weight whose first ``contract`` axes match them.
    contract: number of contracted axes (2 for attention's ``[N, D, M]`` output).
    **dot_kwargs: ``precision`` / ``preferred_element_type``, passed to the matmul.

  Returns:
    ``[..., N...]``, e.g. ``[B, L, N, D]`` for ``x [B, L, M]`` and ``w [M, N, D]``.
  """
  k_shape = w.shape[:contract]
  if x.shape[x.ndim - contract:] != k_shape:
    raise ValueError(f"project: x's last {contract} axes {x.shape} do not match the "
                     f"weight's first ones {w.shape}.")
  lead, n_shape = x.shape[:x.ndim - contract], w.shape[contract:]
  k, n = math.prod(k_shape), math.prod(n_shape)
  y = jnp.matmul(x.reshape(math.prod(lead), k), w.reshape(k, n), **dot_kwargs)
  return y.reshape(*lead, *n_shape)
