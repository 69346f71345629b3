"""Read-outs for looking at MoE models: routing per token, labels, memory, collectives.

Small host-side helpers used by the notebooks in ``notebooks/``. Nothing here is needed
to train a model; everything works on the public API of the other modules. One module
per job, all re-exported here so that ``from moe_jax import analysis`` reaches them:

* :mod:`~moe_jax.analysis.trace`: :func:`capacity_sweep` (dropped fraction of
  :func:`moe_jax.routing.route` against the capacity factor, for fixed logits) and
  :func:`trace_routing` (runs any nnx model once and returns, for every
  :class:`~moe_jax.layers.moe_layer.MoeLayer` in it, which expert each token went to, as
  ``[B, L, K]`` arrays read from the routing each layer sows under ``nnx.capture``).
* :mod:`~moe_jax.analysis.categories`: :func:`char_labels`, :func:`word_class_labels`,
  :func:`script_role_labels`, :func:`speaker_labels` (per-byte categories of a play
  script), :func:`token_labels` (those per token of a subword tokenizer, the run's
  ``data.tokenizer``), :func:`routing_table` and :func:`mutual_information` (the expert
  distribution of each category, and how much a category tells about the expert).
* :mod:`~moe_jax.analysis.history`: :func:`load_history`, per-layer expert load over
  training from ``metrics.jsonl``.
* :mod:`~moe_jax.analysis.placement`: :func:`experts_by_device`,
  :func:`placed_bytes_per_device`, :func:`planned_bytes_per_device`: where experts and
  parameters live on a mesh.
* :mod:`~moe_jax.analysis.collectives`: :func:`hlo_collectives`, :func:`moe_comm_bytes`:
  the collectives of a compiled program and a simple model of the bytes an MoE layer
  moves.

Shapes use the project legend: B, L batch and length; G, S groups and tokens per
group; E, C, K experts, capacity, choices per token; M, H model and expert width.
"""

from moe_jax.analysis.categories import (CHAR_CLASSES, SCRIPT_ROLES, WORD_CLASS_LISTS,
                                         WORD_CLASSES, char_labels, mutual_information,
                                         normalize_rows, routing_table,
                                         script_role_labels, speaker_labels,
                                         token_labels, word_class_labels)
from moe_jax.analysis.collectives import (COLLECTIVE_OPS, Collective, hlo_collectives,
                                          moe_comm_bytes)
from moe_jax.analysis.history import load_history
from moe_jax.analysis.placement import (experts_by_device, placed_bytes_per_device,
                                        planned_bytes_per_device)
from moe_jax.analysis.trace import LayerRouting, capacity_sweep, path_str, trace_routing

__all__ = [
    "CHAR_CLASSES", "COLLECTIVE_OPS", "Collective", "LayerRouting", "SCRIPT_ROLES",
    "WORD_CLASSES", "WORD_CLASS_LISTS", "capacity_sweep", "char_labels",
    "experts_by_device", "hlo_collectives", "load_history", "moe_comm_bytes",
    "mutual_information", "normalize_rows", "path_str", "placed_bytes_per_device",
    "planned_bytes_per_device", "routing_table", "script_role_labels", "speaker_labels",
    "token_labels", "trace_routing", "word_class_labels",
]
