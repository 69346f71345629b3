"""The Mixture-of-Experts layer and its parts: config, router families, experts,
dispatch, grouped matmul, dropless exchange, projections and LoRA adapters. Built on
:mod:`moe_jax.routing` (the pure routing math) and :mod:`moe_jax.parallel`."""
