"""One run per workdir: a second run started on it is refused with one line.

The lock is ``flock`` on the workdir directory itself, so it writes nothing
(a refused run leaves the workdir exactly as it was) and, being tied to an
open file, the kernel releases it when its process dies, SIGKILL included:
no stale lock survives a killed run. Process 0 takes it for all processes of
a multi-process run and tells them whether it got it.

Filesystems: local ones (ext4, xfs, tmpfs, overlayfs) lock across every
process of the machine. Linux's NFS client turns flock into an NFS byte-range
lock, which needs a file open for writing, so on NFS (and FUSE mounts such as
gcsfuse, which lock per machine at best) a directory cannot be locked: the run
then goes ahead with a warning that a concurrent run would not be refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from slora_jax.runner.checkpoint import WorkdirError

__all__ = ["WorkdirInUseError", "hold"]


class WorkdirInUseError(WorkdirError):
  """Another run holds the workdir."""


def _holder(fd: int) -> str:
  """`` (process N)`` for the flock holder of ``fd`` (Linux), or ''."""
  st = os.fstat(fd)
  want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
  try:
    with open("/proc/locks", encoding="ascii") as f:
      for line in f:
        parts = line.split()
        if "FLOCK" in parts and len(parts) > 5:
          major, minor, ino = parts[5].split(":")
          if (int(major, 16), int(minor, 16), int(ino)) == want:
            return f" (process {parts[4]})"
  except (OSError, ValueError):
    pass
  return ""


def _acquire(workdir: str) -> tuple[int | None, str | None]:
  """(fd holding the lock or None, the refusal message or None)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    return None, None       # not a directory etc.: check_workdir says why
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, None
  except OSError as e:
    holder = _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else ""
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      return None, (f"the workdir {workdir} is in use by another run{holder}; "
                    "wait for it to end (or stop it: it resumes later), or "
                    "pass another --workdir")
    logging.warning("cannot lock the workdir %s (%s): two runs on it at once "
                    "would not be refused", workdir, e.strerror)
    return None, None


@contextlib.contextmanager
def hold(workdir: str):
  """Holds ``workdir``'s lock; raises WorkdirInUseError if a run has it."""
  fd, refused = (_acquire(workdir) if jax.process_index() == 0
                 else (None, None))
  if jax.process_count() > 1:
    if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)):
      refused = refused or (f"the workdir {workdir} is in use by another run "
                            "(process 0 was refused); pass another --workdir")
  if refused:
    raise WorkdirInUseError(errno.EBUSY, refused)
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)          # closing the last descriptor releases the lock
