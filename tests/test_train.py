"""End-to-end tests of the training loop on tiny models and the real corpus.

Compilation dominates, so one module-scoped 20-step run serves several tests (loss goes
down, metrics.jsonl schema, TensorBoard files, sampling), and the others use the same
tiny shapes.
"""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache as jax_cc

from moe_jax.training import build, run_state, train
from moe_jax.models import sizes
from moe_jax.training.checkpoint import Checkpointer
from moe_jax.training.config import default_config, set_keys
from moe_jax.errors import TrainingError
from moe_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hang guards only, far above what a loaded two-core machine needs; never a deadline.
HANG_GUARD_S = 900
CONFIGS = os.path.join(ROOT, "experiments", "configs")

# Overrides that make any experiment config tiny (also used on the command line).
TINY = {
    "steps": 20, "log_every": 5, "eval_every": 10, "eval_steps": 2,
    "checkpoint_every": 10, "warmup_steps": 2, "learning_rate": 3e-3,
    "batch_size": 4, "progress_bar": False,
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
    "model.d_ff": 64, "moe.num_experts": 4, "moe.group_size": 64,
    "data.seq_len": 32, "sample.length": 16,
}


def tiny_config(**overrides):
  """switch_small shrunk to 2 blocks of width 32 (one MoE block, 4 experts)."""
  config = default_config()
  config.model.moe_every = 2
  set_keys(config, {**TINY, **overrides})
  return config


def cli_overrides(**overrides):
  return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


@pytest.fixture(scope="module", autouse=True)
def jit_cache(tmp_path_factory):
  """A persistent compilation cache for this module only, empty when it starts.

  Every train_and_evaluate call builds fresh jitted closures, so without it each run
  (and each command-line subprocess) compiles the same tiny model again. The cache
  changes compile time only; it starts cold in every session, so no outcome can depend
  on an earlier one. Yields the environment for subprocesses that share it.
  """
  path = str(tmp_path_factory.mktemp("jit_cache"))
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax_cc.reset_cache()  # the cache is set up once per process; take the new path
  yield {**os.environ, "JAX_COMPILATION_CACHE_DIR": path,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  jax_cc.reset_cache()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, jit_cache):
  del jit_cache  # set up first
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def test_tiny_run_lowers_the_loss(tiny_run):
  workdir, summary = tiny_run
  losses = [r["loss"] for r in read_metrics(workdir, "train")]
  assert [r["step"] for r in read_metrics(workdir, "train")] == [5, 10, 15, 20]
  assert losses[-1] < losses[0] - 0.5, losses
  evals = read_metrics(workdir, "eval")
  assert [r["step"] for r in evals] == [10, 20]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert summary["step"] == 20 and not summary["preempted"]
  assert summary["sample"].startswith("ROMEO:")


def test_metrics_jsonl_schema(tiny_run):
  workdir, _ = tiny_run
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if r["split"] == "train"]
  eval_rows = [r for r in rows if r["split"] == "eval"]
  assert len(train_rows) + len(eval_rows) == len(rows)
  for r in train_rows:
    for key in ("step", "loss", "aux_loss", "z_loss", "dropped_fraction",
                "tokens_per_sec", "elapsed_sec", "learning_rate"):
      assert isinstance(r[key], (int, float)), (key, r)
    # Per-layer expert load: the one MoE block is block 1; loads sum to 1.
    assert list(r["expert_load"]) == ["layer_1"]
    assert len(r["expert_load"]["layer_1"]) == 4
    assert sum(r["expert_load"]["layer_1"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= r["dropped_fraction"] <= 1.0
  # Warmup then cosine: the logged rate rises over the first steps, then falls.
  assert train_rows[0]["learning_rate"] < 3e-3
  assert train_rows[-1]["learning_rate"] < train_rows[1]["learning_rate"]
  for r in eval_rows:
    for key in ("step", "eval_loss", "eval_perplexity", "eval_bits_per_byte"):
      assert isinstance(r[key], (int, float)), (key, r)
    assert r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]), rel=1e-6)
  tb = os.path.join(workdir, "tb")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
  info = json.load(open(os.path.join(workdir, "model_info.json")))
  assert info["params_total"] > info["params_active"] > 0


def test_rerun_of_a_finished_run_resumes_and_does_nothing(tiny_run):
  workdir, _ = tiny_run
  before = read_metrics(workdir)
  summary = train.train_and_evaluate(tiny_config(**{"sample.length": 0}), workdir)
  assert summary["step"] == 20
  assert read_metrics(workdir) == before


