"""Tests for the python_stdlib TFDS builder (moe_jax/data/python_stdlib.py)."""

from __future__ import annotations

import hashlib
import pathlib
import platform
import socket
import sys

import pytest
import tensorflow_datasets as tfds

from moe_jax import data
from moe_jax.data import python_stdlib


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")

  def refuse(*args, **kwargs):
    raise OSError("network access blocked in tests")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", refuse)
    return tfds.data_source(python_stdlib.NAME, data_dir=str(data_dir)), data_dir


def test_is_validation_is_a_stable_hash_of_the_module_name():
  # The rule: the first 8 hex digits of sha256(name), as an integer, mod 100 < 10.
  for name in ("json", "json.decoder", "asyncio.base_events", "os"):
    expected = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100 < 10
    assert python_stdlib.is_validation(name) == expected


def test_module_name():
  assert python_stdlib.module_name(pathlib.PurePosixPath("json/decoder.py")) == "json.decoder"
  assert python_stdlib.module_name(pathlib.PurePosixPath("json/__init__.py")) == "json"
  assert python_stdlib.module_name(pathlib.PurePosixPath("os.py")) == "os"


def test_files_exclude_third_party_and_tests():
  files = python_stdlib.find_stdlib_files()
  assert "os.py" in files and "json/decoder.py" in files
  for rel in files:
    parts = rel.split("/")[:-1]
    assert not python_stdlib.EXCLUDED_DIRS.intersection(parts), rel


def test_splits_by_module_and_are_complete(sources):
  srcs, _ = sources
  assert set(srcs) == {"train", "validation"}
  split_of = {}
  for split, src in srcs.items():
    for record in src:
      module = record["module"].decode()
      assert module not in split_of, f"{module} in both splits"
      split_of[module] = split
      assert python_stdlib.is_validation(module) == (split == "validation")
  files = python_stdlib.find_stdlib_files()
  decodable = set()
  for rel, path in files.items():
    try:
      path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    decodable.add(python_stdlib.module_name(pathlib.PurePosixPath(rel)))
  assert set(split_of) == decodable
  # The text is the file's source, byte for byte.
  record = next(r for r in srcs["train"] if r["path"] == b"os.py") if not (
      python_stdlib.is_validation("os")) else next(r for r in srcs["validation"]
                                                    if r["path"] == b"os.py")
  assert record["text"].decode() == files["os.py"].read_text(encoding="utf-8")


def test_records_the_python_version(sources):
  srcs, data_dir = sources
  info = srcs["train"].dataset_info
  assert info.metadata["python_version"] == platform.python_version()
  config = f"py{sys.version_info.major}{sys.version_info.minor}"
  assert (pathlib.Path(data_dir) / python_stdlib.NAME / config).is_dir()


def test_lm_datasets_serve_it(sources):
  _, data_dir = sources
  assert python_stdlib.NAME in data.AVAILABLE_BUILTIN
  lm = data.make_lm_datasets(python_stdlib.NAME, data_dir=str(data_dir), seq_len=32,
                             batch_size=2, seed=0)
  batch = next(lm.train_iter())
  assert batch["inputs"].shape == (2, 32)
  assert lm.num_eval_tokens > 0
