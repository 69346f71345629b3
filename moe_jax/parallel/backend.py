"""Which kind of backend a computation runs on, for the ``"auto"`` choices.

Several layers pick an implementation per backend (``moe.dispatch``,
``moe.grouped_matmul``, the dropless exchange, ``mamba.scan``); they all ask here, so
"an accelerator" means the same thing everywhere.

The backend is the one the computation is compiled for, which is not always the one
this process runs on: :func:`compile_target` names it while a step is traced for
another platform (``experiments/plan.py`` compiles for TPU and GPU topologies from a
CPU host). Outside it, the target is ``jax.default_backend()``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

# jax.default_backend() names: "gpu" (or the platform, "cuda"/"rocm"), "tpu", "cpu".
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")
# Platform names folded to the kind the "auto" choices tell apart.
_KINDS = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "moe_jax_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
  """Resolves every ``"auto"`` inside the block for ``platform`` ("tpu", "gpu", "cpu").

  Args:
    platform: a jax platform name; "cuda" and "rocm" count as "gpu".

  Raises:
    ValueError: for a platform name this module does not know.
  """
  if platform not in _KINDS:
    raise ValueError(f"compile target {platform!r} is unknown; use one of "
                     f"{sorted(_KINDS)}.")
  token = _TARGET.set(_KINDS[platform])
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_backend() -> str:
  """The kind of backend being compiled for: "tpu", "gpu" or "cpu"."""
  target = _TARGET.get()
  if target is not None:
    return target
  return _KINDS.get(jax.default_backend(), jax.default_backend())


def resolve_backend(backend: str | None = None) -> str:
  """``backend`` folded to "tpu", "gpu" or "cpu"; the compile target when None."""
  if backend is None:
    return target_backend()
  return _KINDS.get(backend, backend)


def is_accelerator(backend: str | None = None) -> bool:
  """Whether ``backend`` (default: the compile target) is a GPU or a TPU."""
  return resolve_backend(backend) in ("gpu", "tpu")
