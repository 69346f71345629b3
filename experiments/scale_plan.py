r"""Writes docs/results/scale_plan/: the full-size configs planned on v5p and H100
clusters (the smallest topology where a training step fits, the smallest where bf16
serving fits) and the dispatch paths compared, every number from a compile for that
topology on this host (no accelerator).

  python experiments/scale_plan.py [--out=docs/results/scale_plan]
      [--parts=train,serve,dispatch,published,serve_rules]
      [--configs=mixtral_8x7b,...] [--chips=v5p,h100] [--report_only]

Each compile appends one JSON row to OUT/rows.jsonl as it finishes, and a re-run skips
the rows already there, so an interrupted run resumes. Two processes with different
--parts can share OUT. README.md and memory.png are rewritten from all rows (every
config and chip, whatever --configs and --chips chose to compile) at the end, or alone
with --report_only.
"""

import importlib.util
import json
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=wrong-import-position

from cli import CONFIGS_DIR, fail  # pylint: disable=wrong-import-position

# The full-size configs, each with the global batch (tokens) and the sequence length of
# its training plan: the paper's where it gives them, else 4M tokens of 4096.
FULL_SIZE = {
    "switch_base_128": {"tokens": 2 ** 20, "seq_len": 512},
    "glam_1_2t": {"tokens": 2 ** 20, "seq_len": 1024},
    "mixtral_8x7b": {"tokens": 2 ** 22, "seq_len": 4096},
    # Served experts first: at its 16-GPU fit, 48.5 GiB per device against tensor
    # parallelism's 74.8; on 8 v5p chips it costs 10 GiB (86.6 against 76.1), at the
    # same topology (the report's serving mesh rules compared).
    "grok_1": {"tokens": 2 ** 22, "seq_len": 8192, "serve_mesh": "expert"},
    "deepseek_moe_16b": {"tokens": 2 ** 22, "seq_len": 4096},
    "jamba_v0_1": {"tokens": 2 ** 22, "seq_len": 4096},
    "olmoe_1b_7b": {"tokens": 2 ** 22, "seq_len": 4096},
    "qwen3_30b_a3b": {"tokens": 2 ** 22, "seq_len": 4096},
    # Served experts first (planner.scale.SERVING_MESHES): with tensor parallelism
    # alone every device holds all 8 rows' MoE buffers, 117-125 GiB per H100 on 64 to
    # 128 of them; with expert=8, model=8 a 64-H100 plan peaks at 48.8 GiB (at its
    # 4K context).
    "deepseek_v3_671b": {"tokens": 2 ** 22, "seq_len": 4096, "serve_mesh": "expert"},
}
DISPATCH_CONFIGS = ("switch_base_128", "mixtral_8x7b")
DISPATCHES = (("einsum", {}), ("indices", {}),
              ("dropless", {"moe.ragged_exchange": "ragged"}))
SERVE_BATCH, SERVE_CONTEXT = 8, 32768

# Published setups planned as published (MaxText's own Mixtral recipes), with what
# their sources report. The overrides follow each recipe's flags; MaxText's defaults
# fill the rest (pure FSDP: ici_fsdp_parallelism=-1; remat full; megablox dropless).
def _maxtext_fsdp(devices: int, per_device: int, seq_len: int,
                  extra: dict | None = None) -> dict:
  """A MaxText recipe's keys: ``per_device`` sequences of ``seq_len`` per device in one
  microbatch, pure FSDP over all ``devices``, bf16 weights and Adam moments, full
  remat, scanned layers; then ``extra``."""
  return {"data.seq_len": seq_len, "batch_size": per_device * devices,
          "mesh.fsdp": devices, "mesh.expert": 1, "mesh.data": 1,
          "model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
          "moment_dtype": "bfloat16", "model.remat": "full", "model.scan_layers": True,
          **(extra or {})}


