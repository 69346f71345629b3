"""The full-size configs of experiments/configs/ against their published sizes.

Each model is built abstractly (``nnx.eval_shape``: shapes only, no weight allocated,
nothing compiled) and counted by :func:`moe_jax.models.sizes.count_params` and
:func:`~moe_jax.models.sizes.flops_per_token` (at the model's context length). Tracing a
deep model's construction costs time quadratic in its depth, so the counts come from
two short models of the same widths, the pattern's unrolled prefix plus one and plus
two copies of its repeating unit (:func:`moe_jax.models.scan.find_unit`): every count
is the prefix's plus ``repeats`` times the unit's, so the full depth follows exactly
(``test_counts_from_two_short_models_equal_the_direct_count`` checks that it does).
"""

import copy
import dataclasses
import functools
import importlib.util
import os

import pytest
from flax import nnx

from moe_jax.models.scan import find_unit
from moe_jax.models.sizes import count_params, flops_per_token
from moe_jax.training import build
from moe_jax.training.config import model_pattern, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Published:
  """A model's published sizes. ``total`` and ``active`` in parameters, the embedding
  included in both as each source counts it (``active``: every weight one token uses,
  input and output embeddings included); ``active=None``: no exact figure published.
  ``context``: the model's context length (``model.max_len``). ``overrides``: config
  keys set before counting, where the published figure leaves a part out (DeepSeek-V3's
  671B is the main model, without its multi-token-prediction module)."""

  total: float
  active: float | None
  context: int
  source: str
  overrides: tuple = ()


PUBLISHED = {
    # Encoder-decoder figures; compared as 2 * ours - embedding + cross-attention
    # (see _encoder_decoder and the config's docstring). Active: T5-Base, the dense
    # model Switch-Base is FLOP-matched to.
    "switch_base_128": Published(
        7.4e9, 220e6, 512,
        "Fedus et al. 2021, Table 9 (Switch-Base-128, 7.4B); Raffel et al. 2020 "
        "(T5-Base, 220M)"),
    "glam_1_2t": Published(
        1162e9, 96.6e9, 1024,
        "Du et al. 2022, Table 4 (GLaM 64B/64E: 1.2T = 1162B total, 96.6B activated)"),
    "mixtral_8x7b": Published(
        46.7e9, 12.9e9, 32768, "Jiang et al. 2024, Sec. 2 (46.7B total, 12.9B active)"),
    # xAI publishes the total only; "25% of the weights active" is the experts' 2 of 8
    # (test_grok_1_routes_a_quarter_of_its_experts).
    "grok_1": Published(314e9, None, 8192, "xai-org/grok-1 README (314B)"),
    "deepseek_moe_16b": Published(
        16.4e9, 2.8e9, 4096, "Dai et al. 2024, Table 2 (16.4B total, 2.8B activated)"),
    "jamba_v0_1": Published(
        52e9, 12e9, 262144,
        "Lieber et al. 2024, Table 1 / Sec. 3.1 (52B available, 12B active)"),
    "olmoe_1b_7b": Published(
        6.9e9, 1.3e9, 4096, "Muennighoff et al. 2024, Table 1 (6.9B total, 1.3B active)"),
    "qwen3_30b_a3b": Published(
        30.5e9, 3.3e9, 32768, "Qwen3 report, Table 2 (30.5B total, 3.3B activated)"),
    "deepseek_v3_671b": Published(
        671e9, 37e9, 4096, "DeepSeek-V3 report, Sec. 1 and 4.2 (671B total, 37B "
        "activated, main model)", overrides=(("model.mtp_depth", 0),)),
}


def load(name):
  path = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"full_size_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def direct_counts(config, vocab_size):
  """``count_params`` and ``flops_per_token`` (over the context, keys ``flops_*``)."""
  model = nnx.eval_shape(lambda: build.make_model(config, vocab_size=vocab_size))
  flops = flops_per_token(model, config.data.seq_len)
  return {**count_params(model), **{f"flops_{k}": v for k, v in flops.items()}}


def with_layers(config, num_layers):
  short = copy.deepcopy(config)
  short.model.num_layers = num_layers
  return short


def counts(config, vocab_size):
  """``count_params`` of ``config``'s model, from two short models of its widths."""
  unit = find_unit(model_pattern(config))
  if unit is None or unit.repeats <= 2:
    return direct_counts(config, vocab_size)
  one, two = (direct_counts(with_layers(config, unit.prefix + r * unit.period), vocab_size)
              for r in (1, 2))
  return {k: one[k] + (unit.repeats - 1) * (two[k] - one[k]) for k in one}


def published_config(name):
  """The shipped config ``name`` with its :class:`Published` overrides."""
  config = load(name).get_config()
  for key, value in PUBLISHED[name].overrides:
    section, field = key.split(".")
    config[section][field] = value
  return config


@functools.lru_cache(maxsize=None)
def published_model_counts(name):
  """``counts`` of the shipped config ``name`` at its published vocabulary."""
  return counts(published_config(name), load(name).VOCAB_SIZE)


