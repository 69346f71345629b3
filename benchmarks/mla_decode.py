r"""Multi-head latent attention at decode: KV-cache bytes per token and decode speed.

* KV-cache bytes per token and block, read off the cache variables that
  ``init_cache`` gives each block of the built model (abstractly, ``jax.eval_shape``:
  no weights are allocated; positions, int32 bookkeeping, left out): MLA caches the
  normed latent and the shared rotary key, ``(kv_lora_rank + qk_rope_head_dim) x
  bytes``; attention keys and values, ``2 x N_kv x head_dim x bytes``. Pairs:
  ``deepseek_v3_small`` against ``deepseek_small`` (the same width, plain attention),
  and ``deepseek_v3_671b`` against multi-head attention of its width (128 heads of
  128, ``model.mixer=attention``), each built with ``--full_size_layers`` blocks (the
  per-block cache does not depend on the depth).
* Decode tokens/s of ``deepseek_v3_small`` (random init) with the absorbed path
  (``mla.absorb=True``: attention against the latent cache) and the expanded one
  (``mla.absorb=False``: the cached latents expanded to keys and values each step),
  and of ``deepseek_small``, at ``--batch`` rows and each ``--cache_lens`` (the
  decoder's ``max_len``: every step attends over the whole cache, masked): a prompt
  of ``cache_len - new_tokens`` tokens, then ``--new_tokens`` greedy steps timed. The
  three models are compiled and warmed up first, then timed in turn in each of
  ``--repeats`` rounds (so a slow phase of the machine hits all alike); the median
  per model, and the ratios, are reported.

  python benchmarks/mla_decode.py --json=mla_decode.json --markdown=mla_decode.md
  python benchmarks/mla_decode.py --cache_lens=128 --repeats=1 --new_tokens=4
"""

from __future__ import annotations

import math
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
from flax import nnx

import configs as config_files  # benchmarks/configs.py
import harness  # benchmarks/harness.py
from moe_jax.inference import decode
from moe_jax.training import build

_BATCH = flags.DEFINE_integer("batch", 8, "Decode rows.", lower_bound=1)
_LENS = flags.DEFINE_list("cache_lens", ["128", "512", "2048"],
                          "Cache lengths (decoder max_len) to time.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Timed new tokens per repeat.",
                            lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timed rounds (median).",
                                lower_bound=1)
