"""Ahead-of-time plans for TPU and GPU targets, compiled on any host (``experiments/plan.py``):
:mod:`~moe_jax.planner.targets` (chips and topologies), :mod:`~moe_jax.planner.compile`
(the compiled step and its report), :mod:`~moe_jax.planner.hlo` (FLOPs, traffic and
collectives read from the optimized HLO), :mod:`~moe_jax.planner.table`."""
