"""Test setup, before jax is imported anywhere: 8 fake CPU devices, and one persistent
compilation cache per test process."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
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