_FULL_LAYERS = flags.DEFINE_integer("full_size_layers", 4, "Blocks of the full-size "
                                    "models built for the cache shapes.", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write meta and rows as JSON to this file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write Markdown tables to this file.")

# (name, config, overrides) of the cache rows, in pairs (MLA, attention of its width).
CACHE_ROWS = (
    ("deepseek_v3_small (MLA)", "deepseek_v3_small", ()),
    ("deepseek_small (MHA)", "deepseek_small", ()),
    ("deepseek_v3_671b (MLA)", "deepseek_v3_671b", ("model.mtp_depth=0",)),
    ("MHA at deepseek_v3_671b's width (128 heads x 128)", "deepseek_v3_671b",
     ("model.mtp_depth=0", "model.mixer=attention", "model.head_dim=128",
      "model.num_kv_heads=128")),
)
SPEED_ROWS = (
    ("MLA absorbed", "deepseek_v3_small", ("mla.absorb=true",)),
    ("MLA expanded", "deepseek_v3_small", ("mla.absorb=false",)),
    ("MHA (deepseek_small)", "deepseek_small", ()),
)


def cache_row(label: str, name: str, overrides, layers: int | None) -> dict:
  """Cache values and bytes per token per block, from the built model's cache."""
  extra = (f"model.num_layers={layers}",) if layers else ()
  config = config_files.load_config(name, [*overrides, *extra])

  def cache():
    model = build.make_model(config)
    decode.init_cache(model, 1, 1)
    return nnx.state(model, nnx.Cache)

  leaves = [(jax.tree_util.keystr(p), leaf) for p, leaf in
            jax.tree_util.tree_flatten_with_path(jax.eval_shape(cache))[0]]
  kept = [(p, l) for p, l in leaves if "position" not in p and l.dtype != np.int32]
  blocks = config.model.num_layers
  values = sum(math.prod(l.shape) for _, l in kept)
  nbytes = sum(math.prod(l.shape) * l.dtype.itemsize for _, l in kept)
  names = sorted({p.rsplit("'", 2)[-2] if "'" in p else p for p, _ in kept})
  return dict(label=label, config=name, overrides=list(overrides), blocks=blocks,
              values_per_token_per_block=values // blocks,
              bytes_per_token_per_block=nbytes // blocks,
              dtype=str(kept[0][1].dtype), cache_variables=names,
              bf16_bytes_per_token_per_block=2 * values // blocks)


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
  rng = np.random.default_rng(0)
  return rng.integers(0, vocab - 3, size=(batch, length)).tolist()


def speed_rows(batch: int, cache_len: int, new_tokens: int, repeats: int) -> list[dict]:
  """Decode tokens/s of each of :data:`SPEED_ROWS`, timed in interleaved rounds."""
  entries = []
  for label, name, overrides in SPEED_ROWS:
    model = build.make_model(config_files.load_config(name, overrides))
    decoder = decode.Decoder(model, batch_size=batch, max_len=cache_len,
                             prefill_len=cache_len - new_tokens)
    prompts = _prompts(batch, cache_len - new_tokens, model.cfg.vocab_size)

    def steps(decoder=decoder, prompts=prompts):
      _, token = decoder.prefill(prompts)  # untimed
      jax.block_until_ready(token)
      start = time.perf_counter()
      done = 0
      while done < new_tokens:
        n = min(decoder.chunk, new_tokens - done)
        _, _, token, _ = decoder.run_steps(token, n)
        done += n
      jax.block_until_ready(token)
      return time.perf_counter() - start

    steps()  # compile and warm up
    entries.append((label, steps, []))
  for _ in range(repeats):
    for _, fn, times in entries:
      times.append(fn())
  out = []
  for label, _, times in entries:
    t = statistics.median(times)
    out.append(dict(model=label, batch=batch, cache_len=cache_len,
                    new_tokens=new_tokens, step_ms=t / new_tokens * 1e3,
                    decode_tokens_per_sec=batch * new_tokens / t,
                    times_sec=times))
  return out


def to_markdown(data: dict) -> str:
  meta = data["meta"]
  out = [f"backend `{meta['backend']}` ({meta['device']}, {meta['cpu_count']} cores), "
         f"jax {meta['jax']}; decode: batch {meta['batch']}, {meta['new_tokens']} new "
         f"tokens timed, median of {meta['repeats']} interleaved rounds.", "",
         "| model | cache variables | values / token / block | bytes / token / block "
         f"(cache dtype) | bytes at bfloat16 |", "|---|---|---|---|---|"]
  for r in data["cache"]:
    out.append(f"| {r['label']} | {', '.join(r['cache_variables'])} | "
               f"{r['values_per_token_per_block']:,} | "
               f"{r['bytes_per_token_per_block']:,} ({r['dtype']}) | "
               f"{r['bf16_bytes_per_token_per_block']:,} |")
  c = data["cache"]
  for i in range(0, len(c) - 1, 2):
    out.append(f"\n{c[i]['label']} / {c[i + 1]['label']}: "
               f"{c[i]['values_per_token_per_block'] / c[i + 1]['values_per_token_per_block']:.4f}"
               f" ({c[i + 1]['values_per_token_per_block'] / c[i]['values_per_token_per_block']:.1f}x smaller)")
  out += ["", "| cache len | model | step ms | decode tokens/s | vs MLA absorbed |",
          "|---|---|---|---|---|"]
  for group in data["speed"]:
    ref = group[0]["decode_tokens_per_sec"]
    for r in group:
      out.append(f"| {r['cache_len']} | {r['model']} | {r['step_ms']:.2f} | "
                 f"{r['decode_tokens_per_sec']:,.0f} | "
                 f"{r['decode_tokens_per_sec'] / ref:.2f}x |")
  return "\n".join(out) + "\n"


def main(argv):
  del argv
  for v in _LENS.value:
    if not v.isdigit() or int(v) <= _NEW.value:
      raise app.UsageError(f"--cache_lens: {v!r} must be an integer above "
                           f"--new_tokens={_NEW.value}.")
  import os  # pylint: disable=import-outside-toplevel
  meta = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
              cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
              jax=jax.__version__, batch=_BATCH.value, new_tokens=_NEW.value,
              repeats=_REPEATS.value, full_size_layers=_FULL_LAYERS.value)
  cache = [cache_row(label, name, overrides,
                     _FULL_LAYERS.value if "671b" in name else None)
           for label, name, overrides in CACHE_ROWS]
  print("# cache shapes done", flush=True)
  speed = []
  for n in _LENS.value:
    speed.append(speed_rows(_BATCH.value, int(n), _NEW.value, _REPEATS.value))
    print(f"# cache_len {n} done", flush=True)
  harness.write_results(dict(meta=meta, cache=cache, speed=speed),
                        json_path=_JSON.value, markdown_path=_MARKDOWN.value,
                        to_markdown=to_markdown)


if __name__ == "__main__":
  app.run(main)
