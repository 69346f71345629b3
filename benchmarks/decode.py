r"""Serving cost of each model: prefill and decode speed with the KV cache, the cache
against the uncached sampler, weight and cache bytes, and the step's peak memory.

For each config (``experiments/configs/NAME.py``; dense_small, switch_small,
top2_small and deepseek_small by default; random init: speed does not depend
on the weights):

* prefill tokens/s and decode tokens/s at each ``--batch_sizes`` (prompts of
  ``--prompt_len`` tokens, ``--new_tokens`` greedy steps timed after a warm-up);
* ms per new token at batch 1, cached (:class:`moe_jax.inference.decode.Decoder`)
  against uncached (:func:`moe_jax.inference.decode.generate_uncached`, which re-runs
  the model on the window for every token), at each ``--compare_prompt_lens``, both with
  a window of prompt + new tokens, after a warm-up;
* weight bytes, total and active per token (``count_params``: experts count top_k / E);
* KV-cache bytes per token and per sequence of ``max_len`` tokens;
* peak memory of the compiled step at the largest batch (XLA's memory analysis).

  python benchmarks/decode.py --json=decode.json
  python benchmarks/decode.py --configs=dense_small,switch_small --batch_sizes=1,8 \
      --new_tokens=16 --markdown=decode.md
  # Trained weights (what a MoD predictor routes depends on them):
  python benchmarks/decode.py --configs=dense_small,mod_small --batch_sizes=1,8 \
      --workdirs=dense_small=/tmp/dense_small,mod_small=/tmp/mod_small
"""

from __future__ import annotations

import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

import configs as config_files  # benchmarks/configs.py
import harness  # benchmarks/harness.py
from moe_jax.inference import decode
from moe_jax.training import build, run_state
from moe_jax.models.sizes import count_params


_CONFIGS = flags.DEFINE_list("configs", ["dense_small", "switch_small", "top2_small",
                                         "deepseek_small"],
                             "Configs of experiments/configs/ to measure "
                             "(any of them, e.g. mixtral_small).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Decode batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row for the "
                                   "prefill/decode rows.", lower_bound=1)
_COMPARE = flags.DEFINE_list("compare_prompt_lens", ["64", "256"],
                             "Prompt lengths of the cached-vs-uncached rows.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Timed new tokens per row.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).", lower_bound=1)
_OVERRIDES = flags.DEFINE_list("config_overrides", [],
                               "KEY=VALUE overrides applied to every config, e.g. "
                               "model.num_layers=2,model.d_model=32.")
_SAMPLE_BYTES = flags.DEFINE_integer(
    "sample_bytes", 500, "Bytes sampled after 'ROMEO:\\n' as experiments/sample.py does "
    "(temperature 0.8, top-k 40, window data.seq_len), cached against uncached; 0 skips.",
    lower_bound=0)
_SAMPLE_CONFIGS = flags.DEFINE_list("sample_configs", ["switch_small"],
                                    "Configs of the --sample_bytes rows.")
_WORKDIRS = flags.DEFINE_list(
    "workdirs", [], "NAME=WORKDIR pairs: measure config NAME with the trained weights "
    "(and the config) of that run's latest checkpoint instead of a random init. Speed "
    "does not depend on the weights, except where the weights decide what runs: a "
    "Mixture-of-Depths predictor decides which tokens go through a routed block.")
_JSON = flags.DEFINE_string("json", None, "Write meta and rows as JSON to this file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write Markdown tables to this file.")


def load_config(name: str):
  return config_files.load_config(name, _OVERRIDES.value)


def _median_time(fn) -> float:
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
  rng = np.random.default_rng(0)
  return rng.integers(0, vocab - 3, size=(batch, length)).tolist()


