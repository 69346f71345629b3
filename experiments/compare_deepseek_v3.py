r"""DeepSeek-V3's MLA and multi-token prediction against deepseek_small, one command.

  python experiments/compare_deepseek_v3.py --preset=cpu_small --workdir=DIR
  python experiments/compare_deepseek_v3.py --preset=smoke --workdir=/tmp/dsv3_smoke
  python experiments/compare_deepseek_v3.py --rows=deepseek_small,deepseek_v3_small

Trains every row (deepseek_small; deepseek_small with one MTP module;
deepseek_v3_small without its MTP module; deepseek_v3_small) for each seed in
WORKDIR/runs/NAME, benchmarks their training throughput in interleaved rounds, then
writes WORKDIR/report.md (equal steps and equal time, MTP on/off, MLA against
attention, KV-cache values per token), results.csv and plots. Re-running the same
command skips finished runs and resumes unfinished ones. See
docs/results/deepseek_v3_cpu/ and moe_jax/compare/deepseek_v3.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

import cli  # pylint: disable=wrong-import-position

cli.define_grid_flags(flags, "compare_deepseek_v3", "Grid size: smoke (CI, seconds), "
                      "cpu_small (the configs' 600 steps, 2 seeds; about 4 h on a "
                      "2-core CPU).", shared=False)
# The shared grid flags that apply (the rows keep their configs' shapes).
_SHARED = ("steps", "seeds", "seq_len", "batch_size", "learning_rate", "warmup_steps",
           "eval_every", "eval_steps", "final_eval_steps", "log_every",
           "checkpoint_every", "dataset", "threshold")
for _kind, _name, _help in cli.GRID_FLAGS:
  if _name in _SHARED:
    getattr(flags, f"DEFINE_{_kind}")(_name, None, _help)
flags.DEFINE_list("rows", None, "Rows to run (default: all four); see "
                  "moe_jax/compare/deepseek_v3.py ROWS.")
flags.DEFINE_boolean("report_only", None, "Train nothing: rewrite the report from the "
                     "runs finished so far.")


if __name__ == "__main__":
  app.run(cli.grid_main("compare_deepseek_v3", "deepseek_v3",
                        _SHARED + ("rows", "report_only"),
                        configs_dir=cli.CONFIGS_DIR))
