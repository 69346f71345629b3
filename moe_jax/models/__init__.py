"""Language models built from :mod:`moe_jax.layers`: attention and Mamba blocks, the
transformer, Mixture-of-Depths, the layer pattern, sizes and parameter sharding."""
