"""Checkpoints of a training run: orbax CheckpointManager in ``DIR/checkpoints``.

Each step directory holds three items:

* ``state``: the train-state pytree (params, optimizer state, step, rng key data);
* ``data``: the data iterator's position (grain's own handler, one JSON file per
  process, so each process resumes its own shard);
* ``meta``: a small JSON dict (metric accumulators, elapsed time, config summary).

Orbax writes a step into a temporary directory and renames it when complete, so a save
cut short by a crash or a kill never looks like a checkpoint. A checkpoint that is
complete but unreadable is skipped with a warning and the previous one is tried. When
an older one restores, the newer unreadable ones (damaged files) are moved to
``DIR/checkpoints_corrupt/``; if none can be read, :class:`CheckpointError` refuses to
start over a directory that holds saved progress, and moves nothing: a run whose
config, mesh or data pipeline differs from the one that saved fails on every step
alike, and its checkpoints are good.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from moe_jax.errors import CheckpointError

try:
  import grain.checkpoint as grain_checkpoint
  _GRAIN_ITERATORS: tuple[type, ...] = ()
  import grain
  _GRAIN_ITERATORS = tuple(t for t in (getattr(grain, "DatasetIterator", None),
                                       getattr(grain, "DataLoaderIterator", None)) if t)
except ImportError:  # pragma: no cover - grain is a dependency
  grain_checkpoint = None
  _GRAIN_ITERATORS = ()

log = logging.getLogger(__name__)


def _data_save_args(iterator):
  if iterator is None:
    return None
  if grain_checkpoint is not None and isinstance(iterator, _GRAIN_ITERATORS):
    return grain_checkpoint.CheckpointSave(iterator)
  # Any other iterator with a JSON-able get_state()/set_state() (single process).
  return ocp.args.JsonSave(iterator.get_state())


def _data_restore_args(iterator):
  if grain_checkpoint is not None and isinstance(iterator, _GRAIN_ITERATORS):
    return grain_checkpoint.CheckpointRestore(iterator)
  return ocp.args.JsonRestore()


class Checkpointer:
  """Saves and restores (state, data iterator, meta) triples by step."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self.manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, data_iterator=None,
           meta: dict[str, Any] | None = None) -> None:
    """Saves synchronously (collective: every process calls it)."""
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(meta or {})}
    data = _data_save_args(data_iterator)
    if data is not None:
      items["data"] = data
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state: Any, *, data_iterator=None
              ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint, falling back to older ones.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) describing
        the state to restore, or a function from the saved state's top-level keys
        (a frozenset of str, with ``params/<key>`` for the keys of its ``params``) to
        that pytree, for states whose layout changed.
      data_iterator: restored in place to the saved position.

    Returns:
      ``(step, state, meta)``, or None when the directory holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read.
    """
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      self._check_dtypes(step, abstract_state)
      try:
        target = (abstract_state(self._saved_keys(step)) if callable(abstract_state)
                  else abstract_state)
        items = {"state": ocp.args.StandardRestore(target),
                 "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
          items["data"] = _data_restore_args(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        failures.append((step, reason))
        log.warning("Checkpoint at step %d in %s is unreadable (%s); falling back to "
                    "the previous one.", step, self.directory, reason)
        continue
      # An older step restored into the same target, so the newer ones that failed
      # are damaged, not incompatible with this run: move them out of the way.
      for bad, _ in failures:
        self._quarantine(bad)
      if data_iterator is not None and "data" in items and isinstance(
          items["data"], ocp.args.JsonRestore):
        data_iterator.set_state(restored["data"])
      return step, restored["state"], dict(restored["meta"] or {})
    if failures:
      # Nothing restored: as likely a run that asks for another layout, mesh or data
      # pipeline than it saved as damage, so every checkpoint is left where it is.
      raise CheckpointError(
          f"No checkpoint in {self.directory} could be restored: "
          f"{'; '.join(f'step {s} ({r})' for s, r in failures)}. Refusing to start "
          "from scratch over saved progress (nothing was moved); resume with the "
          "config the run was saved with, or use a new work directory.")
    return None

  def _saved_keys(self, step: int) -> frozenset[str]:
    """The top-level keys of the state saved at ``step`` (read from its metadata),
    and ``params/<key>`` for each top-level key of its ``params`` (the layout of the
    model's blocks: unrolled or scanned)."""
    path = os.path.join(self.directory, str(step), "state")
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    params = tree.get("params") if hasattr(tree, "get") else None
    return frozenset(tree) | frozenset(
        f"params/{k}" for k in (params if hasattr(params, "keys") else ()))

  def _check_dtypes(self, step: int, abstract_state: Any) -> None:
    """Raises :class:`CheckpointError` when the checkpoint at ``step`` stores a leaf in
    another dtype than ``abstract_state`` asks for (orbax would cast it silently): a
    run resumed with another ``model.param_dtype`` or ``moment_dtype`` than it was
    saved with. A step whose metadata cannot be read is left to :meth:`restore`."""
    try:
      if callable(abstract_state):
        abstract_state = abstract_state(self._saved_keys(step))
      # Read from the files: the manager knows the item's handler only after a save.
      saved = ocp.tree.to_flat_dict(ocp.StandardCheckpointHandler().metadata(
          epath.Path(self.directory) / str(step) / "state").tree)
      wanted = ocp.tree.to_flat_dict(
          ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
    except Exception:  # pylint: disable=broad-except
      return
    for key, leaf in wanted.items():
      old = getattr(saved.get(key), "dtype", None)
      new = getattr(leaf, "dtype", None)
      if old is not None and new is not None and old != new:
        raise CheckpointError(
            f"The checkpoint at step {step} in {self.directory} stores "
            f"{'.'.join(map(str, key))} as {old}, but this run builds it as {new}: "
            "model.param_dtype or moment_dtype differs from the run's; resume with "
            "the dtypes it was saved with, or start a new work directory.")

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step out of the manager's way (kept for inspection)."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst_dir = self.directory.rstrip(os.sep) + "_corrupt"
      os.makedirs(dst_dir, exist_ok=True)
      dst = os.path.join(dst_dir, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      if os.path.exists(src):
        shutil.move(src, dst)
    self.manager.close()
    self.manager = self._make_manager()

  def close(self) -> None:
    self.manager.close()
