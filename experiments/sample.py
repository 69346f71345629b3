r"""Prints text sampled from the latest checkpoint of a run.

  python experiments/sample.py --workdir=/tmp/switch_small --prompt="ROMEO:" \
      --length=500 [--temperature=0.8 --top_k=40 --seed=0]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import run_main  # pylint: disable=wrong-import-position


def _flags(flags):
  flags.DEFINE_string("prompt", "ROMEO:\n", "Text to continue ('' starts a new play).")
  flags.DEFINE_integer("length", 500, "Bytes to generate.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Sample among the k most likely bytes; 0 is off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(_, workdir):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from moe_jax import train  # pylint: disable=import-outside-toplevel
  from moe_jax.data import ByteTokenizer  # pylint: disable=import-outside-toplevel
  from moe_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  for name, ok, fix in (("length", f.length >= 1, "must be >= 1"),
                        ("temperature", f.temperature >= 0, "must be >= 0"),
                        ("top_k", f.top_k >= 0, "must be >= 0")):
    if not ok:
      raise ConfigError([f"--{name}={getattr(f, name)!r} {fix}."])
  tokenizer = ByteTokenizer()
  model, config, step = train.load_model(workdir, vocab_size=tokenizer.vocab_size)
  prompt = (tokenizer.encode(f.prompt) if f.prompt
            else [tokenizer.eos_id])  # documents start after an EOS
  print(f"[{os.path.abspath(workdir)}, step {step}]", file=sys.stderr, flush=True)
  ids = train.generate(model, prompt, f.length, temperature=f.temperature,
                       top_k=f.top_k, seed=f.seed, window=config.data.seq_len)
  print(f.prompt + tokenizer.decode(ids))


if __name__ == "__main__":
  run_main(main, needs_config=False, extra_flags=_flags)