_PUBLISHED_SETUPS = {
    "maxtext_mixtral_8x7b_v5p_128": {
        "config": "mixtral_8x7b", "target": "v5p:4x4x4",
        "overrides": _maxtext_fsdp(64, 36, 4096),
        "reported": "54.89% MFU, 251.94 TFLOP/s per chip on v5p-128 (MaxText "
                    "tests/end_to_end/tpu/mixtral/Run_Mixtral.md; recipe: tpu-recipes "
                    "training/v5p/Mixtral-8X7B-Maxtext, per_device_batch_size 36, seq "
                    "4096, bf16 weights, pure FSDP, dropless megablox, remat full)",
        "reported_mfu": 0.5489},
    "maxtext_mixtral_8x7b_dropped_v6e_256": {
        "config": "mixtral_8x7b", "target": "v6e:16x16",
        # MaxText's capacity counts each token's top_k choices (ceil(L * K / E) *
        # 1.25 slots per sequence); this project's does not (routing.expert_capacity),
        # so 1.25 there is 2.5 here.
        "overrides": _maxtext_fsdp(256, 12, 4096, {"moe.dispatch": "einsum",
                                                   "moe.capacity_factor": 2.5}),
        "reported": "13.484 s/step, 302.3 TFLOP/s per device (32.9% of v6e's 918) on "
                    "v6e-256 (tpu-recipes training/trillium/Mixtral-8x7B-MaxText; "
                    "MaxText mixtral_8x7b_dropped: per_device_batch_size 12, seq 4096, "
                    "capacity factor 1.25 of K = 2 choices per token, our 2.5; "
                    "remat with offloads, which we replace by full remat)",
        "reported_mfu": 302.3 / 918},
    # MaxText's DeepSeek guide gives this as an example pre-training command, with no
    # measurement. Its dense matmul without a capacity runs every expert over every
    # token (32x the routed FLOPs at E = 256, K = 8), which this project has no path
    # for: planned with the dropless path, the counterpart of its megablox one.
    "maxtext_deepseek3_671b_v5p_256": {
        "config": "deepseek_v3_671b", "target": "v5p:4x4x8",
        "overrides": _maxtext_fsdp(128, 4, 1024, {"model.mtp_depth": 0,
                                                  "moe.dispatch": "dropless"}),
        "variants": ("_blocked",),  # MaxText's attention=flash
        "reported": "an example command, no measurement (MaxText "
                    "tests/end_to_end/tpu/deepseek/Run_DeepSeek.md, pre-training on "
                    "v5p-256: per_device_batch_size 4, seq 1024, ici_fsdp_parallelism "
                    "128, attention flash, bf16 weights and moments, no MTP, dense "
                    "matmul without a capacity, which we replace by dropless)",
        "reported_mfu": None},
}
# Each setup compiled three ways (or those of its "variants"): with this project's
# default dense attention; with the blocked kernel, which stands in for the flash
# kernel (splash attention) that MaxText uses on TPU by default; and with the loss
# chunked as well (loss_chunk; no MaxText default does that).
PUBLISHED_VARIANTS = {
    "": ("dense attention", {}),
    "_blocked": ("blocked attention", {"model.attention_kernel": "blocked"}),
    "_blocked_chunked": ("blocked attention, loss_chunk=1024",
                         {"model.attention_kernel": "blocked", "loss_chunk": 1024}),
}
PUBLISHED = {
    key + suffix: {**setup, "setup": key, "variant": variant,
                   "overrides": {**setup["overrides"], **extra}}
    for key, setup in _PUBLISHED_SETUPS.items()
    for suffix, (variant, extra) in PUBLISHED_VARIANTS.items()
    if suffix in setup.get("variants", PUBLISHED_VARIANTS)}

_OUT = flags.DEFINE_string("out", "docs/results/scale_plan", "Output folder.")
_PARTS = flags.DEFINE_list("parts", ["train", "serve", "dispatch", "published",
                                     "serve_rules"],
                           "What to compile.")
