"""Every file the runner reads or writes, local or remote (``gs://`` etc.).

Paths stay plain strings through the runner; this module is the one place
that touches a filesystem for them. Remote paths (anything with ``://``) go
through ``etils.epath``, the path type Orbax itself uses, so a workdir, data
root, backbone checkpoint or cache may live on GCS. Local paths take the
``os`` calls they always took, so local behaviour and errors are unchanged.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ["is_local", "join", "absolute", "dirname", "expanduser", "exists",
           "isdir", "isfile", "listdir", "subdirs", "walk_files", "file_size",
           "free_bytes",
           "makedirs", "remove", "replace",
           "open_file", "read_bytes", "read_text", "write_atomic",
           "tensorboard_dir"]


def _read_umask() -> int:
  mask = os.umask(0o022)   # the only portable way to read it; set straight
  os.umask(mask)           # back, once, at import (before any worker thread)
  return mask


# What open() gives a new file; mkstemp's temporaries are 0600.
_FILE_MODE = 0o666 & ~_read_umask()


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def _epath(path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(os.fspath(path))


def join(path, *parts) -> str:
  path = os.fspath(path)
  if is_local(path):
    return os.path.join(path, *parts)
  return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(path) -> str:
  """The absolute form of a local path; a remote one is already absolute."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def dirname(path) -> str:
  path = os.fspath(path)
  if is_local(path):
    return os.path.dirname(path)
  return path.rstrip("/").rsplit("/", 1)[0]


def expanduser(path) -> str:
  path = os.fspath(path or "")
  return os.path.expanduser(path) if is_local(path) else path


def exists(path) -> bool:
  return os.path.exists(path) if is_local(path) else _epath(path).exists()


def isdir(path) -> bool:
  return os.path.isdir(path) if is_local(path) else _epath(path).is_dir()


def isfile(path) -> bool:
  return os.path.isfile(path) if is_local(path) else _epath(path).is_file()


def listdir(path) -> list[str]:
  if is_local(path):
    return os.listdir(path)
  return [p.name for p in _epath(path).iterdir()]


def subdirs(path) -> list[str]:
  """Sorted names of the folders directly in ``path``."""
  if is_local(path):
    with os.scandir(path) as entries:
      return sorted(e.name for e in entries if e.is_dir())
  return sorted(p.name for p in _epath(path).iterdir() if p.is_dir())


def walk_files(path) -> Iterator[tuple[str, list[str]]]:
  """(folder, file names) under ``path``, following local links."""
  if is_local(path):
    for root, _, names in os.walk(path, followlinks=True):
      yield root, names
    return
  # Not epath's walk: its fsspec backend yields the folders without gs://.
  names, folders = [], []
  for child in _epath(path).iterdir():
    (folders if child.is_dir() else names).append(child.name)
  yield os.fspath(path), names
  for name in sorted(folders):
    yield from walk_files(join(path, name))


def file_size(path) -> int:
  """Bytes in the file ``path`` (a link: its target's)."""
  return os.path.getsize(path) if is_local(path) else _epath(path).stat().st_size


def free_bytes(path) -> int:
  """Free bytes on the local filesystem holding ``path``."""
  return shutil.disk_usage(path).free


def makedirs(path) -> None:
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    _epath(path).mkdir(parents=True, exist_ok=True)


def remove(path) -> None:
  if is_local(path):
    os.remove(path)
  else:
    _epath(path).unlink()


def replace(src, dst) -> None:
  """Renames ``src`` over ``dst`` (on object stores: a copy, then a delete)."""
  if is_local(src):
    os.replace(src, dst)
  else:
    _epath(src).replace(_epath(dst))


def open_file(path, mode: str = "rb"):
  """A file object for ``path`` (binary modes; text through io wrappers)."""
  if is_local(path):
    return open(path, mode)  # pylint: disable=unspecified-encoding
  return _epath(path).open(mode)


def read_bytes(path) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomic(path, data: bytes | str) -> str:
  """Writes ``data`` to ``path`` so that no reader sees a partial file.

  Locally: a temporary file in the same folder, fsynced, then ``os.replace``.
  Remotely: a temporary object renamed over the target; on object stores a
  rename is a copy then a delete, and a single object upload is itself
  all-or-nothing, so readers still never see a partial file.
  Returns ``path``.
  """
  path = os.fspath(path)
  if isinstance(data, str):
    data = data.encode("utf-8")
  folder = dirname(absolute(path))
  makedirs(folder)
  if not is_local(path):
    tmp = _epath(join(folder, f".tmp-{os.getpid()}-{path.rsplit('/', 1)[-1]}"))
    tmp.write_bytes(data)
    tmp.replace(_epath(path))
    return path
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1],
                             dir=folder)
  try:
    # mkstemp creates 0600; a result file gets what open() would give it.
    os.fchmod(fd, _FILE_MODE)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


class _WholeFileEvents:
  """A TensorBoard event file on an object store, rewritten whole at each
  flush: object stores have no append, and a run's scalar events are a few
  KiB, so re-uploading them is cheap and each flush leaves a complete file."""

  def __init__(self, path: str):
    self._path, self._buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    _epath(self._path).write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFactory:
  """tensorboardX's hook for a scheme: where its event files are opened."""

  def directory_check(self, path: str) -> None:
    makedirs(path)

  def open(self, path: str) -> _WholeFileEvents:
    return _WholeFileEvents(path)


def tensorboard_dir(path: str) -> str:
  """``path``, with tensorboardX told to write it through this module."""
  if not is_local(path):
    from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
    record_writer.register_writer_factory(path.split(":", 1)[0],
                                          _EventFactory())
  return path
