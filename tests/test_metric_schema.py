"""The metric schema (moe_jax/training/metric_schema.py): every key it declares for a run
is in that run's metrics.jsonl lines and no other, with hand-checked values for the
family metrics, and the docs' metrics table is the schema's."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.layers.moe_layer import MoeAux
from moe_jax.layers.router_families import ROUTERS
from moe_jax.training import loop_utils, metric_schema, train
from moe_jax.training.config import default_config, set_keys
from moe_jax.training.losses import moe_summary
from moe_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two steps of a 2-block model (one MoE block of 4 experts, groups of 64 tokens).
TINY = {
    "steps": 2, "log_every": 1, "eval_every": 2, "eval_steps": 1,
    "checkpoint_every": 2, "warmup_steps": 1, "batch_size": 4, "progress_bar": False,
    "model.moe_every": 2, "model.num_layers": 2, "model.d_model": 32,
    "model.num_heads": 2, "model.d_ff": 64, "moe.num_experts": 4,
    "moe.group_size": 64, "data.seq_len": 32, "sample.length": 0,
}
# Expert choice at capacity factor 1.3: C = ceil(1.3 * 64 / 4) = 21 tokens per expert
# and group, so E * C / S = 4 * 21 / 64 = 1.3125 experts per token (no padding).
FAMILIES = {
    "topk": {},
    "noisy_topk": {"moe.router": "noisy_topk"},
    "expert_choice": {"moe.router": "expert_choice", "moe.allow_noncausal_routing": True,
                      "moe.capacity_factor": 1.3},
    "deepseek_bias": {"moe.bias_update_rate": 0.01, "moe.score_fn": "sigmoid",
                      "moe.z_loss_coef": 0.0, "moe.top_k": 2,
                      "moe.num_shared_experts": 1, "moe.dispatch": "dropless"},
}


def tiny_config(overrides):
  config = default_config()
  set_keys(config, {**TINY, **overrides})
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``runs(family) -> (config, train rows, eval rows)`` of a 2-step run, each family
  run once per module (on first use, so ``-k`` runs only the families it picks)."""
  done = {}

  def get(name):
    if name not in done:
      config = tiny_config(FAMILIES[name])
      workdir = str(tmp_path_factory.mktemp(name))
      train.train_and_evaluate(config, workdir)
      done[name] = (config, read_metrics(workdir, "train"), read_metrics(workdir, "eval"))
    return done[name]

  return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_declared_key_is_logged(runs, family):
  config, train_rows, eval_rows = runs(family)
  assert [r["step"] for r in train_rows] == [1, 2]
  assert [r["step"] for r in eval_rows] == [2]
  for line, rows in (("train", train_rows), ("eval", eval_rows)):
    want = set(metric_schema.emitted(config, line)) | set(metric_schema.LINE_KEYS)
    for row in rows:
      assert set(row) == want, (line, row["step"], set(row) ^ want)
  for row in train_rows:  # per-layer keys by MoE block index
    assert set(row["expert_load"]) == {"layer_1"}
    assert all(math.isfinite(row[m.name]) for m in metric_schema.TRAIN
               if m.layers == "mean" and m.name in row)


def test_family_metrics_are_declared_for_their_family_only(runs):
  extras = {name: {m.name for m in spec.metrics} for name, spec in ROUTERS.items()}
  assert extras["noisy_topk"] == {"importance_cv2", "load_cv2"}
  assert extras["expert_choice"] == {"experts_per_token"}
  for family in FAMILIES:
    config, train_rows, _ = runs(family)
    others = set().union(*extras.values()) - extras[config.moe.router]
    assert not others & set(train_rows[0]), family


def test_experts_per_token_of_expert_choice(runs):
  # Every expert takes C = 21 of each group's 64 tokens: 4 * 21 / 64 per token.
  _, train_rows, _ = runs("expert_choice")
  assert [r["experts_per_token"] for r in train_rows] == [1.3125, 1.3125]


def test_noisy_cv2_terms_add_up_to_the_aux_loss(runs):
  # One MoE layer: the logged layer means of the two terms sum to the logged aux loss.
  _, train_rows, _ = runs("noisy_topk")
  for r in train_rows:
    assert r["importance_cv2"] + r["load_cv2"] == pytest.approx(r["aux_loss"],
                                                                rel=1e-5)
    assert r["importance_cv2"] > 0 and r["load_cv2"] > 0


def _cv2(x):
  return np.var(x) / (np.mean(x) ** 2 + 1e-10)


def test_importance_cv2_by_hand_through_summary_and_train_line():
  """Two layers of noise-free noisy top-2 routing on known logits: the train line's
  ``importance_cv2`` is the layer mean of the CV^2 of the summed gates per expert,
  computed here in numpy; ``experts_per_token`` of expert choice likewise."""
  rng = np.random.default_rng(0)
  num_experts, top_k = 4, 2
  aux, want = {}, []
  for block in (1, 3):
    logits = rng.normal(size=(1, 16, num_experts)).astype(np.float32)
    out = routing.noisy_top_k(jnp.asarray(logits), jnp.ones_like(logits), top_k=top_k,
                              capacity=16)
    aux[block] = MoeAux(aux_loss=out.aux_loss, z_loss=out.z_loss, metrics=out.metrics)
    top = np.argsort(-logits[0], axis=-1, kind="stable")[:, :top_k]
    chosen = np.take_along_axis(logits[0], top, axis=-1)
    gates = np.exp(chosen) / np.exp(chosen).sum(-1, keepdims=True)
    importance = np.zeros(num_experts)
    np.add.at(importance, top, gates)
    want.append(_cv2(importance))
  means = {k: np.asarray(v) for k, v in jax.device_get(moe_summary(aux)).items()}
  line = loop_utils.train_line({**means, "loss": 1.0, "grad_norm": 1.0}, (1, 3))
  assert line["importance_cv2"] == pytest.approx(np.mean(want), rel=1e-5)
  assert set(line["expert_load"]) == {"layer_1", "layer_3"}

  # Expert choice on 10 tokens of which 2 are padding, C = 3: 4 * 3 / 8 per token.
  logits = jnp.asarray(rng.normal(size=(1, 10, num_experts)), jnp.float32)
  mask = jnp.arange(10)[None] < 8
  out = routing.expert_choice(logits, capacity=3, token_mask=mask)
  summary = moe_summary({1: MoeAux(out.aux_loss, out.z_loss, out.metrics)})
  assert float(summary["experts_per_token"]) == 1.5


def test_docs_metrics_table_is_the_schema():
  with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
    docs = f.read()
  lines = docs.splitlines()
  start = lines.index(metric_schema.markdown_table().splitlines()[0])
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  assert "\n".join(lines[start:end]) + "\n" == metric_schema.markdown_table(), (
      "docs/training.md's metrics table differs from metric_schema.markdown_table()")
  names = [m.name for m in metric_schema.METRICS]
  assert len(names) == len(set(names))