_CONFIGS = flags.DEFINE_list("configs", list(FULL_SIZE), "Full-size configs.")
_CHIPS = flags.DEFINE_list("chips", ["v5p", "h100"], "Chips (ladders of planner.scale).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report.")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS_DIR,
                                                                    f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _rows(path):
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv):
  if len(argv) > 1:
    fail(f"Unexpected arguments: {' '.join(argv[1:])}.")
  from moe_jax.planner import scale, scale_report  # pylint: disable=import-outside-toplevel
  from moe_jax.planner.targets import CHIPS  # pylint: disable=import-outside-toplevel
  from moe_jax.training.config import set_keys  # pylint: disable=import-outside-toplevel
  from moe_jax.models.sizes import count_params  # pylint: disable=import-outside-toplevel
  for name in _CONFIGS.value:
    if name not in FULL_SIZE:
      fail(f"--configs: {name!r} is not one of {', '.join(FULL_SIZE)}.")
  parts = ("train", "serve", "dispatch", "published", "serve_rules")
  for part in _PARTS.value:
    if part not in parts:
      fail(f"--parts: {part!r} is not one of {', '.join(parts)}.")
  for chip in _CHIPS.value:
    if chip not in scale.LADDERS:
      fail(f"--chips: {chip!r} has no ladder; use {', '.join(scale.LADDERS)}.")
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "rows.jsonl")

  def log(row):
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(f"{row['part']:8s} {row['config']:18s} {row['chip']}:{row['topology']:7s} "
          f"{row.get('dispatch', ''):9s} fits={row.get('fits')} "
          f"peak={row.get('bytes_per_device', {}).get('peak', 0) / 2**30:.1f}GiB "
          f"compile={row.get('compile_s', 0)}s {row.get('error', '')[:120]}", flush=True)

  previous = _rows(path)
  done = {(r["part"], r["config"], r["chip"], r.get("dispatch", "")) for r in previous
          if r["part"] not in ("train", "serve")}

  def search(part, name, chip):
    """(settled, {topology: row}) of the compiles already made for one search (rows
    of another setting than today's, scale_report.SETTINGS, belong to an earlier
    search)."""
    setting = scale_report.SETTINGS[part](_setting_keys(part, name))
    rows = [r for r in previous if (r["part"], r["config"], r["chip"]) == (part, name, chip)
            and scale_report.SETTINGS[part](r) == setting]
    return scale.search_done(rows, chip), {r["topology"]: r for r in rows}

  def tagged(part, name, chip, extra=None):
    def add(row):
      row.update({"part": part, "config": name, **(extra or {})})
      if "mesh" in row and part in ("train", "dispatch"):
        row["mesh_reason"] = scale.mesh_reason(row["mesh"], base(name).moe.num_experts)
      log(row)
    return add

  def base(name):
    return _load(name)

  if not _REPORT_ONLY.value:
    for name in _CONFIGS.value:
      settings = FULL_SIZE[name]
      params = None
      for chip in _CHIPS.value:
        settled, known = search("train", name, chip)
        if "train" in _PARTS.value and not settled:
          params = params or _count(name, count_params)

          def make(devices, name=name, settings=settings, params=params, chip=chip):
            c = base(name)
            return set_keys(c, scale.training_overrides(
                c, devices, settings["tokens"], settings["seq_len"],
                params["total"] - params["experts"], CHIPS[chip].hbm_bytes))
          scale.smallest_fit(make, chip, params["total"], scale.TRAIN_STATE_BYTES,
                             log=tagged("train", name, chip,
                                        _setting_keys("train", name)), known=known)
        settled, known = search("serve", name, chip)
        if "serve" in _PARTS.value and not settled:
          context = _serve_context(name)

          rule = settings.get("serve_mesh", "tensor")

          def make_serve(devices, name=name, rule=rule):
            c = base(name)
            return set_keys(c, scale.serving_overrides(c, devices, SERVE_BATCH, rule))
          params = params or _count(name, count_params)
          scale.smallest_fit(make_serve, chip, params["total"], 2,
                             log=tagged("serve", name, chip,
                                        _setting_keys("serve", name)),
                             known=known, mode="serve", serve_batch=SERVE_BATCH,
                             serve_len=context,
                             serve_chunk=_serve_chunk(name))
    if "dispatch" in _PARTS.value:
      rows = _rows(path)
      for name in DISPATCH_CONFIGS:
        if name not in _CONFIGS.value:
          continue
        for chip in _CHIPS.value:
          fit = scale_report._fit_row(  # pylint: disable=protected-access
              scale_report.split_searches(rows, "train")[0], "train", name, chip)
          if fit is None:
            continue
          for dispatch, extra in DISPATCHES:
            if ("dispatch", name, chip, dispatch) in done:
              continue
            settings = FULL_SIZE[name]

            def make_d(devices, name=name, settings=settings, dispatch=dispatch,
                       extra=extra, mesh=fit["mesh"]):
              c = base(name)
              set_keys(c, scale.training_overrides(c, devices, settings["tokens"],
                                                   settings["seq_len"]))
              # The fitting plan's mesh, so the paths differ in dispatch alone.
              return set_keys(c, {"moe.dispatch": dispatch, **extra,
                                  **{f"mesh.{k}": v for k, v in mesh.items()}})
            row = scale.try_plan(make_d, chip, fit["topology"])
            tagged("dispatch", name, chip, {
                "dispatch": dispatch,
                "attention_kernel": scale.TRAIN_ATTENTION_KERNEL})(row)
    if "serve_rules" in _PARTS.value:
      # Each serving fit compiled again with the other serving mesh rules, at the same
      # topology and setting: which rule needs less memory per device.
      rows = _rows(path)
      current = scale_report.split_searches(rows, "serve")[0]
      for name in _CONFIGS.value:
        for chip in _CHIPS.value:
          fit = scale_report._fit_row(current, "serve", name, chip)  # pylint: disable=protected-access
          for rule, mesh_of in scale.SERVING_MESHES.items():
            if (fit is None or rule == fit.get("serve_mesh", "tensor")
                or any(scale_report.serving_setting(r)[2] == rule
                       for r in scale_report.other_rules(rows, fit))
                or mesh_of(base(name), fit["devices"], SERVE_BATCH) == fit["mesh"]):
              continue  # nothing to compare, compiled already, or the same mesh

            def make_rule(devices, name=name, rule=rule):
              c = base(name)
              return set_keys(c, scale.serving_overrides(c, devices, SERVE_BATCH, rule))
            row = scale.try_plan(make_rule, chip, fit["topology"], mode="serve",
                                 serve_batch=SERVE_BATCH, serve_len=_serve_context(name),
                                 serve_chunk=_serve_chunk(name))
            tagged("serve_rule", name, chip,
                   {**_setting_keys("serve", name), "serve_mesh": rule})(row)
    if "published" in _PARTS.value:
      for key, setup in PUBLISHED.items():
        if ("published", setup["config"], setup["target"].split(":")[0], key) in done:
          continue
        chip, topology = setup["target"].split(":")
        row = {"chip": chip, "topology": topology, "setup": setup["setup"],
               "variant": setup["variant"], "reported": setup["reported"],
               "reported_mfu": setup["reported_mfu"]}
        row.update(scale.try_plan(
            lambda _, setup=setup: set_keys(base(setup["config"]), setup["overrides"]),
            chip, topology))
        tagged("published", setup["config"], chip, {"dispatch": key})(row)
  rows = _rows(path)
  intro_path = os.path.join(_OUT.value, "notes.md")
  notes = open(intro_path, encoding="utf-8").read() if os.path.exists(intro_path) else ""
  # The report covers every row: --configs and --chips choose what to compile.
  paths = scale_report.write_report(_OUT.value, rows, list(FULL_SIZE),
                                    list(scale.LADDERS), intro=INTRO, notes=notes)
  print("wrote " + ", ".join(paths))


