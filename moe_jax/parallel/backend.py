"""Which kind of backend a computation runs on, for the ``"auto"`` choices.

Several layers pick an implementation per backend (``moe.grouped_matmul``, the
dropless exchange, ``mamba.scan``); they all ask here, so "an accelerator" means the
same thing everywhere.
"""

from __future__ import annotations

import jax

# jax.default_backend() names: "gpu" (or the platform, "cuda"/"rocm"), "tpu", "cpu".
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def is_accelerator(backend: str | None = None) -> bool:
  """Whether ``backend`` (default: jax's default backend) is a GPU or a TPU."""
  return (backend or jax.default_backend()) in ACCELERATORS
