"""moe_jax: Switch (top-1) and GShard (top-2) Mixture-of-Experts in JAX/Flax nnx."""

from moe_jax import routing
from moe_jax.layers.experts import DenseFfn, Experts
from moe_jax.layers.moe_layer import MoeAux, MoeLayer, Router
from moe_jax.layers.moe_config import MoeConfig

__all__ = [
    "DenseFfn",
    "Experts",
    "MoeAux",
    "MoeConfig",
    "MoeLayer",
    "Router",
    "routing",
]
__version__ = "0.1.0"
