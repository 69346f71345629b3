"""Comparison grids; :mod:`~moe_jax.compare.switch_vs_top2` is the Switch Transformer
Table 1 grid (its runner, report and plots).

The names below are re-exported so ``from moe_jax import compare`` and ``compare.X``
keep working; ``experiments/switch_vs_top2.py`` is the command line.
"""

from moe_jax.compare.switch_vs_top2 import (  # pylint: disable=unused-import
    BENCH_FILE,
    CSV_COLUMNS,
    DONE_FILE,
    FAMILIES,
    LABEL,
    OPTIONAL_SETTINGS,
    PAPER_CITE,
    PAPER_NAME,
    PAPER_STEPS,
    PAPER_TABLE1,
    PAPER_THRESHOLD,
    PRESETS,
    RunSpec,
    Stat,
    add_threshold,
    aggregate,
    build_grid,
    compare_pair,
    default_threshold,
    eval_sentence,
    init_and_loss_sentence,
    is_done,
    make_config,
    measure_throughput,
    orderings,
    orderings_paragraph,
    paper_row,
    report_markdown,
    resolve_settings,
    run_comparison,
    run_dir,
    run_grid,
    steps_to_threshold,
    summarize_run,
    write_csv,
    write_outputs,
    write_plots)

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