@pytest.mark.slow
def test_sample_cli_prints_text_from_the_latest_checkpoint(tiny_run, jit_cache):
  workdir, _ = tiny_run
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sample.py"),
       f"--workdir={workdir}", "--prompt=KING:", "--length=20", "--top_k=5"],
      capture_output=True, text=True, timeout=HANG_GUARD_S, check=False, env=jit_cache)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("KING:")
  assert "step 20" in out.stderr


# Jitter and dropout on, so the per-step RNG must be restored too; the stop at step 7
# falls inside a logging interval (log_every=5) and between checkpoints.
RESUME = {"steps": 12, "eval_every": 6, "checkpoint_every": 4, "moe.jitter_noise": 0.01,
          "model.dropout": 0.1, "sample.length": 0}


def assert_resume_is_exact(make_config, tmp_path):
  """A run stopped at step 7 and resumed logs exactly what an uninterrupted run logs.

  ``make_config()`` returns a fresh config of the run each time it is called.
  """
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train.train_and_evaluate(make_config(), full)
  first = train.train_and_evaluate(make_config(), split, stop_at_step=7)
  assert first["preempted"] and first["step"] == 7
  assert Checkpointer(os.path.join(split, "checkpoints"), keep=3).latest_step() == 7
  train.train_and_evaluate(make_config(), split)

  def losses(workdir):
    return [(r["split"], r["step"], r.get("loss"), r.get("aux_loss"), r.get("eval_loss"))
            for r in read_metrics(workdir)]

  assert losses(split) == losses(full)  # exactly equal, step for step


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
  assert_resume_is_exact(lambda: tiny_config(**RESUME), tmp_path)


def _nan_after(step):
  """An optax transformation that turns the updates of update ``step`` into NaN."""
  def init(params):
    del params
    return jnp.zeros((), jnp.int32)

  def update(updates, count, params=None):
    del params
    poison = jnp.where(count + 1 >= step, jnp.nan, 1.0)
    return jax.tree.map(lambda u: u * poison, updates), count + 1
  return optax.GradientTransformation(init, update)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    tmp_path, monkeypatch):
  make_optimizer = build.make_optimizer

  def poisoned(config):
    tx, schedule = make_optimizer(config)
    return optax.chain(tx, _nan_after(5)), schedule

  monkeypatch.setattr(train, "make_optimizer", poisoned)
  workdir = str(tmp_path)
  with pytest.raises(TrainingError, match=r"Non-finite loss at step 5\b.*step 4"):
    train.train_and_evaluate(tiny_config(checkpoint_every=2, steps=10), workdir)
  assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).all_steps() == [2, 4]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, jit_cache):
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       f"--config={os.path.join(CONFIGS, 'switch_small.py')}", f"--workdir={workdir}",
       *cli_overrides(steps=100000, checkpoint_every=100000, eval_every=100000,
                      log_every=1)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=jit_cache)
  metrics = os.path.join(workdir, "metrics.jsonl")
  # Wait for the first logged step (training has started), however long it takes.
  give_up = time.time() + HANG_GUARD_S
  while not os.path.exists(metrics) and time.time() < give_up and proc.poll() is None:
    time.sleep(0.5)
  if not os.path.exists(metrics) or proc.poll() is not None:
    if proc.poll() is None:
      proc.kill()  # hung
    _, err = proc.communicate()
    pytest.fail(f"no training step was logged (exit {proc.returncode}): {err[-3000:]}")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=HANG_GUARD_S)
  assert proc.returncode == 0, err
  assert "Preempted (SIGTERM)" in out
  steps = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).all_steps()
  assert len(steps) == 1 and steps[0] >= 1


