"""Turns the JSON of ``benchmarks/moe_layer.py --json`` into a Markdown table.

Every row is printed, the losing ones too; rows that miss the goal of the issue
(top-1 at cf 1.0 <= 1.25x, top-2 at cf 1.0 <= 2.4x) are marked. ``dropless`` rows
have no capacity factor ("-") and are not marked. ``ratio`` and the goal are against
the fastest dense FFN (2-D matmuls, ``dense ms``); ``ratio vs einsum dense`` is against
the einsum form earlier runs used (``dense einsum ms``). A JSON from before that change
has no einsum column ("n/a"), and its ``dense ms`` is the einsum form.

  python benchmarks/to_markdown.py layer.json > table.md
"""

import json
import sys

GOALS = {1: 1.25, 2: 2.4}  # top_k -> max ratio at capacity factor 1.0


def main(path: str) -> None:
  with open(path) as f:
    data = json.load(f)
  meta = data["meta"]
  print(f"backend `{meta['backend']}` ({meta['device']}), jax {meta['jax']}, "
        f"M={meta['d_model']}, H={meta['d_ff']}, {meta['tokens']} tokens, "
        f"{meta['dtype']}, median of {meta['repeats']} alternating repeats.")
  if "dense" in meta:
    print(f"dense: {meta['dense']}; dense einsum: {meta['dense_einsum']}.\n")
  else:
    print("An older run: its dense baseline is the einsum form.\n")
  print("| E | K | cf | S | dispatch | dense ms | dense einsum ms | MoE ms | ratio | "
        "ratio vs einsum dense | goal | dense MiB | MoE MiB | dense faults | "
        "MoE faults |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in data["rows"]:
    cf = "-" if r["capacity_factor"] is None else r["capacity_factor"]
    head = (f"| {r['num_experts']} | {r['top_k']} | {cf} | {r['group_size']} | "
            f"{r['dispatch']} |")
    if "error" in r or "skipped" in r:
      why = f"failed: {r['error'][:60]}" if "error" in r else f"skipped: {r['skipped']}"
      print(f"{head} {why} | | | | | | | | | |")
      continue
    goal = ""
    if r["capacity_factor"] == 1.0 and r["top_k"] in GOALS:
      goal = "met" if r["ratio"] <= GOALS[r["top_k"]] else "**missed**"
    mib = lambda v: f"{v / 2**20:.0f}" if v is not None else "n/a"
    num = lambda v, fmt: format(v, fmt) if v is not None else "n/a"
    print(f"{head} {r['dense_ms']:.0f} | {num(r.get('dense_einsum_ms'), '.0f')} | "
          f"{r['moe_ms']:.0f} | {r['ratio']:.2f} | "
          f"{num(r.get('ratio_vs_dense_einsum'), '.2f')} | {goal} | "
          f"{mib(r['dense_bytes'])} | {mib(r['moe_bytes'])} | "
          f"{num(r.get('dense_page_faults'), '.0f')} | "
          f"{num(r.get('moe_page_faults'), '.0f')} |")


if __name__ == "__main__":
  main(sys.argv[1])