def _encoder_decoder(n, config, vocab_size):
  """A decoder-only count ``n`` as the encoder-decoder of the same stacks: two copies
  of the blocks, one (tied) embedding, plus the decoder's cross-attention (q, k, v, o
  of every decoder block)."""
  m = config.model
  embedding = vocab_size * m.d_model
  cross_attention = m.num_layers * 4 * m.d_model * m.num_heads * (
      m.head_dim or m.d_model // m.num_heads)
  return 2 * n - embedding + cross_attention


def _error(ours, published):
  return abs(ours - published) / published


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_is_valid_with_its_context_length(name):
  module = load(name)
  config = module.get_config()
  assert validate_config(config, num_devices=1) == []
  cfg = build.transformer_config(config, module.VOCAB_SIZE)
  assert (cfg.max_len, cfg.vocab_size) == (PUBLISHED[name].context, module.VOCAB_SIZE)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_and_active_match_the_published_sizes(name):
  module, published = load(name), PUBLISHED[name]
  config = published_config(name)
  n = published_model_counts(name)
  total, active = n["total"], n["active"]
  if name == "switch_base_128":
    assert config.model.tie_embeddings  # one embedding for encoder, decoder and output
    total, active = (_encoder_decoder(x, config, module.VOCAB_SIZE) for x in (total, active))
  assert _error(total, published.total) <= TOLERANCE, (
      f"{name}: total {total / 1e9:.3f}B vs published {published.total / 1e9:.3f}B "
      f"({published.source})")
  if published.active is not None:
    assert _error(active, published.active) <= TOLERANCE, (
        f"{name}: active {active / 1e9:.4f}B vs published {published.active / 1e9:.4f}B "
        f"({published.source})")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_active_flops_are_twice_the_active_weights_plus_attention(name):
  # Kaplan et al. 2020: 2 FLOPs per active weight (the input embedding's lookup is
  # free; a tied embedding is used once, as the output projection) plus 4 * L * N * D
  # per attention block for the scores and the mixing; Mamba's scan and the routers
  # (reported apart) are < 1%.
  # Multi-head latent attention's scores and mixing: 2 * L * N * (Dn + Dr + Dv).
  module = load(name)
  config = published_config(name)
  n, m = published_model_counts(name), config.model
  lookup = 0 if m.tie_embeddings else module.VOCAB_SIZE * m.d_model
  attention_blocks = sum(kind.mixer == "attention" for kind in model_pattern(config))
  context = PUBLISHED[name].context
  if m.get("mixer", "attention") == "mla":
    per_token = 2 * m.num_heads * (config.mla.qk_nope_head_dim + config.mla.qk_rope_head_dim
                                   + config.mla.v_head_dim)
  else:
    per_token = 4 * m.num_heads * (m.head_dim or m.d_model // m.num_heads)
  want = 2 * (n["active"] - lookup) + attention_blocks * context * per_token
  assert _error(n["flops_active"], want) < 0.01, (n["flops_active"], want)


def test_grok_1_routes_a_quarter_of_its_experts():
  # xAI: "25% of the weights active on a given token", i.e. 2 of the 8 experts; the
  # attention and the embedding, used by every token, come on top (26.5% in all).
  n = published_model_counts("grok_1")
  shared = n["total"] - n["experts"]
  assert n["active"] - shared == n["experts"] // 4
  assert 0.25 < n["active"] / n["total"] < 0.27


@pytest.mark.parametrize("name,num_layers", [("switch_base_128", 12),
                                             ("deepseek_moe_16b", 6)])
def test_counts_from_two_short_models_equal_the_direct_count(name, num_layers):
  # Switch: a period-2 unit (dense, MoE) repeated 6 times; DeepSeekMoE: a dense prefix
  # block, then a one-block MoE unit.
  module = load(name)
  config = with_layers(module.get_config(), num_layers)
  unit = find_unit(model_pattern(config))
  assert unit.repeats > 2 and (unit.prefix > 0) == (name == "deepseek_moe_16b")
  assert counts(config, module.VOCAB_SIZE) == direct_counts(config, module.VOCAB_SIZE)


def test_data_vocab_size_sets_the_embedding_rows():
  config = load("mixtral_8x7b").get_config()
  assert build.vocab_size_of(config) == 32000
  config.data.vocab_size = 0  # the byte tokenizer's
  assert build.vocab_size_of(config) == 259


def test_deepseek_v3_mtp_module_is_the_published_14b_less_its_copies():
  """Hugging Face's 685B = 671B + 14B counts the MTP module with its own copies of the
  embedding and output head (2 x V x M); moe_jax's module shares them."""
  module = load("deepseek_v3_671b")
  config = module.get_config()
  assert config.model.mtp_depth == 1
  with_mtp = counts(config, module.VOCAB_SIZE)
  copies = 2 * module.VOCAB_SIZE * config.model.d_model
  assert _error(with_mtp["mtp"] + copies, 685e9 - 671e9) <= 0.05, with_mtp["mtp"]
