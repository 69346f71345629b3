"""moe_jax.analysis: the read-outs the notebooks rely on, on cases small enough to check
by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import MoeConfig, MoeLayer, analysis


# ------------------------------------------------------------------------------------
# capacity_sweep
# ------------------------------------------------------------------------------------


def test_capacity_sweep_counts_overflow_of_one_popular_expert():
  # S=4 tokens, E=2 experts, every token prefers e0 with p = e^2 / (e^2 + 1) = 0.881.
  # C = ceil(cf * 4 / 2): cf 0.5 -> 1 slot (3 of 4 dropped), cf 1 -> 2 (2 dropped),
  # cf 2 -> 4 (none dropped). Kept gate mass is kept tokens / 4, all gates being equal.
  logits = jnp.array([[[2.0, 0.0]] * 4])
  res = analysis.capacity_sweep(logits, [0.5, 1.0, 2.0], top_k=1, min_capacity=1)
  np.testing.assert_array_equal(res["capacity"], [1, 2, 4])
  np.testing.assert_allclose(res["dropped_fraction"], [0.75, 0.5, 0.0])
  np.testing.assert_allclose(res["kept_gate_mass"], [0.25, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(res["second_kept_fraction"], [0.0, 0.0, 0.0])


def test_capacity_sweep_top2_second_choices_use_leftover_slots():
  # Same tokens, top-2: every second choice is e1, queued after all first choices.
  # cf 1 -> C=2: e0 keeps t0,t1; e1 keeps the second choices of t0,t1 -> t2,t3 dropped
  # entirely, 2 of 4 second choices kept.
  logits = jnp.array([[[2.0, 0.0]] * 4])
  res = analysis.capacity_sweep(logits, [1.0], top_k=2, min_capacity=1)
  np.testing.assert_allclose(res["dropped_fraction"], [0.5])
  np.testing.assert_allclose(res["second_kept_fraction"], [0.5])


# ------------------------------------------------------------------------------------
# trace_routing
# ------------------------------------------------------------------------------------


def _layer(**kw):
  base = dict(d_model=8, d_ff=16, num_experts=4, top_k=1, capacity_factor=1.0,
              eval_capacity_factor=1.0, group_size=8, min_capacity=1, init_scale=0.1,
              router_init_scale=0.1)
  base.update(kw)
  layer = MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(0))
  # A sharper router, so that capacity bites and choices are well separated.
  layer.router.kernel[...] = layer.router.kernel[...] * 20
  return layer


@nnx.jit
def _eval_call(model, x):
  return model(x, deterministic=True)


# (3, 5): 15 tokens in groups of 8, so the last group is padded.
@pytest.mark.parametrize("top_k, shape", [(1, (3, 5)), (2, (2, 8))])
def test_trace_routing_matches_the_layer(top_k, shape):
  layer = _layer(top_k=top_k)
  x = jax.random.normal(jax.random.key(1), shape + (8,))
  y_ref, aux = _eval_call(layer, x)
  tr = analysis.trace_routing(layer, x)
  assert list(tr) == [""]
  r = tr[""]
  assert r.expert_index.shape == shape + (top_k,)
  assert r.logits.shape == shape + (4,)
  # The logits are the router's on the same tokens, in [B, L] order.
  flat = x.reshape(1, -1, 8)
  logits = layer.router(flat, deterministic=True).reshape(shape + (4,))
  np.testing.assert_allclose(r.logits, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(r.top1, np.argmax(logits, -1))
  # Same routing decisions as the layer: its metrics agree with the per-token arrays.
  np.testing.assert_allclose(r.dropped.mean(), aux.metrics["dropped_fraction"], atol=1e-6)
  load = np.bincount(r.top1.ravel(), minlength=4) / r.top1.size
  np.testing.assert_allclose(load, aux.metrics["expert_load"], atol=1e-6)
  assert r.capacity == layer.capacity(8, True)
  # A dropped token's MoE output is exactly zero.
  np.testing.assert_array_equal(np.asarray(y_ref)[r.dropped], 0.0)
  assert r.dropped.any()
  # Per-token read-outs are consistent with the probabilities.
  np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(r.confidence, np.max(r.probs, -1))
  assert np.all(r.entropy >= 0) and np.all(r.entropy <= np.log(4) + 1e-5)
  np.testing.assert_array_equal(r.gates[~r.kept], 0.0)


class _TwoMoe(nnx.Module):
  """Two MoE layers with a residual in between, called like a model."""

  def __init__(self):
    self.blocks = nnx.List([_layer(num_experts=4), _layer(num_experts=2)])

  def __call__(self, x, *, deterministic=False):
    for layer in self.blocks:
      y, _ = layer(x, deterministic=deterministic)
      x = x + y
    return x


def test_trace_routing_finds_every_layer_and_leaves_the_output_alone():
  model = _TwoMoe()
  x = jax.random.normal(jax.random.key(2), (2, 8, 8))
  ref = _eval_call(model, x)
  tr = analysis.trace_routing(model, x)
  assert list(tr) == ["blocks/0", "blocks/1"]
  assert tr["blocks/0"].num_experts == 4 and tr["blocks/1"].num_experts == 2
  np.testing.assert_allclose(_eval_call(model, x), ref)


def test_trace_routing_records_jittered_logits_in_training_mode():
  layer = _layer(jitter_noise=0.5)
  x = jax.random.normal(jax.random.key(3), (2, 8, 8))
  clean = analysis.trace_routing(layer, x, deterministic=True)[""]
  again = analysis.trace_routing(layer, x, deterministic=True)[""]
  noisy = analysis.trace_routing(layer, x, deterministic=False)[""]
  np.testing.assert_array_equal(clean.logits, again.logits)
  assert not np.allclose(clean.logits, noisy.logits)


# ------------------------------------------------------------------------------------
# Labels and tables
# ------------------------------------------------------------------------------------


def test_char_labels():
  labels, names = analysis.char_labels("Ab 1.\ne")
  assert [names[i] for i in labels] == ["capital", "consonant", "space", "digit",
                                        "punctuation", "newline", "vowel"]
  # Token ids work too; special ids (>= 256) are "other".
  labels, _ = analysis.char_labels(np.array([65, 258]))
  assert [names[i] for i in labels] == ["capital", "other"]


def test_word_class_labels():
  text = "The king hath not, thou."
  labels, names = analysis.word_class_labels(text)
  assert len(labels) == len(text)
  words = ["article"] * 3 + ["space"] + ["other word"] * 4 + ["space"] \
      + ["auxiliary"] * 4 + ["space"] + ["negation"] * 3 + ["punctuation", "space"] \
      + ["pronoun"] * 4 + ["punctuation"]
  assert [names[i] for i in labels] == words


SCRIPT = """ACT I