@pytest.mark.slow
def test_stop_at_step_flag_stops_on_the_full_schedule_and_resumes(tmp_path, jit_cache):
  # steps=8, log and eval every 2: --stop_at_step=4 trains steps 1-4 of the 8-step
  # schedule (the logged learning rate at step 4 is the 8-step one), saves step 4 and
  # exits 0; the same command without the flag resumes to 8.
  workdir = str(tmp_path)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
         f"--config={os.path.join(CONFIGS, 'switch_small.py')}", f"--workdir={workdir}",
         *cli_overrides(steps=8, log_every=2, eval_every=2, checkpoint_every=100,
                        warmup_steps=2, **{"sample.length": 0})]
  proc = subprocess.run(cmd + ["--stop_at_step=4"], capture_output=True, text=True,
                        env=jit_cache, timeout=HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Stopped early: saved the checkpoint at step 4" in proc.stdout
  assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).all_steps() == [4]
  train_rows = read_metrics(workdir, "train")
  assert [r["step"] for r in train_rows] == [2, 4]
  assert [r["step"] for r in read_metrics(workdir, "eval")] == [2, 4]
  _, schedule = build.make_optimizer(tiny_config(steps=8, warmup_steps=2))
  assert train_rows[-1]["learning_rate"] == pytest.approx(float(schedule(3)), rel=1e-6)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=jit_cache,
                        timeout=HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [r["step"] for r in read_metrics(workdir, "train")] == [2, 4, 6, 8]
  bad = subprocess.run(cmd + ["--stop_at_step=0"], capture_output=True, text=True,
                       env=jit_cache, timeout=HANG_GUARD_S)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "stop_at_step" in bad.stderr


def _flops_and_params(**configs):
  """``{name: (flops_per_token, count_params)}`` of experiments/configs/FILE.py for
  each ``name=FILE``, at dense_small's sequence length; shapes only."""
  sys.path.insert(0, CONFIGS)
  try:
    modules = {n: importlib.import_module(f) for n, f in configs.items()}
    seq_len = importlib.import_module("dense_small").get_config().data.seq_len
  finally:
    sys.path.remove(CONFIGS)
  out = {}
  for name, module in modules.items():
    config = module.get_config()
    model = nnx.eval_shape(lambda c=config: build.make_model(c))  # shapes only
    out[name] = (sizes.flops_per_token(model, seq_len), sizes.count_params(model))
  return out


def test_dense_and_switch_configs_have_equal_active_flops():
  sizes = _flops_and_params(dense="dense_small", switch="switch_small",
                            top2="top2_small")
  (dense_f, dense_p), (switch_f, switch_p), (top2_f, _) = (
      sizes["dense"], sizes["switch"], sizes["top2"])
  assert switch_f["active"] == dense_f["active"]
  assert switch_f["total"] > 2 * dense_f["total"]
  assert switch_f["router"] < 0.01 * switch_f["active"]
  # Active parameters differ only by the router.
  assert switch_p["active"] - dense_p["active"] == switch_p["router"]
  assert switch_p["total"] > 3 * dense_p["total"]
  assert top2_f["active"] > switch_f["active"]


def test_mesh_run_matches_single_device(tmp_path):
  # 2 x 2 (data x expert) of the 8 test devices: the batch of 4 splits over 4
  # data-parallel shards, the 4 experts over 2 expert shards (G = 128 / 32 = 4 groups).
  overrides = {"steps": 4, "log_every": 1, "eval_every": 4, "eval_steps": 1,
               "checkpoint_every": 4, "moe.group_size": 32, "sample.length": 0}
  single, meshed = str(tmp_path / "single"), str(tmp_path / "mesh")
  train.train_and_evaluate(tiny_config(**overrides), single)
  train.train_and_evaluate(tiny_config(**overrides, **{"mesh.data": 2,
                                                       "mesh.expert": 2}), meshed)
  a = [r.get("loss", r.get("eval_loss")) for r in read_metrics(single)]
  b = [r.get("loss", r.get("eval_loss")) for r in read_metrics(meshed)]
  np.testing.assert_allclose(a, b, rtol=2e-5)


# ---------------------------------------------------------------------------------
# Router zoo: the paper configs train; the selection bias is updated, checkpointed,
# resumed and identical on a mesh.
# ---------------------------------------------------------------------------------

def _zoo_config(name, **overrides):
  """An experiment config shrunk by TINY; deepseek keeps its 4 fine-grained experts
  per dense width and one group per sequence."""
  sys.path.insert(0, CONFIGS)
  try:
    config = __import__(name).get_config()
  finally:
    sys.path.remove(CONFIGS)
  tiny = dict(TINY, **{"sample.length": 0})
  if name == "deepseek_small":
    tiny.update({"moe.num_experts": 8, "moe.d_ff": 16, "moe.group_size": 32})
  set_keys(config, {**tiny, **overrides})
  return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral_small", "deepseek_small", "noisy_topk_small"])
