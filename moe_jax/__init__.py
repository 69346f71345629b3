"""moe_jax: Switch (top-1) and GShard (top-2) Mixture-of-Experts in JAX/Flax nnx."""

from moe_jax import routing
from moe_jax.experts import DenseFfn, Experts
from moe_jax.moe_layer import MoeAux, MoeConfig, MoeLayer, Router

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
