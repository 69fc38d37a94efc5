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

Remote workdirs (gs:// ...) cannot be flocked: there a lease file
``.lock`` names its holder (host, pid) and the time, refreshed by a heartbeat
thread every `LEASE_REFRESH_S`; a lease not refreshed for `LEASE_STALE_S` is
a killed run's and is taken over. Checking then writing a lease is not atomic
on object stores (two runs starting within the same second could both win);
that is acceptable because the lock is a guard against a mistake (a second
run started by hand on the same workdir), not against a race of schedulers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from slora_jax.runner import paths
from slora_jax.runner.checkpoint import WorkdirError

__all__ = ["WorkdirInUseError", "hold"]


class WorkdirInUseError(WorkdirError):
  """Another run holds the workdir."""


def _holder(fd: int) -> str:
  """`` (process N)`` for the flock holder of ``fd`` (Linux), or ''."""
  st = os.fstat(fd)
  want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
  try:
    with open("/proc/locks", encoding="ascii") as f:  # path-ok: Linux's table
      for line in f:
        parts = line.split()
        if "FLOCK" in parts and len(parts) > 5:
          major, minor, ino = parts[5].split(":")
          if (int(major, 16), int(minor, 16), int(ino)) == want:
            return f" (process {parts[4]})"
  except (OSError, ValueError):
    pass
  return ""


def _acquire(workdir: str):
  """(what holds the lock or None, the refusal message or None)."""
  if not paths.is_local(workdir):
    return _Lease.acquire(workdir)
  try:
    paths.makedirs(workdir)
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
      return None, _REFUSED.format(workdir=workdir, holder=holder)
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
    if isinstance(fd, _Lease):
      fd.release()
    elif fd is not None:
      os.close(fd)          # closing the last descriptor releases the lock


_REFUSED = ("the workdir {workdir} is in use by another run{holder}; wait for "
            "it to end (or stop it: it resumes later), or pass another "
            "--workdir")

LEASE_REFRESH_S = 30.0
LEASE_STALE_S = 4 * LEASE_REFRESH_S


class _Lease:
  """The lease file of a remote workdir, refreshed by a daemon thread."""

  def __init__(self, path: str):
    self.path, self.owner = path, f"{socket.gethostname()}:{os.getpid()}"
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name="workdir-lease")

  @classmethod
  def acquire(cls, workdir: str):
    lease = cls(paths.join(workdir, ".lock"))
    try:
      held = json.loads(paths.read_text(lease.path))
      age = time.time() - float(held["time"])
    except (OSError, ValueError, KeyError, TypeError):
      held, age = None, None  # no lease, or an unreadable one: take it
    if held is not None and age < LEASE_STALE_S:
      return None, _REFUSED.format(
          workdir=workdir, holder=f" (process {held.get('owner')}, lease "
          f"refreshed {max(age, 0):.0f} s ago)")
    lease.write()
    lease._thread.start()
    return lease, None

  def write(self) -> None:
    paths.write_atomic(self.path, json.dumps(
        {"owner": self.owner, "time": time.time()}))

  def _beat(self) -> None:
    while not self._stop.wait(LEASE_REFRESH_S):
      try:
        self.write()
      except OSError as e:  # a transient store error: the next beat retries
        logging.warning("cannot refresh the workdir lease %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    try:
      paths.remove(self.path)
    except OSError:
      pass  # gone already; a leftover lease goes stale on its own