def test_router_zoo_configs_train(name, tmp_path):
  config = _zoo_config(name, steps=4, log_every=2, eval_every=4, checkpoint_every=4)
  summary = train.train_and_evaluate(config, str(tmp_path))
  rows = read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["aux_loss"]) for r in rows)
  assert np.isfinite(summary["eval"]["eval_loss"])
  model, _, step = run_state.load_model(str(tmp_path))
  assert step == 4
  layer = model.blocks[1].ffn
  if name == "deepseek_small":
    # 4 bias updates of +-1e-3 from 0: every entry a multiple of 1e-3 in [-4e-3, 4e-3].
    bias = np.asarray(layer.selection_bias[...])
    assert np.any(bias != 0) and np.all(np.abs(bias) <= 4e-3 + 1e-9)
    np.testing.assert_allclose(bias / 1e-3, np.round(bias / 1e-3), atol=1e-3)
    assert layer.shared_experts is not None
  if name == "noisy_topk_small":  # W_noise starts at 0 and learns
    assert float(jnp.abs(layer.router.noise_kernel[...]).sum()) > 0


def _bias_config(**overrides):
  """Tiny switch-like model with DeepSeek routing and a fast-moving selection bias."""
  return tiny_config(**{"moe.top_k": 2, "moe.score_fn": "sigmoid", "moe.z_loss_coef": 0.0,
                        "moe.bias_update_rate": 0.01, "moe.balance_choices": "all",
                        "moe.group_size": 32, "sample.length": 0, **overrides})


def test_train_step_updates_the_bias_by_the_rule_after_the_optimizer_step():
  config = _bias_config()
  model = build.make_model(config)
  tx, _ = build.make_optimizer(config)
  _, params, _ = run_state.split_model(model)
  state = run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)),
                           model_state=run_state.model_state(model))
  assert "selection_bias" not in str(jax.tree_util.tree_structure(state.params))
  tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  # No jitter, noise or dropout: the training forward pass is a function of the
  # parameters, so the step's choice counts can be recomputed here.
  _, moe_aux = model(batch["inputs"], deterministic=False)
  counts = moe_aux[1].metrics["choice_counts"]
  assert float(counts.sum()) == 4 * 32 * 2  # every valid token's two choices
  new_state, _ = train.make_train_step(model, tx, config)(state, batch)
  bias = new_state.model_state["blocks"][1]["ffn"]["selection_bias"]
  expected = 0.01 * np.sign(np.mean(counts) - np.asarray(counts))
  np.testing.assert_array_equal(np.asarray(bias), expected.astype(np.float32))
  # Not a parameter: the optimizer's state has no entry for it.
  assert "selection_bias" not in str(jax.tree_util.tree_structure(new_state.opt_state))


def test_selection_bias_survives_a_resume_bit_for_bit(tmp_path):
  overrides = {"steps": 6, "log_every": 1, "eval_every": 6, "checkpoint_every": 6}
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train.train_and_evaluate(_bias_config(**overrides), full)
  train.train_and_evaluate(_bias_config(**overrides), split, stop_at_step=3)
  mid, _, step = run_state.load_model(split)
  assert step == 3
  mid_bias = np.asarray(mid.blocks[1].ffn.selection_bias[...])
  assert np.any(mid_bias != 0)
  train.train_and_evaluate(_bias_config(**overrides), split)
  a, _, _ = run_state.load_model(full)
  b, _, _ = run_state.load_model(split)
  bias_a = np.asarray(a.blocks[1].ffn.selection_bias[...])
  bias_b = np.asarray(b.blocks[1].ffn.selection_bias[...])
  assert bias_a.tobytes() == bias_b.tobytes()
  assert not np.array_equal(bias_a, mid_bias)  # it kept moving after the resume
  assert ([r["loss"] for r in read_metrics(split, "train")]
          == [r["loss"] for r in read_metrics(full, "train")])


def test_selection_bias_is_identical_on_a_mesh(tmp_path):
  # 2 x 2 (data x expert): the choice counts are sums of whole numbers, exact in
  # float32 however the batch is split, so the biases agree bit for bit.
  overrides = {"steps": 4, "log_every": 1, "eval_every": 4, "eval_steps": 1,
               "checkpoint_every": 4}
  single, meshed = str(tmp_path / "single"), str(tmp_path / "mesh")
  train.train_and_evaluate(_bias_config(**overrides), single)
  train.train_and_evaluate(_bias_config(**overrides, **{"mesh.data": 2,
                                                        "mesh.expert": 2}), meshed)
  a, _, _ = run_state.load_model(single)
  b, _, _ = run_state.load_model(meshed)
  bias_a = np.asarray(a.blocks[1].ffn.selection_bias[...])
  assert np.any(bias_a != 0)
  assert bias_a.tobytes() == np.asarray(b.blocks[1].ffn.selection_bias[...]).tobytes()
  np.testing.assert_allclose([r["loss"] for r in read_metrics(meshed, "train")],
                             [r["loss"] for r in read_metrics(single, "train")],
                             rtol=2e-5)


