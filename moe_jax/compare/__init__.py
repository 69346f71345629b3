"""Comparison grids: train a grid of models, then report them against a paper's claims.

The grid runner, shared by every comparison:

* :mod:`~moe_jax.compare.grid` -- :class:`~moe_jax.compare.grid.Grid` (what a
  comparison defines), its settings and :func:`~moe_jax.compare.grid.run_comparison`
  (train, benchmark, summarise, write ``report.md``, ``results.csv`` and plots);
* :mod:`~moe_jax.compare.runner` -- :class:`~moe_jax.compare.runner.RunSpec` (name,
  seed, config), the resumable training of a run list, the interleaved throughput
  benchmark, the work directory's bookkeeping;
* :mod:`~moe_jax.compare.aggregation` -- per-run summaries, time to a quality threshold,
  :class:`~moe_jax.compare.aggregation.Stat` and per-model aggregates;
* :mod:`~moe_jax.compare.report` -- ``results.csv``, the convention sentences, table
  cells, the threshold and the paragraph on which claims held;
* :mod:`~moe_jax.compare.plots` -- eval loss and throughput plots.

The comparisons, each with its own runs' fields, configs and report:

* :mod:`~moe_jax.compare.switch_vs_top2` -- the Switch Transformer Table 1 grid
  (``experiments/switch_vs_top2.py``);
* :mod:`~moe_jax.compare.routers` (rows in :mod:`~moe_jax.compare.router_rows`, report in
  :mod:`~moe_jax.compare.routers_report`) -- every router on one budget
  (``experiments/compare_routers.py``);
* :mod:`~moe_jax.compare.switch_vs_dense` -- Switch vs dense, one ablation per row
  (``experiments/switch_vs_dense.py``);
* :mod:`~moe_jax.compare.finetune_grid` (rows in :mod:`~moe_jax.compare.finetune_rows`,
  report in :mod:`~moe_jax.compare.finetune_report`) -- the fine-tuning methods on a
  domain shift (``experiments/compare_finetune.py``);
* :mod:`~moe_jax.compare.deepseek_v3` -- multi-head latent attention and multi-token
  prediction on deepseek_small's MoE (``experiments/compare_deepseek_v3.py``);
* :mod:`~moe_jax.compare.tokenizer_grid` -- a BPE against bytes in bits per byte
  (``experiments/compare_tokenizers.py``).
"""
