"""Devices and meshes: which backend runs (:mod:`~moe_jax.parallel.backend`), the mesh,
its logical-axis rules, the MoE layer's activation layouts, batch and optimizer-state
placement (:mod:`~moe_jax.parallel.sharding`). Imports nothing of the model."""
