"""SIGTERM (preemption) and SIGINT (Ctrl-C): stop at a step, saved.

`handling_signals()` installs handlers for both signals. While the task loop
runs (`deferred()`), a signal only sets a flag: the loop finishes the current
train or evaluation step, asks `requested(mesh)` (all processes agree on one
answer, so they stop and checkpoint at the same step), saves and raises
`Interrupted`, which the entry point prints as one line and turns into exit
code 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), what shells
and schedulers report for a process stopped by that signal. A repeated signal
while the checkpoint is being written changes nothing (the save is never cut
short); SIGKILL would leave the previous complete checkpoint, as always.
Outside the loop (data checks, backbone, restore) there is nothing to save: a
signal raises `Interrupted` at once (with several processes, one that did not
get the signal then waits for its peers until JAX's heartbeat timeout).

Why 130/143 and not one code such as 3: they are what a shell's ``$?``,
``timeout``, Slurm and Kubernetes already show for a run stopped by SIGINT or
SIGTERM, so a retry rule written for those signals also covers this runner,
and they differ from 0, 1 (a crash) and 2 (a user error). A run killed
without saving reads the same there, which is harmless: rerunning resumes
from the latest checkpoint either way.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import signal
import sys
import threading
import weakref

import jax
import numpy as np

from slora_jax.runner import parallel

__all__ = ["Interrupted", "install", "handling_signals", "deferred",
           "requested", "exit_code"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
  """The run stopped on a signal; ``str()`` is the line to print.

  A BaseException, as KeyboardInterrupt is: the ``except Exception`` of a
  library (JAX's compilation-cache read warns and goes on) or of our own
  checks (a failed restore marks a checkpoint corrupt) must not take it.
  """

  def __init__(self, signum: int, where: str, saved: bool = True):
    self.signum = signum
    what = ("checkpoint saved" if saved
            else "nothing new to save since the last checkpoint")
    super().__init__(f"interrupted ({signal.Signals(signum).name}) at "
                     f"{where}; {what}; rerun the same command to resume")


def exit_code(e: Interrupted) -> int:
  """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
  return 128 + e.signum


class _State:
  signum: int | None = None       # the first signal received
  deferring: bool = False
  raised: bool = False            # Interrupted was raised for it
  collecting: bool = False        # a garbage collection is running


_state = _State()


def _handler(signum, frame):
  if _state.signum is not None and (_state.deferring or _state.raised):
    print(f"{signal.Signals(signum).name} again: still finishing the step and "
          "writing its checkpoint (kill -9 stops at once and keeps the "
          "previous checkpoint)", file=sys.stderr, flush=True)
    return
  _state.signum = signum
  if _state.deferring:
    return
  if _swallowing(frame):
    # Raised here, the exception would be printed and dropped: deliver the
    # signal again once the hook has returned.
    threading.Timer(_REDELIVER_S, _thread.interrupt_main, (signum,)).start()
    return
  _state.raised = True
  raise Interrupted(signum, "start-up (before training)", saved=False)


_REDELIVER_S = 0.05


def _swallowing(frame) -> bool:
  """Whether ``frame`` runs where Python prints an exception as "Exception
  ignored" and carries on: a garbage collection (its callbacks, finalisers
  and weakref callbacks), a ``__del__`` or a weakref callback."""
  if _state.collecting:
    return True
  hooks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    code = frame.f_code
    if (code in hooks or code.co_name == "__del__"
        or code.co_filename == weakref.__file__):
      return True
    frame = frame.f_back
  return False


def _collection_starts(phase, info):  # pylint: disable=unused-argument
  if phase == "start":
    _state.collecting = True


def _collection_stopped(phase, info):  # pylint: disable=unused-argument
  if phase == "stop":
    _state.collecting = False


def _track_collections() -> None:
  """Brackets every other GC callback with ours: first in, last out."""
  if _collection_starts not in gc.callbacks:
    gc.callbacks.insert(0, _collection_starts)
    gc.callbacks.append(_collection_stopped)


def install() -> None:
  """Installs the handlers for the whole process (the entry point, first
  thing after its imports); `handling_signals` nests inside."""
  _state.signum, _state.deferring, _state.raised = None, False, False
  _track_collections()
  for s in SIGNALS:
    signal.signal(s, _handler)


@contextlib.contextmanager
def handling_signals():
  """Installs the handlers (main thread only) and restores the old ones.

  Installed after ``jax.distributed.initialize``, whose preemption notifier
  would otherwise take SIGTERM. Python runs handlers in the main thread only:
  elsewhere (a run inside a worker thread) the signals keep their handlers.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _state.signum, _state.deferring, _state.raised = None, False, False
  _track_collections()
  old = {s: signal.signal(s, _handler) for s in SIGNALS}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    _state.signum, _state.deferring, _state.raised = None, False, False


@contextlib.contextmanager
def deferred():
  """Inside, a signal only sets the flag that `requested` reads."""
  before, _state.deferring = _state.deferring, True
  try:
    yield
  finally:
    _state.deferring = before


@jax.jit
def _any(flags: jax.Array) -> jax.Array:
  return flags.max()


def requested(mesh) -> int | None:
  """The signal that stops the run, agreed by every process, or None.

  With several processes it is a small all-reduce over ``mesh`` (every
  process must call it at the same step): a signal that reached one host
  stops them all at the same step. The agreed number is the largest.
  """
  local = _state.signum or 0
  if jax.process_count() > 1:
    n = jax.local_device_count()
    flags = parallel.global_batch({"f": np.full((n,), local, np.int32)},
                                  mesh)["f"]
    local = int(_any(flags))
  return local or None
