"""Sampling from a trained model (:mod:`~moe_jax.inference.decode`)."""