def measure_batch(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
  """Prefill and decode tokens/s at ``batch`` rows."""
  decoder = decode.Decoder(model, batch_size=batch, max_len=prompt_len + new_tokens,
                           prefill_len=prompt_len)
  prompts = _prompts(batch, prompt_len, model.cfg.vocab_size)

  def prefill():
    _, token = decoder.prefill(prompts)
    return jax.block_until_ready(token)

  def steps():  # after an untimed prefill
    token = prefill()
    start = time.perf_counter()
    done = 0
    while done < new_tokens:  # as Decoder.generate runs them: chunks of device steps
      n = min(decoder.chunk, new_tokens - done)
      _, _, token, _ = decoder.run_steps(token, n)
      done += n
    jax.block_until_ready(token)
    return time.perf_counter() - start

  steps()  # compile both
  prefill()
  t_prefill = _median_time(prefill)
  t_steps = statistics.median(steps() for _ in range(_REPEATS.value))
  return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
              prefill_ms=t_prefill * 1e3, prefill_tokens_per_sec=batch * prompt_len
              / t_prefill, step_ms=t_steps / new_tokens * 1e3,
              decode_tokens_per_sec=batch * new_tokens / t_steps,
              cache_bytes=decoder.cache_bytes(), max_len=decoder.max_len,
              step_memory=decoder.step_memory())


def measure_cached_vs_uncached(model, prompt_len: int, new_tokens: int) -> dict:
  """ms per new token at batch 1, cached against re-running the window."""
  window = prompt_len + new_tokens
  prompt = _prompts(1, prompt_len, model.cfg.vocab_size)[0]
  decoder = decode.Decoder(model, batch_size=1, max_len=window, prefill_len=prompt_len)
  cached = lambda: decoder.generate([prompt], new_tokens, temperature=0.0)
  uncached = lambda: decode.generate_uncached(model, prompt, new_tokens,
                                              temperature=0.0, window=window)
  cached()  # compile
  decode.generate_uncached(model, prompt, 2, temperature=0.0, window=window)
  t_cached, t_uncached = _median_time(cached), _median_time(uncached)
  return dict(prompt_len=prompt_len, new_tokens=new_tokens,
              cached_ms_per_token=t_cached / new_tokens * 1e3,
              uncached_ms_per_token=t_uncached / new_tokens * 1e3,
              speedup=t_uncached / t_cached)


def measure_sample(model, window: int, length: int) -> dict:
  """Seconds to sample ``length`` bytes after "ROMEO:\\n" with both samplers, cold
  (the first call, compilation included) and warm (a second call)."""
  prompt = list("ROMEO:\n".encode())
  opts = dict(temperature=0.8, top_k=40, seed=0)
  decoder = decode.Decoder(model, batch_size=1, max_len=window)
  out = {}
  for name, fn in (
      ("uncached", lambda: decode.generate_uncached(model, prompt, length,
                                                    window=window, **opts)),
      ("cached", lambda: decoder.generate([prompt], length, **opts))):
    for when in ("cold", "warm"):
      start = time.perf_counter()
      fn()
      out[f"{name}_{when}_sec"] = time.perf_counter() - start
  out.update(bytes=length, window=window,
             speedup_warm=out["uncached_warm_sec"] / out["cached_warm_sec"],
             speedup_cold=out["uncached_cold_sec"] / out["cached_cold_sec"])
  return out


def _workdirs() -> dict[str, str]:
  out = {}
  for item in _WORKDIRS.value:
    name, sep, workdir = item.partition("=")
    if not sep or not name or not workdir:
      raise app.UsageError(f"--workdirs: {item!r} is not NAME=WORKDIR.")
    if name not in _CONFIGS.value:
      raise app.UsageError(f"--workdirs: {name!r} is not one of --configs.")
    out[name] = workdir
  return out


def measure_config(name: str, workdir: str | None = None) -> dict:
  if workdir:  # the run's own config: its overrides (steps, evals) change no shapes
    model, config, step = run_state.load_model(workdir)
    weights = f"trained, step {step}"
  else:
    config = load_config(name)
    model = build.make_model(config)
    weights = "random init"
  counts = count_params(model)
  bytes_per_param = 4  # parameters are float32 whatever the compute dtype
  batches = [measure_batch(model, int(b), _PROMPT_LEN.value, _NEW.value)
             for b in _BATCHES.value]
  compare = [measure_cached_vs_uncached(model, int(n), _NEW.value)
             for n in _COMPARE.value]
  largest = batches[-1]
  per_token = largest["cache_bytes"] / (largest["batch"] * largest["max_len"])
  row = dict(config=name, weights=weights,
             weight_bytes_total=counts["total"] * bytes_per_param,
             weight_bytes_active_per_token=counts["active"] * bytes_per_param,
             kv_cache_bytes_per_token=per_token,
             kv_cache_bytes_per_sequence=per_token * config.data.seq_len,
             sequence_len=config.data.seq_len,
             step_peak_bytes=largest["step_memory"]["peak"],
             step_peak_batch=largest["batch"], batches=batches, cached_vs_uncached=compare)
  if _SAMPLE_BYTES.value and name in _SAMPLE_CONFIGS.value:
    row["sample"] = measure_sample(model, config.data.seq_len, _SAMPLE_BYTES.value)
  return row


