"""Comparison grids: train a grid of models, then report them against a paper's claims.

* :mod:`~moe_jax.compare.runner` -- :class:`RunSpec`, the resumable grid runner, the
  interleaved throughput benchmark, the work directory's bookkeeping;
* :mod:`~moe_jax.compare.aggregation` -- per-run summaries, time to a quality threshold,
  :class:`Stat` and per-model aggregates;
* :mod:`~moe_jax.compare.report` -- ``results.csv``, the convention sentences, table
  cells and the paragraph on which claims held;
* :mod:`~moe_jax.compare.plots` -- eval loss and throughput plots;
* :mod:`~moe_jax.compare.switch_vs_top2` -- the Switch Transformer Table 1 grid (its
  presets, configs, paper numbers, orderings and report layout), on top of the above;
* :mod:`~moe_jax.compare.finetune` / :mod:`~moe_jax.compare.finetune_report` -- the
  fine-tuning methods on a domain shift (``experiments/compare_finetune.py``).

The names below are re-exported so ``from moe_jax import compare`` and ``compare.X``
keep working; ``experiments/switch_vs_top2.py`` is the command line.
"""

from moe_jax.compare.aggregation import (Stat, add_threshold, aggregate,
                                         default_threshold, steps_to_threshold,
                                         summarize_run)
from moe_jax.compare.report import (CSV_COLUMNS, eval_sentence, init_and_loss_sentence,
                                    write_csv)
from moe_jax.compare.runner import (BENCH_FILE, DONE_FILE, RunSpec, is_done,
                                    measure_throughput, run_dir, run_grid)
from moe_jax.compare.switch_vs_top2 import (FAMILIES, LABEL, OPTIONAL_SETTINGS,
                                            PAPER_CITE, PAPER_NAME, PAPER_STEPS,
                                            PAPER_TABLE1, PAPER_THRESHOLD, PRESETS,
                                            build_grid, compare_pair, make_config,
                                            orderings, orderings_paragraph, paper_row,
                                            report_markdown, resolve_settings,
                                            run_comparison, write_outputs, write_plots)

__all__ = [
    "BENCH_FILE", "CSV_COLUMNS", "DONE_FILE", "FAMILIES", "LABEL", "OPTIONAL_SETTINGS",
    "PAPER_CITE", "PAPER_NAME", "PAPER_STEPS", "PAPER_TABLE1", "PAPER_THRESHOLD",
    "PRESETS", "RunSpec", "Stat", "add_threshold", "aggregate", "build_grid",
    "compare_pair", "default_threshold", "eval_sentence", "init_and_loss_sentence",
    "is_done", "make_config", "measure_throughput", "orderings", "orderings_paragraph",
    "paper_row", "report_markdown", "resolve_settings", "run_comparison", "run_dir",
    "run_grid", "steps_to_threshold", "summarize_run", "write_csv", "write_outputs",
    "write_plots",
]
