"""Builds the tiny random Hugging Face MoE fixtures of tests/fixtures/hf/.

Four families (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE), each a few-hundred-KB model made
from its config object alone (no download), with reference outputs of `transformers`'
own forward pass and greedy decoding. The converter tests read only the files written
here (config.json, model.safetensors, tokenizer.json, reference.npz, versions.json), so
they need neither torch nor transformers; this script needs both, pinned by the
`fixtures` extra. torch's CPU wheel comes from the PyTorch CPU index, so install it into
a separate virtual environment first (an unpinned torch pulls the CUDA libraries):

  python3 -m venv fixvenv
  fixvenv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fixvenv/bin/pip install -e '.[fixtures]'
  fixvenv/bin/python tools/hf_fixtures.py --out=tests/fixtures/hf

(`.[fixtures]` also installs moe_jax's own requirements; the script imports none of
moe_jax, so `fixvenv/bin/pip install transformers==5.25.0 safetensors tokenizers numpy`
in place of the second line is enough.)

The output is deterministic: the same versions and seed give the same bytes in
reference.npz and model.safetensors.

Weights: every parameter is re-drawn in `named_parameters()` order from one
`torch.Generator` seeded with --seed: RMSNorm weights (names ending in `norm.weight`)
1 + 0.2 * N(0, 1), everything else (embeddings, projections, expert tensors, routers,
biases) 0.2 * N(0, 1), so that every layer visibly moves the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

SEED = 20260101
INIT_STD = 0.2
VOCAB = 512
BATCH, LENGTH, NEW_TOKENS = 2, 16, 8
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]

# The corpus of the tokenizer (embedded so that the merges do not depend on the machine).
CORPUS = """\
A mixture of experts replaces the feed-forward block of a transformer with several
expert networks and a router. The router reads each token's hidden state, scores every
expert, and sends the token to the best one or two of them. Only the chosen experts run,
so the model holds many more parameters than it spends on any one token.

The Switch Transformer routes each token to a single expert; GShard routes it to two and
weights their outputs by the router's probabilities. Mixtral keeps eight experts per
layer and picks two; OLMoE keeps sixty-four small experts and picks eight; Qwen adds a
shared expert that every token passes through, gated by a sigmoid of the hidden state.

Each expert has a fixed capacity: the number of tokens it may take from one group. When
more tokens choose an expert than it can hold, the extra tokens are dropped and pass
through the residual connection unchanged. A load-balancing loss keeps the router from
sending every token to the same few experts, and a router z-loss keeps its logits small.

def route(hidden, weight, top_k):
    logits = hidden @ weight.T
    probs = softmax(logits, axis=-1)
    values, indices = top_k_of(probs, top_k)
    return values / values.sum(-1, keepdims=True), indices

class Expert:
    def __init__(self, width, hidden):
        self.gate = Linear(width, hidden)
        self.up = Linear(width, hidden)
        self.down = Linear(hidden, width)

    def __call__(self, x):
        return self.down(silu(self.gate(x)) * self.up(x))

Rotary position embeddings rotate pairs of query and key features by an angle that grows
with the position, so that the attention score depends on the distance between tokens.
Grouped-query attention shares each key and value head among several query heads, which
shrinks the cache that decoding keeps. RMS normalisation divides each vector by the root
of its mean square and multiplies it by a learned scale; some models also normalise the
queries and keys before the rotation, over the whole projection or over each head.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. The five
boxing wizards jump quickly. 0123456789 + - * / = < > ( ) [ ] { } , . ; : ' " ! ? # @

for step in range(num_steps):
    batch = next(iterator)
    loss, grads = value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = apply_updates(params, updates)
    if step % 100 == 0:
        print(f"step {step}: loss {loss:.4f}")