def to_markdown(data: dict) -> str:
  meta, rows = data["meta"], data["rows"]
  mib = lambda v: f"{v / 2**20:.2f}"
  out = [f"backend `{meta['backend']}` ({meta['device']}), jax {meta['jax']}, "
         f"prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, "
         f"median of {meta['repeats']}.", "",
         "| config | weights | weights MiB (total) | weights MiB (active/token) | "
         "KV-cache KiB/token | KV-cache MiB/sequence | step peak MiB (batch) |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['config']} | {r.get('weights', 'random init')} | "
               f"{mib(r['weight_bytes_total'])} | "
               f"{mib(r['weight_bytes_active_per_token'])} | "
               f"{r['kv_cache_bytes_per_token'] / 1024:.1f} | "
               f"{mib(r['kv_cache_bytes_per_sequence'])} ({r['sequence_len']} tokens) | "
               f"{mib(r['step_peak_bytes'])} ({r['step_peak_batch']}) |")
  out += ["", "| config | batch | prefill tokens/s | decode tokens/s | step ms |",
          "|---|---|---|---|---|"]
  for r in rows:
    for b in r["batches"]:
      out.append(f"| {r['config']} | {b['batch']} | {b['prefill_tokens_per_sec']:.0f} | "
                 f"{b['decode_tokens_per_sec']:.0f} | {b['step_ms']:.2f} |")
  out += ["", "| config | prompt | cached ms/token | uncached ms/token | speedup |",
          "|---|---|---|---|---|"]
  for r in rows:
    for c in r["cached_vs_uncached"]:
      out.append(f"| {r['config']} | {c['prompt_len']} | {c['cached_ms_per_token']:.2f} | "
                 f"{c['uncached_ms_per_token']:.2f} | {c['speedup']:.1f}x |")
  samples = [r for r in rows if "sample" in r]
  if samples:
    out += ["", "| config | bytes | window | uncached s (warm / cold) | cached s (warm / "
            "cold) | speedup (warm / cold) |", "|---|---|---|---|---|---|"]
    for r in samples:
      m = r["sample"]
      out.append(f"| {r['config']} | {m['bytes']} | {m['window']} | "
                 f"{m['uncached_warm_sec']:.2f} / {m['uncached_cold_sec']:.2f} | "
                 f"{m['cached_warm_sec']:.2f} / {m['cached_cold_sec']:.2f} | "
                 f"{m['speedup_warm']:.1f}x / {m['speedup_cold']:.1f}x |")
  return "\n".join(out) + "\n"


def main(argv):
  del argv
  for flag in (_BATCHES, _COMPARE):
    for v in flag.value:
      if not v.isdigit() or int(v) < 1:
        raise app.UsageError(f"--{flag.name}: {v!r} is not a positive integer.")
  configs = [load_config(n) and n for n in _CONFIGS.value]
  workdirs = _workdirs()
  meta = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
              cpu=platform.processor() or platform.machine(), jax=jax.__version__,
              prompt_len=_PROMPT_LEN.value, new_tokens=_NEW.value,
              repeats=_REPEATS.value, config_overrides=list(_OVERRIDES.value))
  rows = []
  for name in configs:
    rows.append(measure_config(name, workdirs.get(name)))
    print(f"# {name} done", flush=True)
  harness.write_results(dict(meta=meta, rows=rows), json_path=_JSON.value,
                        markdown_path=_MARKDOWN.value, to_markdown=to_markdown)


if __name__ == "__main__":
  app.run(main)
