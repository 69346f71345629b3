"""Training: the experiment config, building a model and optimizer from it, the run's
state and checkpoints, the losses and objectives, evaluation, metrics and the loop
(:mod:`~moe_jax.training.train`)."""
