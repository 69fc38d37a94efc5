"""Orbax checkpoints of the continual-learning loop, behind two functions.

A checkpoint holds two items: ``state`` (adapter arrays, head, optimiser state,
RNG key data; never the frozen backbone) and ``meta`` (JSON: loop cursor,
results so far, the fingerprint of the config that wrote it). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a kill in
the middle of a save leaves the previous checkpoint as the latest one; the
next `Checkpointer` on that directory deletes the leftover temporary directory.

A committed checkpoint can still rot (a truncated or overwritten file, a
disk error). Each save stores a SHA-256 of the state's values in ``meta``;
a restore that fails or reads back other values marks the step corrupt, and
`restore_intact` sets it aside (``<seed dir>/checkpoints_corrupt/<step>``,
never deleted) and falls back to the newest intact step. The digest is over
the values, not Orbax's files: it covers exactly what the run resumes from,
whatever the on-disk format (OCDBT, zstd, a GCS commit file), and is written
in the same atomic save as the arrays, so no window leaves a step unsigned.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from slora_jax.runner import faults
from slora_jax.runner import paths

__all__ = ["Checkpointer", "ConfigMismatchError", "CorruptCheckpointError",
           "WorkdirError", "check_fingerprint", "check_workdir",
           "disk_full_error", "has_checkpoint", "is_disk_full",
           "state_digest"]


class ConfigMismatchError(ValueError):
  """The workdir holds a checkpoint written by a different configuration."""


class CorruptCheckpointError(ValueError):
  """A committed checkpoint that cannot be read back as it was saved."""


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


def has_checkpoint(seed_dir: str) -> bool:
  """Whether ``seed_dir/checkpoints`` holds a committed checkpoint."""
  directory = paths.join(seed_dir, "checkpoints")
  try:
    return any(n.isdigit() for n in paths.subdirs(directory))
  except OSError:
    return False


def disk_full_error(path: str, what: str | None = None,
                    saved: bool = True) -> WorkdirError:
  """The one-line error for a full disk under ``path`` (writing ``what``).

  ``saved``: whether the run has a checkpoint to resume from.
  """
  try:
    st = os.statvfs(path)
    free = f"{st.f_bavail * st.f_frsize // 1024} KiB free"
    if st.f_files and not st.f_favail:
      free = f"no free inodes, {free}"
  except OSError:
    free = "free space unknown"
  writing = f" while writing {what}" if what else ""
  kept = ("the last complete checkpoint is kept: rerun to resume from it"
          if saved else "no checkpoint was saved yet: a rerun starts from "
          "the beginning")
  return WorkdirError(
      errno.ENOSPC, f"the disk holding {path} is full ({free}){writing}; free "
      f"some space or use another --workdir ({kept})")


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
                            f"the workdir {workdir}", saved=False) from None
    raise WorkdirError(
        e.errno, f"cannot create the workdir {workdir} "
        f"({e.strerror or e}); pass a writable --workdir") from None
  if not paths.isdir(workdir):
    raise WorkdirError(errno.ENOTDIR, f"the workdir {workdir} is not a "
                       "directory; pass another --workdir")
  checkpoints = paths.join(workdir, "checkpoints")
  if paths.exists(checkpoints) and not paths.isdir(checkpoints):
    raise WorkdirError(
        errno.ENOTDIR, f"{checkpoints} is not a directory (a file is in the "
        "way); move it away, or pass another --workdir")
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
    raise disk_full_error(workdir, saved=has_checkpoint(workdir))


class _FaultPointTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's local temporary directory with the ``checkpoint_write`` kill
  point: a step's directory is written but not yet committed (renamed)."""

  async def finalize(self, *args, **kwargs):
    if self.get_final().name.isdigit():  # the step, not one of its items
      faults.point("checkpoint_write")
    return await super().finalize(*args, **kwargs)


# The meta key of the state's digest; callers never see it.
_DIGEST = "state_sha256"


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:  # replicated over processes: one copy
      x = x.addressable_shards[0].data
  return np.asarray(x)


def state_digest(tree: Any) -> str:
  """SHA-256 of a tree's values (each leaf's dtype, shape and bytes).

  Leaf digests are sorted before the final hash, so a tree restored without
  a target (tuples read back as lists or dicts) has the same digest.
  """
  leaves = []
  for leaf in jax.tree.leaves(tree):
    a = np.ascontiguousarray(_host(leaf))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    leaves.append(h.hexdigest())
  return hashlib.sha256("".join(sorted(leaves)).encode()).hexdigest()


def _brief(e: BaseException, limit: int = 100) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _late_read_callback(u) -> bool:
  """Whether an unraisable error is a TensorStore read finishing after
  Orbax closed the event loop of a failed restore."""
  if not (isinstance(u.exc_value, RuntimeError)
          and str(u.exc_value) == "Event loop is closed"):
    return False
  tb = u.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _quiet_late_read_callbacks() -> None:
  """Drops `_late_read_callback` errors; passes every other one on.

  When one array of a corrupt checkpoint fails, Orbax's restore raises and
  closes its event loop while TensorStore still finishes the other reads;
  their callbacks then hit the closed loop and Python prints a traceback
  ("Exception ignored ...") after the run's own one-line report.
  """
  previous = sys.unraisablehook
  if getattr(previous, "slora_jax_late_reads", False):
    return

  def hook(u):
    if not _late_read_callback(u):
      previous(u)

  hook.slora_jax_late_reads = True
  sys.unraisablehook = hook


