r"""Converts Hugging Face checkpoints into moe_jax runs and runs back into checkpoints.

  python experiments/convert.py --from_hf=HF_DIR --workdir=RUN_DIR [--dtype=float32]
  python experiments/convert.py --to_hf=OUT_DIR --workdir=RUN_DIR [--family=mixtral]
      [--dtype=bfloat16]

``--from_hf`` reads a Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE directory (config.json and
safetensors; pickle-based weights are refused) and writes a run directory that
``sample.py --workdir``, ``finetune.py --init_from`` and the analysis read. Its
``tokenizer.json`` is copied into the run, whose ``data.tokenizer`` then names it.

``--to_hf`` exports the latest checkpoint of a training or fine-tuning run (LoRA
adapters folded into the weights) as config.json and safetensors that transformers
loads with ``from_pretrained``, with the run's tokenizer.json when it has one. A model
with an option the family cannot express is refused with one line.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cli import fail, run_main  # pylint: disable=wrong-import-position

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def _flags(flags):
  flags.DEFINE_string("from_hf", None, "Hugging Face model directory to convert.")
  flags.DEFINE_string("to_hf", None, "Directory to export the run into.")
  flags.DEFINE_string("dtype", None, "float32 or bfloat16 (default: float32 in, the "
                      "run's parameter dtype out).")
  flags.DEFINE_string("family", None, "Family to export as (default: the one that "
                      "expresses the model).")
  flags.DEFINE_list("mesh", None, "--from_hf on a mesh: DATA,FSDP,EXPERT,MODEL axis "
                    "sizes (their product: every device of every process). Each process "
                    "reads only its devices' slices of the checkpoint and writes them; "
                    "the run records the mesh. Default: one device.")


def _mesh(sizes):
  """The mesh of ``--mesh=DATA,FSDP,EXPERT,MODEL`` and its config keys."""
  import jax  # pylint: disable=import-outside-toplevel
  from moe_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  try:
    data, fsdp, expert, model = (int(v) for v in sizes)
  except ValueError:
    fail(f"--mesh={','.join(sizes)!r} must be four integers DATA,FSDP,EXPERT,MODEL.")
  if min(data, fsdp, expert, model) < 1 or data * fsdp * expert * model != (
      jax.device_count()):
    fail(f"--mesh={','.join(sizes)}: the product of the axes must be the "
         f"{jax.device_count()} devices, each axis >= 1.")
  mesh = sharding.make_mesh(data, expert, model, fsdp=fsdp)
  return mesh, {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert,
                "mesh.model": model}


def _copy_tokenizer(tokenizer_json: str, dst_dir: str) -> None:
  """Copies ``tokenizer_json`` into ``dst_dir`` as tokenizer.json, and the other
  :data:`TOKENIZER_FILES` beside it, each where it exists."""
  if os.path.isfile(tokenizer_json):
    shutil.copy(tokenizer_json, os.path.join(dst_dir, "tokenizer.json"))
  for name in TOKENIZER_FILES[1:]:
    src = os.path.join(os.path.dirname(tokenizer_json), name)
    if os.path.isfile(src):
      shutil.copy(src, dst_dir)


def main(_, workdir):
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if bool(f.from_hf) == bool(f.to_hf):
    fail("pass exactly one of --from_hf=HF_DIR (into --workdir) or --to_hf=OUT_DIR "
         "(from --workdir).")
  if f.dtype not in (None, "float32", "bfloat16"):
    fail(f"--dtype={f.dtype!r} is not a model dtype; use float32 or bfloat16.")
  from moe_jax.interop import hf, run_dir, safetensors_io  # pylint: disable=import-outside-toplevel
  from moe_jax.interop.hf_tensors import ConversionError  # pylint: disable=import-outside-toplevel
  try:
    if f.from_hf:
      mesh, overrides = None, None
      if f.mesh:
        mesh, overrides = _mesh(f.mesh)
      model, config = hf.load(f.from_hf, f.dtype or "float32", mesh=mesh,
                              overrides=overrides)
      if os.path.isfile(os.path.join(f.from_hf, "tokenizer.json")):
        config.data.tokenizer = "hf:tokenizer.json"  # resolved against the run
      path = run_dir.write_run(model, config, workdir, mesh=mesh)
      _copy_tokenizer(os.path.join(f.from_hf, "tokenizer.json"), path)
      print(f"{f.from_hf} -> {path} ({config.model.num_layers} blocks, "
            f"{config.moe.num_experts} experts, top-{config.moe.top_k})")
    else:
      model, config, step = run_dir.read_run(workdir)
      family = hf.save(model, config, f.to_hf, family=f.family, dtype=f.dtype)
      # The run's tokenizer.json (a fine-tuning run names its base run's) and the
      # files beside it.
      from moe_jax.data.tokenizer import resolve_tokenizer_path  # pylint: disable=import-outside-toplevel
      scheme, path = resolve_tokenizer_path(config.data.get("tokenizer", "byte"),
                                            base_dir=workdir)
      if scheme == "hf" and path:
        _copy_tokenizer(path, f.to_hf)
      print(f"{workdir} (step {step}) -> {f.to_hf} ({family.model_type})")
  except (ConversionError, safetensors_io.CheckpointError) as e:
    fail(str(e))


if __name__ == "__main__":
  run_main(main, needs_config=False, extra_flags=_flags)