def test_deepseek_config_has_the_active_ffn_flops_of_dense():
  out = _flops_and_params(dense="dense_small", deepseek="deepseek_small",
                          switch="switch_small")
  (dense_f, dense_p), (ds_f, ds_p), (sw_f, sw_p) = out["dense"], out["deepseek"], \
      out["switch"]
  # 3 routed experts + 1 shared, each of width 1024 / 4: the dense FFN's 1024.
  assert ds_f["active"] == dense_f["active"]
  assert ds_p["active"] - dense_p["active"] == ds_p["router"]
  # 32 routed experts of width 256 hold as many weights as switch's 8 of 1024; the
  # shared expert adds one more quarter-width FFN (wi [256, 256], wo [256, 256]) per
  # MoE block (2 blocks).
  shared = 2 * (256 * 256 + 256 * 256)
  assert ds_p["experts"] == sw_p["experts"]
  assert ds_p["total"] - sw_p["total"] == shared + ds_p["router"] - sw_p["router"]


def test_checkpoints_without_model_state_still_restore(tmp_path):
  # A model without selection biases saves the TrainState layout that every checkpoint
  # had before model_state existed, so runs saved then still resume.
  import flax.struct  # pylint: disable=import-outside-toplevel

  @flax.struct.dataclass
  class TrainState:  # the layout before model_state
    step: jax.Array
    params: dict
    opt_state: dict
    rng: jax.Array

  def make(cls, **kw):
    return cls(step=jnp.asarray(3, jnp.int32), params={"w": jnp.arange(3.0)},
               opt_state={"m": jnp.ones(3)}, rng=jnp.zeros(2, jnp.uint32), **kw)

  checkpointer = Checkpointer(str(tmp_path), keep=2)
  checkpointer.save(3, make(TrainState))
  abstract = jax.eval_shape(lambda: make(run_state.TrainState))
  step, saved, _ = checkpointer.restore(run_state.to_checkpoint(abstract))
  state = run_state.from_checkpoint(saved)
  assert step == 3 and state.model_state == {}
  np.testing.assert_array_equal(state.params["w"], [0.0, 1.0, 2.0])
  # With biases, the state is saved as it is and comes back with them.
  biased = make(run_state.TrainState, model_state={"b": jnp.full(4, 0.5)})
  checkpointer.save(4, run_state.to_checkpoint(biased))
  _, saved, _ = checkpointer.restore(jax.eval_shape(lambda: biased))
  np.testing.assert_array_equal(saved.model_state["b"], np.full(4, 0.5))
  # run_state.restore reads each checkpoint in the layout it was saved in: the state
  # of a model with biases restores from a checkpoint without them (a fine-tuning run
  # saved before fine-tuning moved them) with an empty model_state (the step then
  # starts from the model's own biases), and from one with them as it was saved.
  step, state, _ = run_state.restore(checkpointer, jax.eval_shape(lambda: biased))
  assert step == 4
  np.testing.assert_array_equal(state.model_state["b"], np.full(4, 0.5))
  checkpointer.manager.delete(4)
  step, state, _ = run_state.restore(checkpointer, jax.eval_shape(lambda: biased))
  assert step == 3 and state.model_state == {}
  np.testing.assert_array_equal(state.params["w"], [0.0, 1.0, 2.0])
  assert checkpointer.all_steps() == [3]  # nothing was set aside as unreadable
  checkpointer.close()


# ---------------------------------------------------------------------------------
# Jamba: hybrid Mamba + attention blocks (experiments/configs/jamba_small.py).
# ---------------------------------------------------------------------------------

# jamba_small's pattern in 4 blocks (period 4, offset 2; its MoE every 2, offset 1):
# Mamba, Mamba + MoE, attention, Mamba + MoE. A scan chunk of 8 of the 32 tokens.
JAMBA_TINY = {"model.num_layers": 4, "model.attn_layer_period": 4,
              "model.attn_layer_offset": 2, "mamba.chunk_size": 8}


