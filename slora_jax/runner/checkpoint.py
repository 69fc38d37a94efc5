"""Orbax checkpoints of the continual-learning loop, behind two functions.

A checkpoint holds two items: ``state`` (adapter arrays, head, optimiser state,
RNG key data; never the frozen backbone) and ``meta`` (JSON: loop cursor,
results so far, the fingerprint of the config that wrote it). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a kill in
the middle of a save leaves the previous checkpoint as the latest one; the
next `Checkpointer` on that directory deletes the leftover temporary directory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from slora_jax.runner import faults
from slora_jax.runner import paths

__all__ = ["Checkpointer", "ConfigMismatchError", "WorkdirError",
           "check_fingerprint", "check_workdir", "disk_full_error",
           "is_disk_full"]


class ConfigMismatchError(ValueError):
  """The workdir holds a checkpoint written by a different configuration."""


class WorkdirError(OSError):
  """The workdir cannot be written (read-only, full disk, not a directory)."""

  def __init__(self, code: int, message: str):
    super().__init__(message)  # str() is the message alone, no "[Errno n]"
    self.errno = code


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
  """Whether ``e`` reports a full disk or an exhausted quota."""
  # TensorStore reports its I/O errors as ValueError with the OS text only.
  return (getattr(e, "errno", None) in _NO_SPACE
          or "No space left on device" in str(e)
          or "Disk quota exceeded" in str(e))


def disk_full_error(path: str, what: str | None = None) -> WorkdirError:
  """The one-line error for a full disk under ``path`` (writing ``what``)."""
  try:
    st = os.statvfs(path)
    free = f"{st.f_bavail * st.f_frsize // 1024} KiB free"
    if st.f_files and not st.f_favail:
      free = f"no free inodes, {free}"
  except OSError:
    free = "free space unknown"
  writing = f" while writing {what}" if what else ""
  return WorkdirError(
      errno.ENOSPC, f"the disk holding {path} is full ({free}){writing}; free "
      "some space or use another --workdir (the last complete checkpoint is "
      "kept: rerun to resume from it)")


# Below this a run cannot be expected to write its next checkpoint.
MIN_FREE_BYTES = 1 << 20


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed; raises WorkdirError unless it is writable.

  Writes nothing: runs check this before any data loading or compilation, and
  a refused workdir must be left exactly as it was.
  """
  try:
    paths.makedirs(workdir)
  except (FileExistsError, NotADirectoryError):
    raise WorkdirError(
        errno.ENOTDIR, f"the workdir {workdir} is not a directory (a file is "
        "in the way); pass another --workdir") from None
  except OSError as e:
    if is_disk_full(e):
      raise disk_full_error(paths.dirname(paths.absolute(workdir)),
                            f"the workdir {workdir}") from None
    raise WorkdirError(
        e.errno, f"cannot create the workdir {workdir} "
        f"({e.strerror or e}); pass a writable --workdir") from None
  if not paths.isdir(workdir):
    raise WorkdirError(errno.ENOTDIR, f"the workdir {workdir} is not a "
                       "directory; pass another --workdir")
  if not paths.is_local(workdir):
    return  # object stores: no modes or free space to ask about
  for path in (workdir, paths.join(workdir, "checkpoints")):
    if paths.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
      # access() honours read-only mounts even for root; chmod does not.
      read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
      why = "read-only file system" if read_only else "permission denied"
      raise WorkdirError(
          errno.EROFS if read_only else errno.EACCES,
          f"the workdir {path} is not writable ({why}); pass a writable "
          "--workdir, or copy the run to one to resume it")
  if paths.free_bytes(workdir) < MIN_FREE_BYTES:
    raise disk_full_error(workdir)


class _FaultPointTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's local temporary directory with the ``checkpoint_write`` kill
  point: a step's directory is written but not yet committed (renamed)."""

  async def finalize(self, *args, **kwargs):
    if self.get_final().name.isdigit():  # the step, not one of its items
      faults.point("checkpoint_write")
    return await super().finalize(*args, **kwargs)


class Checkpointer:
  """Saves and restores (state, meta) pairs under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = paths.absolute(paths.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        # Saves are small (adapters, head) and a synchronous save makes the
        # saved cursor exactly the one the loop has reached.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        # Orbax picks the right class for the filesystem (rename locally, a
        # commit file on GCS); only the kill tests replace it.
        temporary_path_class=(_FaultPointTemporaryPath
                              if faults.active("checkpoint_write") else None),
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def read_meta(self) -> dict | None:
    """The JSON item of the latest checkpoint, or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    out = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return out["meta"]

  def save(self, state: Any, meta: dict) -> int:
    """Writes a new checkpoint; returns its index."""
    step = (self.latest_step() or 0) + 1
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if is_disk_full(e):
        raise disk_full_error(self.directory, f"checkpoint {step}") from e
      raise
    return step

  def restore(self, abstract_state: Any, sharding=None) -> tuple[Any, dict]:
    """Restores the latest checkpoint into the structure of ``abstract_state``.

    ``sharding``: where every array goes (e.g. replicated over a mesh; with
    several processes it must span them all), else ``abstract_state``'s.
    """
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    if sharding is not None:
      target = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
          target)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return out["state"], out["meta"]

  def close(self):
    self._manager.close()


def check_fingerprint(saved: dict, current: dict) -> None:
  """Raises ConfigMismatchError naming the first field that differs.

  Fields holding a JSON object (a config section) are compared key by key,
  so the message names e.g. ``train.batch_size`` rather than ``train``.
  A checkpoint whose fingerprint has another ``version`` (1: none) recorded
  other settings, so it cannot be checked field by field.
  """
  if saved.get("version", 1) != current.get("version", 1):
    raise ConfigMismatchError(
        "the checkpoint in this workdir was written by another slora-jax "
        f"version (settings fingerprint v{saved.get('version', 1)}, this one "
        f"is v{current.get('version', 1)}), so whether this config matches it "
        "cannot be checked; use another --workdir, or that version to resume")
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      name, old, new = _first_difference(key, saved.get(key), current.get(key))
      raise ConfigMismatchError(
          f"the checkpoint in this workdir was written with {name}="
          f"{_short(old)}, but the config says {name}={_short(new)}; use "
          "another --workdir, or the original config to resume")


_MISSING = object()


def _first_difference(name: str, old, new):
  old, new = _json_object(old), _json_object(new)
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new), key=str):
      a, b = old.get(key, _MISSING), new.get(key, _MISSING)
      if a != b:
        return _first_difference(f"{name}.{key}", a, b)
  return name, old, new


def _json_object(v):
  if isinstance(v, str) and v.startswith("{"):
    try:
      return json.loads(v)
    except ValueError:
      pass
  return v


def _short(v) -> str:
  s = "(not set)" if v is _MISSING else repr(v)
  return s if len(s) <= 80 else s[:77] + "..."
