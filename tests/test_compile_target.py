"""The "auto" choices resolve for the platform being compiled for, not the host's."""

import pytest

from moe_jax.layers import dropless
from moe_jax.layers.dispatch import resolve_dispatch
from moe_jax.models import mamba
from moe_jax.parallel import backend


def test_outside_a_target_the_host_backend_decides():
  assert backend.target_backend() == "cpu"  # conftest forces CPU
  assert resolve_dispatch("auto") == "indices"
  assert dropless.resolve_exchange("auto") == "padded"


@pytest.mark.parametrize("platform,kind", [("tpu", "tpu"), ("cuda", "gpu"), ("gpu", "gpu")])
def test_compile_target_resolves_every_auto_for_the_target(platform, kind):
  with backend.compile_target(platform):
    assert backend.target_backend() == kind
    assert resolve_dispatch("auto") == ("einsum" if kind == "tpu" else "indices")
    assert dropless.resolve_exchange("auto") == "ragged"
    assert mamba.resolve_scan("auto") == "associative"
  assert backend.target_backend() == "cpu"  # restored on exit
  assert mamba.resolve_scan("auto") == "sequential"


def test_an_unknown_target_is_refused():
  with pytest.raises(ValueError, match="unknown"):
    with backend.compile_target("ipu"):
      pass