def _attempt(read: Callable[[], Any]) -> tuple[Any, str | None]:
  """(result, None), or (None, why) if ``read`` raised.

  The error is not chained to the one raised next: its traceback holds
  Orbax's asyncio frames alive.
  """
  _quiet_late_read_callbacks()
  try:
    return read(), None
  except Exception as e:  # pylint: disable=broad-except
    return None, _brief(e)


@contextlib.contextmanager
def _absl_quiet(quiet: bool = True):
  """Absl's (Orbax's) log off inside, if ``quiet``: for what the caller
  reports itself, or needs no report."""
  logger = logging.getLogger("absl")
  level = logger.level
  if quiet:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


class Checkpointer:
  """Saves and restores (state, meta) pairs under ``workdir/checkpoints``.

  ``read_only``: for tools that inspect a run (export): no temporary
  directory is cleaned up and no corrupt step is moved.
  """

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = paths.absolute(paths.join(workdir, "checkpoints"))
    self.corrupt_directory = paths.join(paths.dirname(self.directory),
                                        "checkpoints_corrupt")
    self._read_only = read_only
    # Its notes on read-only mode (options and manager alike) are ours to
    # skip.
    with _absl_quiet(read_only):
      options = ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
          # Saves are small (adapters, head) and a synchronous save makes the
          # saved cursor exactly the one the loop has reached.
          enable_async_checkpointing=False,
          cleanup_tmp_directories=not read_only,
          read_only=read_only, create=not read_only,
          # Orbax picks the right class for the filesystem (rename locally, a
          # commit file on GCS); only the kill tests replace it.
          temporary_path_class=(_FaultPointTemporaryPath
                                if faults.active("checkpoint_write") else None),
      )
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def read_meta(self, step: int | None = None) -> dict | None:
    """The JSON item of checkpoint ``step`` (default: the latest), or None
    if there is none; raises CorruptCheckpointError if it is unreadable."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    meta = self._meta(step)
    meta.pop(_DIGEST, None)
    return meta

  def _meta(self, step: int) -> dict:
    out, why = _attempt(lambda: self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if why:
      raise CorruptCheckpointError(f"its meta item is unreadable: {why}")
    if not isinstance(out, dict):
      raise CorruptCheckpointError(f"its meta item is a {type(out).__name__}, "
                                   "not an object")
    return out

  def _state(self, step: int, meta: dict, target, sharding) -> Any:
    if target is not None:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    if target is not None and sharding is not None:
      target = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
          target)
    state, why = _attempt(lambda: self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"])
    if why:
      raise CorruptCheckpointError(f"its arrays are unreadable: {why}")
    if _DIGEST in meta and state_digest(state) != meta[_DIGEST]:
      raise CorruptCheckpointError("its arrays differ from those saved "
                                   "(SHA-256 mismatch)")
    return state

  def save(self, state: Any, meta: dict) -> int:
    """Writes a new checkpoint; returns its index."""
    step = (self.latest_step() or 0) + 1
    meta = {**meta, _DIGEST: state_digest(state)}
    try:
      # A failed write is raised here and reported once, by the caller;
      # Orbax's writer thread would log it first, with its traceback.
      with _absl_quiet():
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if is_disk_full(e):
        raise disk_full_error(self.directory, f"checkpoint {step}",
                              saved=step > 1) from e
      raise
    return step

  def restore(self, abstract_state: Any, sharding=None,
              step: int | None = None) -> tuple[Any, dict]:
    """Restores checkpoint ``step`` (default: the latest), verified.

    ``abstract_state``: the structure to restore into (None: as saved).
    ``sharding``: where every array goes (e.g. replicated over a mesh; with
    several processes it must span them all), else ``abstract_state``'s.
    Raises CorruptCheckpointError if it cannot be read back as saved.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self._meta(step)
    state = self._state(step, meta, abstract_state, sharding)
    meta.pop(_DIGEST, None)
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return state, meta

  def restore_intact(self, target_of: Callable[[dict], Any], sharding=None
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest intact checkpoint, or None.

    ``target_of(meta)``: the abstract state of a checkpoint with that meta;
    it may raise CorruptCheckpointError (meta lacking a field) or any other
    error, which stops the search (e.g. a config mismatch). Each corrupt
    step is reported in one line on stderr and, unless read-only, moved to
    ``corrupt_directory``.
    """
    found, bad = None, []
    for step in reversed(self.all_steps()):
      try:
        meta = self._meta(step)
        state = self._state(step, meta, target_of(
            {k: v for k, v in meta.items() if k != _DIGEST}), sharding)
      except CorruptCheckpointError as e:
        bad.append((step, str(e), self._set_aside(step)))
        continue
      meta.pop(_DIGEST, None)
      found = (step, state, meta)
      break
    if self._read_only:
      then = f"using checkpoint {found[0]}" if found else "none is intact"
    else:
      then = (f"resuming from checkpoint {found[0]}" if found
              else "no intact checkpoint left: starting from the beginning")
    for step, why, where in bad:
      print(f"warning: checkpoint {step} in {self.directory} is corrupt "
            f"({why}); {where}; {then}", file=sys.stderr, flush=True)
    return found

  def _set_aside(self, step: int) -> str:
    """Moves step ``step`` out of Orbax's sight; returns what was done."""
    if self._read_only:
      return "skipped (left in place)"
    paths.makedirs(self.corrupt_directory)
    dest, n = paths.join(self.corrupt_directory, str(step)), 1
    while paths.exists(dest):                 # the same number, set aside again
      dest, n = paths.join(self.corrupt_directory, f"{step}.{n}"), n + 1
    paths.replace(paths.join(self.directory, str(step)), dest)
    self._manager.reload()
    return f"moved to {dest}"

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
