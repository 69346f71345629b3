"""Evaluation passes: per-batch sums into the eval line's values.

:func:`moe_jax.training.steps.make_eval_step` computes one batch's sums on device;
:func:`evaluate` runs it over an eval stream and turns the sums into ``eval_loss``, its
standard error over batches (:func:`batch_stderr`), bits per byte and the MoE metrics.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from moe_jax.training import depth_metrics, metric_schema

__all__ = ["batch_stderr", "byte_sums", "evaluate", "evaluate_parts"]


def byte_sums(ce, targets, weights=None, target_bytes=None):
  """``(byte_nats, bytes)`` of one eval batch: the CE (nats) summed over the targets
  that stand for text, and the UTF-8 bytes of those targets.

  Args:
    ce: f32[B, L] per-target cross-entropy.
    targets: int32[B, L].
    weights: f32[B, L] or None; padding has weight 0.
    target_bytes: f32[B, L], the bytes each target stands for (the pipeline's
      ``byte_table[targets]``), or None: the byte tokenizer's, 1 for ids below 256.

  Targets of 0 bytes (EOS and the other special ids) count on neither side, so
  ``byte_nats / bytes / ln 2`` is bits per byte of the original text, for any tokenizer.
  """
  if target_bytes is None:
    target_bytes = (targets < 256).astype(jnp.float32)
  is_text = (target_bytes > 0).astype(jnp.float32)
  if weights is not None:
    is_text = is_text * weights
    target_bytes = target_bytes * weights
  return jnp.sum(ce * is_text), jnp.sum(target_bytes)


def batch_stderr(nats: Sequence[float], tokens: Sequence[float]) -> float:
  """Standard error of the token-weighted mean loss, over batches.

  With batch ``b``'s summed CE ``n_b`` over ``w_b`` tokens, mean ``x_b = n_b / w_b``
  and overall mean ``x = sum_b n_b / sum_b w_b`` (the eval loss), this is the
  ratio-estimator (cluster) standard error

      SE = sqrt(B / (B - 1) * sum_b w_b^2 (x_b - x)^2) / sum_b w_b

  over the ``B`` batches with ``w_b > 0``; with equal ``w_b`` it is the familiar
  ``std(x_b) / sqrt(B)`` (std with ``B - 1``). NaN with fewer than 2 batches.
  """
  pairs = [(n, w) for n, w in zip(nats, tokens) if w > 0]
  if len(pairs) < 2:
    return float("nan")
  total_w = sum(w for _, w in pairs)
  mean = sum(n for n, _ in pairs) / total_w
  ss = sum((n - w * mean) ** 2 for n, w in pairs)  # w_b^2 (x_b - x)^2
  return math.sqrt(len(pairs) / (len(pairs) - 1) * ss) / total_w


def evaluate(eval_step, params, batches: Iterator[dict]) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches``; returns the eval line's values.

  ``eval_loss`` is the mean CE (nats) over all ``eval_tokens`` target tokens (weighted
  by the batches' ``weights``), ``eval_loss_stderr`` its standard error over batches
  (:func:`batch_stderr`), ``eval_perplexity`` its exp, and ``eval_bits_per_byte`` the
  CE over byte targets only (the EOS separators are not bytes) in bits. The MoE
  metrics (:func:`moe_jax.training.metric_schema.eval_layer_means`) are token-weighted
  means over batches. A model with Mixture-of-Depths
  blocks also reports ``eval_loss_predictor`` (the loss when every routed block
  routes with its predictor, as sampling does; ``eval_loss`` uses the top-k) and
  per block ``eval_mod_predictor_accuracy`` and ``eval_mod_predicted_fraction``.
  """
  return _line(_sums(eval_step, params, batches))


def _sums(eval_step, params, batches) -> list[dict[str, float]]:
  per_batch: list[dict[str, float]] = []
  for batch in batches:
    out = jax.device_get(eval_step(params, batch))
    per_batch.append({k: float(v) for k, v in out.items()})
  return per_batch


def evaluate_parts(eval_step, params, parts: dict[str, Iterator[dict]]
                   ) -> dict[str, float]:
  """:func:`evaluate` of a mixture: the line over all the parts' batches together,
  plus ``eval_loss/<part>`` and ``eval_bits_per_byte/<part>`` for each part."""
  every: list[dict[str, float]] = []
  extra: dict[str, float] = {}
  for name, batches in parts.items():
    per_batch = _sums(eval_step, params, batches)
    every.extend(per_batch)
    line = _line(per_batch)
    if line:
      extra[f"eval_loss/{name}"] = line["eval_loss"]
      extra[f"eval_bits_per_byte/{name}"] = line["eval_bits_per_byte"]
  line = _line(every)
  return {**line, **extra} if line else {}


def _line(per_batch: list[dict[str, float]]) -> dict[str, float]:
  if not per_batch:
    return {}
  tokens = [b["tokens"] for b in per_batch]
  total_tokens = sum(tokens)
  loss = sum(b["nats"] for b in per_batch) / max(total_tokens, 1.0)
  byte_nats = sum(b["byte_nats"] for b in per_batch)
  num_bytes = sum(b["bytes"] for b in per_batch)

  def token_mean(key):
    return sum(b[key] * b["tokens"] for b in per_batch) / max(total_tokens, 1.0)

  line = {
      "eval_loss": loss,
      "eval_loss_stderr": batch_stderr([b["nats"] for b in per_batch], tokens),
      "eval_tokens": int(round(total_tokens)),
      "eval_perplexity": math.exp(min(loss, 700.0)),
      "eval_bits_per_byte": byte_nats / max(num_bytes, 1.0) / math.log(2),
      **{f"eval_{name}": token_mean(name) for name in metric_schema.eval_layer_means()},
      "eval_batches": len(per_batch),
  }
  if "predictor_nats" in per_batch[0]:
    line["eval_loss_predictor"] = (sum(b["predictor_nats"] for b in per_batch)
                                   / max(total_tokens, 1.0))
  line.update(depth_metrics.depth_eval_line({k: token_mean(k) for k in per_batch[0] if "/" in k}))
  return line