def _setting_keys(part, name) -> dict:
  """The keys of today's setting for ``part``'s searches of config ``name``, which tag
  their rows (scale_report.SETTINGS reads them back)."""
  from moe_jax.planner import scale  # pylint: disable=import-outside-toplevel
  if part == "serve":
    return {"attention_kernel": scale.SERVE_ATTENTION_KERNEL,
            "serve_chunk": _serve_chunk(name),
            "serve_mesh": FULL_SIZE[name].get("serve_mesh", "tensor")}
  return {"attention_kernel": scale.TRAIN_ATTENTION_KERNEL,
          "loss_chunk": scale.train_loss_chunk(FULL_SIZE[name]["seq_len"])}


def _serve_context(name) -> int:
  """The serving context of a config: 32K, or its own when shorter."""
  return min(SERVE_CONTEXT, _load(name).data.seq_len)


def _serve_chunk(name) -> int:
  """The serving plans' prefill chunk (:data:`moe_jax.planner.scale.SERVE_CHUNK`), or
  the whole context when that is shorter."""
  from moe_jax.planner import scale  # pylint: disable=import-outside-toplevel
  return math.gcd(scale.SERVE_CHUNK, _serve_context(name))


def _count(name, count_params):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  config = _load(name)
  model = nnx.eval_shape(lambda: build.make_model(config))
  return count_params(model)


INTRO = """# Scale plan: the full-size configs on v5p and H100, compiled on a CPU host

Produced by `python experiments/scale_plan.py`. Every number below comes from compiling
the real step (`experiments/plan.py`, `moe_jax.planner`) for the named topology with
libtpu or the CUDA compiler on a host without accelerators. Nothing ran on a TPU or a
GPU: "fits" is the compiler's memory plan against the chip's HBM, FLOPs and bytes are
read from the optimized HLO, and the step time is a roofline **bound** (compiled FLOPs
at the chip's peak, or the step's arguments and results moved once at its HBM
bandwidth, whichever is slower), never a measurement. Each search starts where the
fp32 training state would take half the HBM and walks the ladder of topologies
(`moe_jax/planner/scale.py`) until a fitting compile sits next to a failing one; every
compile it made is listed in the last column.

Training plans: bf16 compute over fp32 weights and Adam moments, full
rematerialisation, scanned layers, the blocked attention kernel, the loss in chunks of
1,024 positions (or the sequence), the global batch in microbatches of one sequence per
device. Mesh: experts over `expert` (gcd(E, devices)), the rest ZeRO-3 over `fsdp`;
where that leaves `fsdp` = 1 the dense weights are replicated, unless their training
state would pass a quarter of the HBM: then `expert` is halved and `fsdp` = 2 splits
them over every device.
Serving plans: bf16 weights, batch 8, a 32K context (or the model's, if shorter), one
chunk of a chunked prefill against the full KV cache and one decode step; the attention
kernel, the prefill chunk and the serving mesh rule are each row's. Searches made with
other settings are listed below each table.

Peaks marked * are arguments + outputs + temporaries - aliased bytes, from rows compiled
before the planner read the compiler's own peak; on TPU that sum overstates the peak
(Mixtral's v5p-128 step: 126.5 against 84.3 GiB), since the temporaries overlap in
time. The TPU compiler refuses a step that does not fit, so a TPU row that compiled
fits by the compiler's plan even where its starred peak says otherwise."""


if __name__ == "__main__":
  app.run(main)
