r"""A BPE against bytes on one model, in bits per byte, at equal steps and equal time.

  python experiments/compare_tokenizers.py --preset=cpu_small --workdir=DIR
  python experiments/compare_tokenizers.py --preset=smoke --workdir=/tmp/tok_smoke

Trains a byte-level BPE of --bpe_vocab_size tokens on the source's training split into
WORKDIR/bpe_<V>/tokenizer.json (unless it is there), then trains the config (default
switch_small) with the byte tokenizer and with the BPE for each seed in
WORKDIR/runs/NAME, benchmarks both in interleaved rounds and writes WORKDIR/report.md,
results.csv and bits_per_byte.png. Re-running the same command skips finished runs and
resumes unfinished ones. See moe_jax/compare/tokenizer_grid.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

import cli  # pylint: disable=wrong-import-position

cli.define_grid_flags(flags, "compare_tokenizers", "Grid size: smoke (CI, seconds), "
                      "cpu_small (600 steps, 2 seeds, BPE 4096; about 1.5 h on a "
                      "2-core CPU).", shared=False)
_SHARED = ("steps", "seeds", "eval_every", "eval_steps", "final_eval_steps", "dataset")
for _kind, _name, _help in cli.GRID_FLAGS:
  if _name in _SHARED:
    getattr(flags, f"DEFINE_{_kind}")(_name, None, _help)
flags.DEFINE_integer("bpe_vocab_size", None, "The BPE's vocabulary (default: the "
                     "preset's).")
flags.DEFINE_string("config", None, "Config file both rows train (default switch_small).")
flags.DEFINE_boolean("report_only", None, "Train nothing: rewrite the report from the "
                     "runs finished so far.")


def main(argv):
  from moe_jax.compare import tokenizer_grid  # pylint: disable=import-outside-toplevel
  from moe_jax.compare.router_rows import load_row_config  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS
  preset = tokenizer_grid.PRESETS.get(fv.preset)
  if preset is None:
    sys.exit(f"--preset={fv.preset!r} is unknown; use one of "
             f"{', '.join(tokenizer_grid.PRESETS)}.")
  vocab = fv.bpe_vocab_size or preset["bpe_vocab_size"]
  workdir = fv.workdir or f"/tmp/compare_tokenizers_{fv.preset}"
  bpe = os.path.join(f"bpe_{vocab}", "tokenizer.json")
  if vocab > 258 and not os.path.exists(os.path.join(workdir, bpe)):
    import train_tokenizer  # pylint: disable=import-outside-toplevel
    from moe_jax.data.sources import load_text_source  # pylint: disable=import-outside-toplevel
    config_name = fv.config or preset["config"]
    if not os.path.isfile(os.path.join(cli.CONFIGS_DIR, f"{config_name}.py")):
      sys.exit(f"--config={config_name!r}: no such file in experiments/configs.")
    name = fv.dataset or load_row_config(config_name, cli.CONFIGS_DIR).data.name
    try:
      source = load_text_source(name)
    except ValueError as e:
      sys.exit(str(e))
    path = train_tokenizer.train_bpe(source.train, vocab,
                                     os.path.join(workdir, f"bpe_{vocab}"))
    print(f"Trained a {vocab}-token BPE on {name}'s training split: {path}")
  cli.grid_main("compare_tokenizers", "tokenizer_grid",
                _SHARED + ("bpe_vocab_size", "config", "report_only"),
                configs_dir=cli.CONFIGS_DIR, bpe_tokenizer=bpe)(argv)


if __name__ == "__main__":
  app.run(main)