SCENE I. A desert place.

Thunder and lightning. Enter three Witches

First Witch
When shall we three meet again
[Aside]

MACBETH
So foul and fair a day.

First Witch
Hail!

Exit Second Witch

The raven himself is hoarse
That croaks the fatal entrance

Exeunt
"""


def test_script_role_and_speaker_labels():
  roles, role_names = analysis.script_role_labels(SCRIPT)
  assert len(roles) == len(SCRIPT.encode())

  def role_at(snippet):
    return role_names[roles[SCRIPT.index(snippet)]]

  assert role_at("ACT I") == "heading"
  assert role_at("SCENE I") == "heading"
  assert role_at("Thunder") == "stage direction"
  assert role_at("First Witch") == "speaker name"
  assert role_at("When shall") == "speech"
  assert role_at("[Aside]") == "stage direction"
  assert role_at("MACBETH") == "speaker name"
  assert role_at("So foul") == "speech"
  assert role_at("Exit Second") == "stage direction"
  assert role_at("The raven") == "speech"  # the speech goes on after a direction
  assert role_at("Exeunt") == "stage direction"

  speakers, names = analysis.speaker_labels(SCRIPT, top=1)
  # First Witch speaks 31 + 5 + 59 bytes, MACBETH 24: MACBETH is one of "others".
  assert names == ("First Witch", "others")
  assert names[speakers[SCRIPT.index("When shall")]] == "First Witch"
  assert names[speakers[SCRIPT.index("Hail")]] == "First Witch"
  assert names[speakers[SCRIPT.index("That croaks")]] == "First Witch"
  assert names[speakers[SCRIPT.index("So foul")]] == "others"
  assert speakers[SCRIPT.index("MACBETH")] == -1  # the name itself is not speech
  assert speakers[SCRIPT.index("[Aside]")] == -1


def test_routing_table_and_normalize_rows():
  labels = np.array([[0, 0, 1], [1, -1, 2]])
  experts = np.array([[1, 1, 0], [2, 0, 0]])
  table = analysis.routing_table(labels, experts, 3, 3)
  np.testing.assert_array_equal(table, [[0, 2, 0], [1, 0, 1], [1, 0, 0]])
  np.testing.assert_allclose(analysis.normalize_rows(table),
                             [[0, 1, 0], [0.5, 0, 0.5], [1, 0, 0]])
  np.testing.assert_array_equal(analysis.normalize_rows(np.zeros((1, 2))), [[0, 0]])
  weighted = analysis.routing_table(labels, experts, 3, 3,
                                    weights=np.array([[1, 0, 1], [1, 1, 1]]))
  np.testing.assert_array_equal(weighted, [[0, 1, 0], [1, 0, 1], [1, 0, 0]])
  with pytest.raises(ValueError, match="same size"):
    analysis.routing_table(labels, experts[:1], 3, 3)


def test_mutual_information():
  # Label decides the expert: I = H(expert) = log 2, normalised 1.
  decided = np.array([[5, 0], [0, 5]])
  np.testing.assert_allclose(analysis.mutual_information(decided), np.log(2))
  np.testing.assert_allclose(analysis.mutual_information(decided, normalize=True), 1.0)
  # Independent label and expert: 0.
  independent = np.array([[1, 3], [2, 6]])
  np.testing.assert_allclose(analysis.mutual_information(independent), 0.0, atol=1e-12)
  # Half the tokens of label 0 go to each expert, label 1 always to expert 1:
  # p = [[1/4, 1/4], [0, 1/2]], p(e) = [1/4, 3/4], p(l) = [1/2, 1/2];
  # I = 1/4 log(1/4 / (1/8)) + 1/4 log(1/4 / (3/8)) + 1/2 log(1/2 / (3/8)).
  mixed = np.array([[1, 1], [0, 2]])
  expected = 0.25 * np.log(2) + 0.25 * np.log(2 / 3) + 0.5 * np.log(4 / 3)
  np.testing.assert_allclose(analysis.mutual_information(mixed), expected)
  assert analysis.mutual_information(np.zeros((2, 2))) == 0.0


def test_load_history():
  rows = [
      {"split": "train", "step": 10, "expert_load": {"layer_1": [0.5, 0.5],
                                                     "layer_3": [1.0, 0.0]}},
      {"split": "train", "step": 20, "expert_load": {"layer_1": [0.25, 0.75],
                                                     "layer_3": [0.5, 0.5]}},
      {"split": "train", "step": 30, "loss": 1.0},  # no loads: skipped
  ]
  steps, loads = analysis.load_history(rows)
  np.testing.assert_array_equal(steps, [10, 20])
  assert list(loads) == ["layer_1", "layer_3"]
  np.testing.assert_array_equal(loads["layer_1"], [[0.5, 0.5], [0.25, 0.75]])


# ------------------------------------------------------------------------------------
# Placement and memory (8 fake CPU devices, see conftest.py)
# ------------------------------------------------------------------------------------


def _mesh(shape, names):
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return jax.sharding.Mesh(devices, names)


def test_experts_by_device_reads_the_shards():
  mesh = _mesh((2, 4), ("data", "expert"))
  # E=8 experts over an expert axis of 4: device (d, x) holds experts 2x, 2x+1.
  arr = jax.device_put(jnp.zeros((8, 3, 5)), NamedSharding(mesh, P("expert")))
  placement = analysis.experts_by_device(arr)
  for (d, x), device in np.ndenumerate(mesh.devices):
    assert placement[device] == [2 * x, 2 * x + 1]
  # Replicated: every device holds every expert.
  arr = jax.device_put(jnp.zeros((4, 3)), NamedSharding(mesh, P()))
  assert all(v == [0, 1, 2, 3] for v in analysis.experts_by_device(arr).values())


def test_placed_bytes_per_device():
  mesh = _mesh((2, 4), ("data", "expert"))

  class Two(nnx.Module):

    def __init__(self):
      self.split = nnx.Param(jax.device_put(jnp.zeros((8, 4)),
                                            NamedSharding(mesh, P("expert"))))
      self.replicated = nnx.Param(jax.device_put(jnp.zeros((3,)),
                                                 NamedSharding(mesh, P())))

  got = analysis.placed_bytes_per_device(Two())
  # 8*4 floats split 4 ways = 32 bytes, plus 3 replicated floats = 12 bytes.
  assert len(got) == 8 and set(got.values()) == {32 + 12}


# ------------------------------------------------------------------------------------
# Collectives and the cost model
# ------------------------------------------------------------------------------------

HLO = """
ENTRY %main {
  %all-gather.3 = f32[8,16,16]{2,1,0} all-gather(%bitcast.23), channel_id=4, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(f)/GSEC,GSM->EGCM/dot_general" stack_frame_id=54}
  %all-to-all.1 = (f32[2,1,1,2,4,16]{5,4,3,2,1,0}, f32[2,1,1,2,4,16]{5,4,3,2,1,0}, f32[2,1,1,2,4,16]{5,4,3,2,1,0}, f32[2,1,1,2,4,16]{5,4,3,2,1,0}) all-to-all(%a, %b, %c, %d), channel_id=5, replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4,'axis_3'=1,'axis_4'=1] {'axis_2'}, metadata={op_name="jit(f)/GSEC,EGCM->GSM/dot_general" stack_frame_id=67}
  %get-tuple-element.2 = f32[2,1,1,2,4,16]{5,4,3,2,1,0} get-tuple-element(%all-to-all.1), index=0
  %all-reduce = bf16[10]{0} all-reduce(%x), channel_id=6, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %all-to-all.7 = (f32[1,2,3]{2,1,0}, f32[1,2,3]{2,1,0}) all-to-all(%p, %q), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] , device_ids=([2,4]T(1,0)) {'axis_1'}, metadata={op_name="jit(f)/sharding_constraint"}
  ROOT %all-to-all-start.2 = f32[4,6]{1,0} all-to-all-start(%y), replica_groups=[4,2]<=[8], dimensions={0}
  %all-to-all-done.2 = f32[4,6]{1,0} all-to-all-done(%all-to-all-start.2)
}
"""


def test_hlo_collectives_parses_ops_shapes_groups_and_sources():
  ops = analysis.hlo_collectives(HLO)
  assert [(c.name, c.op, c.group_size) for c in ops] == [
      ("all-gather.3", "all-gather", 4),
      ("all-to-all.1", "all-to-all", 4),
      ("all-reduce", "all-reduce", 2),
      ("all-to-all.7", "all-to-all", 2),
      ("all-to-all-start.2", "all-to-all", 2),
  ]
  gather, a2a, reduce, _, started = ops
  assert gather.shapes == (("f32", (8, 16, 16)),)
  assert gather.source == "jit(f)/GSEC,GSM->EGCM/dot_general"
  assert gather.result_bytes == 8 * 16 * 16 * 4
  assert gather.bytes_sent == 8 * 16 * 16 * 4 * 3 / 4
  # Four tuple elements of 2*2*4*16 floats; 3 of the 4 chunks leave the device.
  assert a2a.result_bytes == 4 * 2 * 2 * 4 * 16 * 4
  assert a2a.bytes_sent == a2a.result_bytes * 3 / 4
  assert "EGCM->GSM" in a2a.source
  assert reduce.result_bytes == 20 and reduce.bytes_sent == 20.0  # 2 * (2-1)/2 * 20
  assert started.result_bytes == 96


def test_moe_comm_bytes():
  # 64 tokens per device in groups of S=32 (G_d=2), E=8, cf=1: C = ceil(32/8) = 4.
  # Buffers [E, G_d, C, M] = 8*2*4*16 floats = 4096 bytes; 3/4 go to the other 3
  # devices of an expert axis of 4: 3072 bytes each way.
  got = analysis.moe_comm_bytes(tokens_per_device=64, d_model=16, num_experts=8,
                                expert_axis=4, group_size=32, capacity_factor=1.0)
  assert got["capacity"] == 4
  assert got["dispatch"] == got["combine"] == 3072
  assert got["total"] == 6144
  # Lower bound, top-1: 64 tokens * 16 floats * 3/4, both ways.
  assert got["routed_total"] == 2 * 64 * 16 * 4 * 3 / 4
  top2 = analysis.moe_comm_bytes(tokens_per_device=64, d_model=16, num_experts=8,
                                 expert_axis=4, group_size=32, capacity_factor=2.0,
                                 top_k=2)
  assert top2["total"] == 2 * got["total"]
  assert top2["routed_total"] == 2 * got["routed_total"]
  # No expert parallelism: nothing leaves the device.
  assert analysis.moe_comm_bytes(tokens_per_device=64, d_model=16, num_experts=8,
                                 expert_axis=1, group_size=32,
                                 capacity_factor=1.0)["total"] == 0
  with pytest.raises(ValueError, match="group_size"):
    analysis.moe_comm_bytes(tokens_per_device=60, d_model=16, num_experts=8,
                            expert_axis=4, group_size=32, capacity_factor=1.0)


def test_planned_bytes_per_device_matches_the_placed_model():
  from moe_jax.parallel import sharding
  from moe_jax.models import param_sharding

  cfg = MoeConfig(d_model=8, d_ff=16, num_experts=8, group_size=8,
                  capacity_factor=1.0, init_scale=0.1, router_init_scale=0.1)
  mesh = sharding.make_mesh(data=2, expert=4)
  # Experts wi [8, 8, 16] and wo [8, 16, 8]: 2048 floats split over expert=4 -> 2048
  # bytes per device; the router [8, 8] is replicated: 256 bytes.
  abstract = nnx.eval_shape(lambda: MoeLayer(cfg, rngs=nnx.Rngs(0)))
  planned = analysis.planned_bytes_per_device(abstract, mesh)
  assert planned == {"experts": 2048, "other": 256, "total": 2304}
  layer = param_sharding.shard_model(MoeLayer(cfg, rngs=nnx.Rngs(0)), mesh)
  placed = analysis.placed_bytes_per_device(layer)
  assert set(placed.values()) == {2304} and len(placed) == 8
  for device, experts in analysis.experts_by_device(layer).items():
    x = np.argwhere(mesh.devices == device)[0][mesh.axis_names.index("expert")]
    assert experts == [2 * x, 2 * x + 1]
  # With fsdp=2 too the experts are halved again (M over fsdp) and the router, not an
  # expert's weight, is split over fsdp*expert = 8 (ZeRO-3 over every data-parallel
  # device): 2048 / 2 + 256 / 8 bytes, planned as placed.
  mesh = sharding.make_mesh(expert=4, fsdp=2)
  assert analysis.planned_bytes_per_device(abstract, mesh)["total"] == 1024 + 32
  layer = param_sharding.shard_model(MoeLayer(cfg, rngs=nnx.Rngs(0)), mesh)
  assert set(analysis.placed_bytes_per_device(layer).values()) == {1024 + 32}
