"""Test setup, before jax is imported anywhere: 8 fake CPU devices, XLA:CPU's backend
optimisation off, and one persistent compilation cache per test process."""

import atexit
import os
import shutil
import tempfile

from tests.subprocess_env import FAST_COMPILE

# The tests' programs are small, so compiling them costs more than running them: with
# LLVM's optimisation passes off (--xla_backend_optimization_level=0) a tiny training
# run on an 8-device mesh compiled and ran in 18-21 s instead of 28-31 s. It changes
# how fast the generated code is, not what it computes (XLA's own HLO passes still
# run). The subprocesses that tests start get it too (tests/subprocess_env.py), and
# so do the notebook kernels except the runtime-bound ones (tests/test_notebooks.py).
# A level already in XLA_FLAGS is kept.
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
  _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests, and the command-line subprocesses they start (which inherit the
# environment), build the same small models and so compile the same programs; with a
# cache each is compiled once per test process. The cache is new and empty in every
# session and process (pytest-xdist workers get one each), so no outcome can depend on
# an earlier session or on the order of another worker's tests; it changes compile
# time only.
_CACHE = tempfile.mkdtemp(prefix="moe_jax_test_jit_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
