"""Checkpoints of other codebases in and out of moe_jax (:mod:`moe_jax.interop.hf`:
Hugging Face)."""
