"""Reading and writing ``.safetensors`` files with numpy alone (no torch), bfloat16 included.

The format is an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw
little-endian tensor bytes. :class:`Checkpoint` maps every tensor of a directory's files
(one file, or the shards of a ``model.safetensors.index.json``) read-only into memory,
so reading a slice of a tensor touches only that slice's pages: a process that holds a
few shards of a model reads only those. Only safetensors are ever read: unpickling a
``.bin`` or ``.pt`` file can run code from it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
  """A directory or file that is not a readable safetensors checkpoint (one line)."""


def _header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes).")
    (size,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a safetensors file ({e}).") from None
  return header, 8 + size


class Checkpoint:
  """The tensors of a directory's safetensors files, memory-mapped.

  ``names`` lists them; :meth:`shape`, :meth:`dtype` and :meth:`read` (a whole tensor,
  or the slice ``index`` of it) read them.

  Raises:
    CheckpointError: no safetensors in ``directory`` (with what is there instead, and
      a refusal of pickle-based weights), or a file that is not safetensors.
  """

  def __init__(self, directory: str):
    self.directory = directory
    files = self._files(directory)
    self._where: dict[str, tuple[str, dict, int]] = {}
    self._maps: dict[str, np.memmap] = {}
    for path in files:
      header, start = _header(path)
      for name, info in header.items():
        if name != "__metadata__":
          self._where[name] = (path, info, start)

  @staticmethod
  def _files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
      raise CheckpointError(f"{directory!r} is not a directory; pass the directory "
                            "that holds config.json and the .safetensors files.")
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
      if missing:
        raise CheckpointError(f"{index} names {missing[0]!r}, which is missing from "
                              f"{directory!r}; download every shard.")
      return [os.path.join(directory, f) for f in files]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if files:
      return [os.path.join(directory, f) for f in files]
    pickled = sorted(f for f in os.listdir(directory)
                     if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickled:
      raise CheckpointError(
          f"{directory!r} holds only pickle-based weights ({pickled[0]}); moe_jax reads "
          "safetensors only, because unpickling runs code from the file. Convert them "
          "to safetensors where you trust them, or download the safetensors revision.")
    raise CheckpointError(f"{directory!r} holds no .safetensors weights.")

  @property
  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def dtype(self, name: str) -> np.dtype:
    code = self._where[name][1]["dtype"]
    if code not in DTYPES:
      raise CheckpointError(f"tensor {name!r} has dtype {code}, which moe_jax does not "
                            f"read; use one of {', '.join(DTYPES)}.")
    return np.dtype(DTYPES[code])

  def _array(self, name: str) -> np.ndarray:
    path, info, start = self._where[name]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dtype = self.dtype(name)
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise CheckpointError(f"tensor {name!r} in {path}: {end - begin} bytes for shape "
                            f"{shape} of {dtype}; the file is damaged.")
    if end == begin:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r",
                     offset=start + begin, shape=shape)

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    """Tensor ``name``, or its slice ``index``, as a new in-memory array."""
    return np.array(self._array(name)[index])


def save(tensors: dict[str, np.ndarray], path: str,
         metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` to one safetensors file (names sorted, 8-byte aligned header)."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in NAMES:
      raise CheckpointError(f"tensor {name!r} has dtype {a.dtype}, which safetensors "
                            "cannot store here.")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": NAMES[np.dtype(a.dtype.newbyteorder("="))],
                    "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())


def save_sharded(tensors: dict[str, np.ndarray], directory: str, *,
                 max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
  """Writes ``tensors`` to ``directory`` as ``model.safetensors``, or, over
  ``max_shard_bytes``, as ``model-0000i-of-0000n.safetensors`` shards with the index
  Hugging Face reads. Returns the files written."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  if len(shards) == 1:
    save(shards[0], os.path.join(directory, SINGLE))
    return [SINGLE]
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
           for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(files, shards):
    save(shard, os.path.join(directory, name))
    weight_map.update({t: name for t in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files + [INDEX]


def remove_weights(directory: str, keep: Iterable[str] = ()) -> None:
  """Deletes the safetensors files and index of ``directory`` not in ``keep`` (an
  export over an older one leaves no stale shard behind)."""
  for name in os.listdir(directory):
    if (name.endswith(".safetensors") or name == INDEX) and name not in set(keep):
      os.remove(os.path.join(directory, name))
