r"""Prints text sampled from the latest checkpoint of a run, decoded with a KV cache.

  python experiments/sample.py --workdir=/tmp/switch_small --prompt="ROMEO:" \
      --length=500 [--temperature=0.8 --top_k=40 --top_p=1.0 --seed=0 --max_len=0]
  python experiments/sample.py --workdir=/tmp/switch_small --prompts_file=prompts.txt
  python experiments/sample.py --workdir=/tmp/switch_small_lora --prompt="def " [--nomerge]

A fine-tuning run's workdir (experiments/finetune.py) loads its base model with the
fine-tuned parameters; LoRA adapters are merged unless ``--nomerge``. Prompts are
encoded and samples decoded with the run's ``data.tokenizer``.

Each sample is printed as the prompt followed by its continuation. With
``--prompts_file`` (one prompt per line, ``\n`` inside a line is a newline, an empty
line starts a new play) the prompts are decoded as one batch and their samples are
printed in file order, separated by a line of dashes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import run_main  # pylint: disable=wrong-import-position

SEPARATOR = "-" * 40


def _flags(flags):
  flags.DEFINE_string("prompt", "ROMEO:\n", "Text to continue ('' starts a new play).")
  flags.DEFINE_string("prompts_file", None,
                      "File with one prompt per line, decoded as one batch "
                      "(replaces --prompt).")
  flags.DEFINE_integer("length", 500, "Tokens to generate (bytes with the byte tokenizer).")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 is off.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with "
                     "this much probability; 1 is off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("merge", True, "A fine-tuning run (experiments/finetune.py): fold "
                    "its LoRA adapters into the weights before decoding; --nomerge "
                    "decodes through the adapters (same numbers to float rounding).")
  flags.DEFINE_integer("max_len", 0, "KV-cache length in tokens (prompt + continuation); "
                       "longer samples slide a window. 0: the run's data.seq_len.")


def _read_prompts(path: str) -> list[str]:
  from moe_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError([f"--prompts_file={path!r} cannot be read "
                       f"({type(e).__name__}); pass a UTF-8 text file."]) from None
  if not lines:
    raise ConfigError([f"--prompts_file={path!r} is empty; write one prompt per line."])
  return [line.replace("\\n", "\n") for line in lines]


def main(_, workdir):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from moe_jax.inference import decode  # pylint: disable=import-outside-toplevel
  from moe_jax.training import run_state  # pylint: disable=import-outside-toplevel
  from moe_jax.data.tokenizer import check_vocab_fits  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  from moe_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  for name, ok, fix in (("length", f.length >= 1, "must be >= 1"),
                        ("temperature", f.temperature >= 0, "must be >= 0"),
                        ("top_k", f.top_k >= 0, "must be >= 0"),
                        ("top_p", 0 < f.top_p <= 1, "must be in (0, 1] (1 is off)"),
                        ("max_len", f.max_len == 0 or f.max_len >= 2,
                         "must be >= 2, or 0 for the run's data.seq_len")):
    if not ok:
      raise ConfigError([f"--{name}={getattr(f, name)!r} {fix}."])
  if f.prompts_file is not None and f["prompt"].present:
    raise ConfigError(["--prompt and --prompts_file are exclusive; pass one."])
  texts = _read_prompts(f.prompts_file) if f.prompts_file is not None else [f.prompt]
  from moe_jax.training import objectives  # pylint: disable=import-outside-toplevel
  run_config = run_state.load_config(workdir)
  objective = objectives.get_objective(run_config)
  if not objective.causal:
    raise ConfigError([f"--workdir={workdir!r} holds a model.objective={objective.name!r} "
                       "checkpoint: it attends bidirectionally to fill in masked bytes "
                       "and cannot generate text left to right; sample a causal_lm run."])
  # The run's data.tokenizer (a relative path is read from the run's work directory).
  tokenizer = build.tokenizer_of(run_config, workdir=workdir)
  from moe_jax.peft import finetune  # pylint: disable=import-outside-toplevel
  if finetune.is_finetune_run(workdir):
    model, config, step = finetune.load_model(workdir, merge=f.merge)
  else:
    model, config, step = run_state.load_model(workdir)
  check_vocab_fits(tokenizer, model.cfg.vocab_size, f"--workdir={workdir!r}")
  max_len = f.max_len or max(config.data.seq_len, 2)
  # Documents start after an EOS; a prompt longer than the cache keeps its end.
  prompts = [(tokenizer.encode(t) if t else [tokenizer.eos_id])[-max_len:] for t in texts]
  try:
    decoder = decode.Decoder(model, batch_size=len(prompts), max_len=max_len)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError([f"--max_len={max_len}: {e}"]) from None
  print(f"[{os.path.abspath(workdir)}, step {step}]", file=sys.stderr, flush=True)
  samples = decoder.generate(prompts, f.length, temperature=f.temperature,
                             top_k=f.top_k, top_p=f.top_p, seed=f.seed)
  print(f"\n{SEPARATOR}\n".join(t + tokenizer.decode(ids)
                                 for t, ids in zip(texts, samples)))


if __name__ == "__main__":
  run_main(main, needs_config=False, extra_flags=_flags)