Expert parallelism places the experts of one layer on different devices and exchanges the
routed tokens with an all-to-all; data parallelism splits the batch; tensor parallelism
splits each weight matrix. Dropless routing sorts the tokens by expert and runs a grouped
matrix multiplication, so that no token is ever dropped, at the cost of uneven work.
"""

TEXTS = [
    "The router sends each token to the best two experts of the layer, and the rest",
    "def expert(x):\n    return down(silu(gate(x)) * up(x))  # a gated feed-forward block",
]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    initializer_range=INIT_STD,
    attention_dropout=0.0,
    use_cache=True,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# family -> (config class, model class, config keywords beyond COMMON)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, rms_norm_eps=1e-5, clip_qkv=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
        use_sliding_window=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=2, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Multi-head latent attention with query compression, YaRN rotary scaling (factor
    # 4 over 32 original positions, so the 16-token inputs already see the scaled
    # frequencies and the softmax mscale), a dense first block, sigmoid routing over 4
    # groups of 2 experts with 2 groups kept, a shared expert, routed_scaling_factor,
    # interleaved rotary pairs, and one multi-token-prediction module (see MTP below).
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4, rope_interleave=True,
        num_nextn_predict_layers=1, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
}

# DeepSeek-V3's multi-token-prediction module, which transformers does not run: its
# weights sit beside the model as block `num_hidden_layers` (the released checkpoint's
# `model.layers.61.*`), named as there: `embed_tokens` and `shared_head.head` (copies
# of the model's embedding and lm_head), `enorm`, `hnorm`, `eh_proj` [M, 2M],
# `shared_head.norm` and a whole decoder block (MoE). Its reference output is computed
# here from transformers' own DeepseekV3 layer classes, as the released inference code
# and vLLM compose them: h' = eh_proj(concat(enorm(emb(t[i+1])), hnorm(h[i]))), with h
# the main model's last hidden state before its final norm; then the block at
# positions 0..L-2; then shared_head.norm and the head: logits for t[i+2].
MTP_FAMILIES = ("deepseek_v3",)

ARRAYS = {
    "input_ids": "i32[2, 16]: the first 16 ids of the tokenizer applied to TEXTS (no "
                 "special tokens, no padding); attention mask all ones",
    "logits": "f32[2, 16, vocab]: model(input_ids).logits",
    "hidden_states": "f32[num_hidden_layers + 1, 2, 16, hidden]: "
                     "model(input_ids, output_hidden_states=True).hidden_states; entry 0 is "
                     "the token embeddings, entry i the output of decoder block i-1 "
                     "(residual stream, before any norm) for i < num_hidden_layers, and the "
                     "last entry is the output of the last block AFTER the final RMSNorm "
                     "(the input of lm_head)",
    "router_logits": "f32[num_moe_layers, 2*16, num_experts]: "
                     "model(input_ids, output_router_logits=True).router_logits, one entry "
                     "per MoE block in layer order (dense blocks have none); the raw "
                     "x @ gate.weight.T before softmax, tokens flattened batch-major",
    "moe_layers": "i32[num_moe_layers]: the decoder block index of each router_logits entry",
    "greedy": "i32[2, 16 + 8]: model.generate(input_ids, max_new_tokens=8, "
              "do_sample=False, use_cache=True, eos_token_id=None): the prompt followed by "
              "8 greedy tokens",
    "mtp_logits": "deepseek_v3 only: f32[2, 15, vocab], the MTP module's logits "
                  "(position i predicts token i+2; see MTP_FAMILIES in the script)",
    "mtp_hidden_in": "deepseek_v3 only: f32[2, 16, hidden], the main model's last "
                     "hidden state before its final norm (the MTP module's input)",
}


def train_tokenizer() -> tokenizers.Tokenizer:
  """A byte-level BPE with exactly VOCAB entries (256 bytes, the specials, merges)."""
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB, min_frequency=1, special_tokens=SPECIAL_TOKENS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
  if tok.get_vocab_size() != VOCAB:
    raise SystemExit(f"tokenizer: {tok.get_vocab_size()} entries, want {VOCAB}; "
                     "lengthen CORPUS.")
  return tok


def redraw(model: torch.nn.Module, seed: int) -> None:
  """Re-draws every parameter (see the module docstring for the rule), and DeepSeek's
  routing bias buffers (`e_score_correction_bias`) 0.05 * N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + INIT_STD * noise)
      else:
        p.copy_(INIT_STD * noise)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.05 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def build(family: str, seed: int):
  config_cls, model_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**COMMON, **extra})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
  redraw(model, seed)
  return model


