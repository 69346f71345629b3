"""project(): a projection as one 2-D matmul equals the N-D einsum it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.projection import project


def test_hand_computed_rows():
  # x rows (1, 2) and (3, 4) times w = [[1, 0], [1, 1]]:
  # (1*1 + 2*1, 1*0 + 2*1) = (3, 2); (3*1 + 4*1, 3*0 + 4*1) = (7, 4).
  x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])  # [B=1, L=2, M=2]
  w = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # [M, H]
  np.testing.assert_array_equal(project(x, w), [[[3.0, 2.0], [7.0, 4.0]]])


@pytest.mark.parametrize("spec, x_shape, w_shape, contract", [
    ("BLM,MH->BLH", (2, 3, 4), (4, 5), 1),        # dense FFN, unembedding
    ("GSM,ME->GSE", (2, 3, 4), (4, 6), 1),        # router
    ("BLM,MND->BLND", (2, 3, 4), (4, 2, 5), 1),   # attention q/k/v
    ("BLND,NDM->BLM", (2, 3, 2, 5), (2, 5, 4), 2),  # attention output
    ("M,MH->H", (4,), (4, 5), 1),                 # a single token
])
def test_equals_the_einsum_in_value_and_gradient(spec, x_shape, w_shape, contract):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  ref = jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST)
  got = project(x, w, contract=contract, precision=jax.lax.Precision.HIGHEST)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  ct = jax.random.normal(kc, ref.shape)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), argnums=(0, 1))(x, w)
  for g, r in zip(grad(lambda x, w: project(x, w, contract=contract)),
                  grad(lambda x, w: jnp.einsum(spec, x, w))):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_passes_the_accumulation_type_and_handles_no_rows():
  x = jnp.ones((0, 3, 4), jnp.bfloat16)
  y = project(x, jnp.ones((4, 5), jnp.bfloat16), preferred_element_type=jnp.float32)
  assert y.shape == (0, 3, 5) and y.dtype == jnp.float32


def test_mismatched_axes_are_refused():
  with pytest.raises(ValueError, match="do not match"):
    project(jnp.ones((2, 3, 4)), jnp.ones((5, 6)))
  with pytest.raises(ValueError, match="do not match"):
    project(jnp.ones((2, 3, 2, 5)), jnp.ones((5, 2, 4)), contract=2)


def test_lowers_to_one_2d_dot():
  # The point of the function: the dot XLA gets has one contracting and one row axis.
  text = jax.jit(lambda x, w: project(x, w, contract=2)).lower(
      jnp.ones((2, 3, 2, 5)), jnp.ones((2, 5, 4))).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 1
  assert "tensor<6x10xf32>" in dots[0] and "tensor<10x4xf32>" in dots[0]
