"""The environment of the subprocesses that tests start: the CPU backend, compiled the
way conftest.py compiles the in-process tests."""

from __future__ import annotations

import os
import re

# XLA:CPU without LLVM's optimisation passes: the tests' programs are small, so
# compiling them costs more than running them. It changes how fast the generated code
# is, not what it computes (XLA's own HLO passes still run); conftest.py explains the
# measurement. Tests check what a program computes or writes, never its timings.
FAST_COMPILE = "--xla_backend_optimization_level=0"
_LEVEL = "--xla_backend_optimization_level"


def compile_flag() -> str:
  """The optimisation-level flag of this process's ``XLA_FLAGS`` (conftest.py sets
  :data:`FAST_COMPILE` unless a level was already given, which it keeps); FAST_COMPILE
  when there is none."""
  levels = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(_LEVEL)]
  return levels[-1] if levels else FAST_COMPILE


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """``os.environ`` for a subprocess on the CPU backend.

  ``XLA_FLAGS`` is replaced (not extended): :func:`compile_flag`, plus ``devices`` fake
  CPU devices when given (None: one device, as a user runs a script). ``extra`` is
  added last.
  """
  flags = [compile_flag()]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  env.update(extra)
  return env


# What the accelerator plugins' C++ runtimes print on every start of a CPU-only host
# (the CUDA plugin's "Could not find cuda drivers"), not the program's own output.
_RUNTIME_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWEF]\d{4} [0-9:.]+ +\d+ \S+:\d+\])")


def program_lines(stderr: str) -> list[str]:
  """The lines of a subprocess's stderr that the program wrote: without the runtime
  log lines the installed accelerator plugins print when they load."""
  return [l for l in stderr.strip().splitlines() if l and not _RUNTIME_LOG.match(l)]