def mtp_module(model, seed: int) -> dict[str, torch.nn.Module]:
  """DeepSeek-V3's MTP module for ``model`` (random, drawn as the model is)."""
  config = model.config
  mod = transformers.models.deepseek_v3.modeling_deepseek_v3
  index = config.num_hidden_layers
  parts = torch.nn.ModuleDict({
      "block": mod.DeepseekV3DecoderLayer(config, layer_idx=index),
      "enorm": mod.DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
      "hnorm": mod.DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
      "eh_proj": torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False),
      "head_norm": mod.DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
  }).to(torch.float32).eval()
  redraw(parts, seed + 1)
  return parts


def mtp_tensors(model, parts) -> dict[str, torch.Tensor]:
  """The MTP module's tensors under the released checkpoint's names."""
  p = f"model.layers.{model.config.num_hidden_layers}"
  out = {}
  for k, v in parts["block"].state_dict().items():
    # transformers 5 keeps the experts fused in memory ([E, 2I, M] gate then up, and
    # [E, M, I]); on disk, as save_pretrained writes the model's, one tensor per expert.
    if k == "mlp.experts.gate_up_proj":
      half = v.shape[1] // 2
      for e in range(v.shape[0]):
        out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = v[e, :half]
        out[f"{p}.mlp.experts.{e}.up_proj.weight"] = v[e, half:]
    elif k == "mlp.experts.down_proj":
      for e in range(v.shape[0]):
        out[f"{p}.mlp.experts.{e}.down_proj.weight"] = v[e]
    else:
      out[f"{p}.{k}"] = v
  out.update({f"{p}.embed_tokens.weight": model.model.embed_tokens.weight,
              f"{p}.enorm.weight": parts["enorm"].weight,
              f"{p}.hnorm.weight": parts["hnorm"].weight,
              f"{p}.eh_proj.weight": parts["eh_proj"].weight,
              f"{p}.shared_head.norm.weight": parts["head_norm"].weight,
              f"{p}.shared_head.head.weight": model.lm_head.weight})
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


def mtp_reference(model, parts, input_ids: np.ndarray) -> dict[str, np.ndarray]:
  """``mtp_logits`` f32[B, L-1, V] (position i predicts token i+2) and the main model's
  last hidden state before its final norm, ``mtp_hidden_in`` f32[B, L, M]."""
  ids = torch.from_numpy(input_ids.astype(np.int64))
  captured = {}
  hook = model.model.norm.register_forward_pre_hook(
      lambda _, args: captured.setdefault("h", args[0].detach().clone()))
  with torch.no_grad():
    model(ids, use_cache=False)
    hook.remove()
    h = captured["h"]  # [B, L, M]
    emb = model.model.embed_tokens(ids[:, 1:])
    x = parts["eh_proj"](torch.cat([parts["enorm"](emb), parts["hnorm"](h[:, :-1])], -1))
    length = x.shape[1]
    positions = torch.arange(length)[None]
    cos_sin = model.model.rotary_emb(x, positions)
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    y = parts["block"](x, attention_mask=mask, position_ids=positions,
                       position_embeddings=cos_sin)
    y = y[0] if isinstance(y, tuple) else y
    logits = model.lm_head(parts["head_norm"](y))
  return {"mtp_logits": logits.float().numpy(), "mtp_hidden_in": h.float().numpy()}


def moe_layers(model) -> list[int]:
  layers = model.model.layers
  return [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]