def test_weight_decay_skips_mamba_a_log_and_d():
  # Block 0 is Mamba (period 2, offset 1: block 1 is attention).
  config = tiny_config(**{"model.attn_layer_period": 2, "model.attn_layer_offset": 1,
                          "weight_decay": 0.5, "warmup_steps": 0, "grad_clip": 0.0})
  model = nnx.eval_shape(lambda: build.make_model(config))  # the parameter tree only
  _, params, _ = run_state.split_model(model)
  params = jax.tree.map(lambda p: jnp.full(p.shape, 2.0, p.dtype), params)
  tx, schedule = build.make_optimizer(config)
  lr = float(schedule(0))
  assert lr > 0
  # AdamW with zero gradients: Adam's moments stay 0, so each update is exactly
  # -lr * weight_decay * w where decay applies and 0 where it does not.
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params),
                                  tx.init(params), params)
  mamba_u, mamba_w = updates["blocks"][0]["mamba"], params["blocks"][0]["mamba"]
  # Mamba's _no_weight_decay (A_log [D_in, N] is a matrix, still exempt), the biases
  # and the RMSNorm scales are not decayed; the projections and the conv kernel are.
  kept = {"A_log", "D", "conv_bias", "dt_bias", "dt_norm", "b_norm", "c_norm"}
  decayed = {"in_proj", "conv_kernel", "x_proj", "dt_proj", "out_proj"}
  assert set(mamba_w.keys()) == kept | decayed
  for name in kept:
    assert not np.any(np.asarray(mamba_u[name])), name
  for name in decayed:
    np.testing.assert_allclose(np.asarray(mamba_u[name]),
                               -lr * 0.5 * np.asarray(mamba_w[name]), rtol=1e-6,
                               err_msg=name)
  # The attention block keeps the old rule: matrices decayed.
  np.testing.assert_allclose(np.asarray(updates["blocks"][1]["attn"]["query"]),
                             -lr * 0.5 * np.asarray(params["blocks"][1]["attn"]["query"]),
                             rtol=1e-6)


@pytest.mark.slow
def test_jamba_small_resumes_exactly(tmp_path):
  assert_resume_is_exact(lambda: _zoo_config("jamba_small", **RESUME, **JAMBA_TINY),
                         tmp_path)
  with open(tmp_path / "full" / "model_info.json", encoding="utf-8") as f:
    info = json.load(f)
  assert (info["mamba_blocks"], info["moe_blocks"]) == ([0, 1, 3], [1, 3])


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_training_loss_leaves_out_padding_as_the_batch_without_it(objective):
  """The differentiated loss of a padded batch (weights 0, or a masked-LM batch's
  token_mask False) equals that of the batch cut to its real tokens: CE, aux and
  z-loss, whatever the padding holds. Dropless with one routing group per sequence, so
  the cut batch routes its tokens as the padded one routes its real ones."""
  from moe_jax.training import losses  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"moe.group_size": 0, "moe.dispatch": "dropless",
                          "model.objective": objective, "sample.length": 0})
  model = build.make_model(config)
  loss = losses.training_loss(config)
  rng = np.random.default_rng(6)
  real, length = 10, 16
  tokens = rng.integers(0, 256, (2, length + 1)).astype(np.int32)
  scored = np.zeros((2, length), np.float32)  # masked LM: the picked tokens only
  scored[:, [0, 3, 7, 9]] = 1.0

  def padded(pad_value):
    t = tokens.copy()
    t[:, real + 1:] = pad_value  # padding holds anything
    batch = {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])}
    valid = np.arange(length)[None] < real
    if objective == "causal_lm":
      batch["weights"] = jnp.asarray(np.broadcast_to(valid, (2, length)), jnp.float32)
    else:
      batch["weights"] = jnp.asarray(scored * valid)
      batch["token_mask"] = jnp.asarray(np.broadcast_to(valid, (2, length)))
    return batch

  cut = {"inputs": jnp.asarray(tokens[:, :real]), "targets": jnp.asarray(
      tokens[:, 1:real + 1])}
  if objective == "masked_lm":  # without token_mask, weights > 0 would mark the tokens
    cut["weights"] = jnp.asarray(scored[:, :real])
    cut["token_mask"] = jnp.ones((2, real), bool)
  want, (want_metrics, _) = loss(model, cut)
  for pad_value in (0, 200):
    total, (metrics, _) = loss(model, padded(pad_value))
    for name in ("loss", "aux_loss", "z_loss"):
      assert float(metrics[name]) == pytest.approx(float(want_metrics[name]),
                                                   rel=1e-5), (name, pad_value)
    assert float(total) == pytest.approx(float(want), rel=1e-5)