def reference(model, input_ids: np.ndarray) -> dict[str, np.ndarray]:
  ids = torch.from_numpy(input_ids.astype(np.int64))
  mask = torch.ones_like(ids)
  with torch.no_grad():
    out = model(ids, attention_mask=mask, output_hidden_states=True,
                output_router_logits=True, use_cache=False)
    greedy = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
  if greedy.shape != (BATCH, LENGTH + NEW_TOKENS):
    raise SystemExit(f"generate returned {tuple(greedy.shape)}")
  moe = moe_layers(model)
  router = [r.float().numpy() for r in out.router_logits]
  if len(router) != len(moe):
    raise SystemExit(f"{len(router)} router_logits for MoE layers {moe}")
  return {
      "input_ids": input_ids.astype(np.int32),
      "logits": out.logits.float().numpy(),
      "hidden_states": np.stack([h.float().numpy() for h in out.hidden_states]),
      "router_logits": np.stack(router).astype(np.float32),
      "moe_layers": np.asarray(moe, np.int32),
      "greedy": greedy.numpy().astype(np.int32),
  }


def ablation(model, input_ids: np.ndarray, logits: np.ndarray) -> float:
  """Max |logit change| when block 0's attention output projection is zeroed."""
  o_proj = model.model.layers[0].self_attn.o_proj.weight
  saved = o_proj.detach().clone()
  with torch.no_grad():
    o_proj.zero_()
    ablated = model(torch.from_numpy(input_ids.astype(np.int64))).logits.numpy()
    o_proj.copy_(saved)
  return float(np.abs(ablated - logits).max())


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez with fixed zip timestamps (np.savez stamps entries with the clock)."""
  import zipfile  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for name, array in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, buf.getvalue())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="tests/fixtures/hf")
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument("--families", default=",".join(FAMILIES))
  args = parser.parse_args(argv)
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)

  tok = train_tokenizer()
  tok_path = os.path.join(args.out, "tokenizer.json")
  os.makedirs(args.out, exist_ok=True)
  tok.save(tok_path)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_file=tok_path, eos_token="<|endoftext|>", pad_token="<|pad|>")
  special = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
  ids = []
  for text in TEXTS:
    row = fast(text, add_special_tokens=False)["input_ids"]
    if len(row) < LENGTH:
      raise SystemExit(f"text {text!r} gives {len(row)} < {LENGTH} tokens")
    ids.append(row[:LENGTH])
  input_ids = np.asarray(ids, np.int32)
  os.remove(tok_path)

  for family in args.families.split(","):
    out = os.path.join(args.out, family)
    if os.path.isdir(out):
      shutil.rmtree(out)
    model = build(family, args.seed)
    arrays = reference(model, input_ids)
    change = ablation(model, input_ids, arrays["logits"])
    model.save_pretrained(out, safe_serialization=True)
    if family in MTP_FAMILIES:
      parts = mtp_module(model, args.seed)
      arrays.update(mtp_reference(model, parts, input_ids))
      from safetensors.torch import load_file, save_file  # pylint: disable=import-outside-toplevel
      weights = os.path.join(out, "model.safetensors")
      tensors = load_file(weights)
      tensors.update(mtp_tensors(model, parts))
      save_file(tensors, weights, metadata={"format": "pt"})
    tok.save(os.path.join(out, "tokenizer.json"))
    save_npz(os.path.join(out, "reference.npz"), arrays)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "seed": args.seed,
        "model_class": FAMILIES[family][1],
        "attn_implementation": "eager",
        "dtype": "float32",
        "init": ("every parameter re-drawn in named_parameters() order from "
                 f"torch.Generator().manual_seed(seed): names ending in 'norm.weight' "
                 f"1 + {INIT_STD} * N(0, 1), all others (embeddings, projections, "
                 f"expert tensors, routers, biases) {INIT_STD} * N(0, 1)"),
        "texts": TEXTS,
        "special_tokens": special,
        "arrays": ARRAYS,
        "max_abs_logit_change_zeroing_block0_attention": round(change, 4),
    }
    with open(os.path.join(out, "versions.json"), "w", encoding="utf-8") as f:
      json.dump(versions, f, indent=2, sort_keys=True)
      f.write("\n")
    print(f"{family}: logits |max| {np.abs(arrays['logits']).max():.3f}, zeroing block 0 "
          f"attention moves them by up to {change:.3f}; moe layers "
          f"{arrays['moe_layers'].tolist()}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
